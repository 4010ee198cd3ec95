"""`make bench`: every benchmark in one run, then bench/README.md and its plots.

Runs bench/bootstrap (idempotent: trafgen, wrk, haproxy, matplotlib, py-spy),
then every case of bench/plan.py with the arguments that fit the whole suite
in its budget (20 minutes on this 2-core host), printing each case's time as
it ends, and records the run (bench/results/run.json: per-case times, the
total) before rebuilding the README and the plots from all the results. A
failing case is reported and the others still run; the exit code is 1 if any
failed. As root, after ./scripts/bootstrap (which `make bench` runs).

Run: .venv/bin/python -m bench.run [--only CASE[,CASE]] [--smoke]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from bench import bulk, cluster, escalation, flood, jwt, l7, limits, plan, report, waf, xdp_cost
from bench.common import BENCH_DIR, OUT_DIR, now_iso, save_results, source_revision

MAINS: dict[str, Callable[[Sequence[str]], int]] = {
    "xdp_cost": xdp_cost.main,
    "flood": flood.main,
    "l7": l7.main,
    "jwt": jwt.main,
    "limits": limits.main,
    "escalation": escalation.main,
    "waf": waf.main,
    "cluster": cluster.main,
    "bulk": bulk.main,
}
RUN_SOURCES = ("bpf", "controller", "proxy", "cli", "lab", "stockade")


def run_case(name: str, args: Sequence[str]) -> bool:
    """One case's main(args); True when it succeeded. A crash, or an argparse exit on
    arguments the case no longer takes, is reported and the run goes on."""
    try:
        return MAINS[name](list(args)) == 0
    except SystemExit as exc:
        print(f"bench: {name} exited with {exc.code}", file=sys.stderr)
        return False
    except Exception:  # report it and go on with the other cases
        traceback.print_exc()
        print(f"bench: {name} crashed", file=sys.stderr)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: STOCKADE_BENCH_OUT=/tmp/trial .venv/bin/python -m bench.run --smoke",
    )
    parser.add_argument(
        "--only",
        type=lambda text: tuple(text.split(",")),
        default=tuple(case.name for case in plan.PLAN),
        help="comma-separated cases (default: all): " + ", ".join(MAINS),
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="each case as briefly as it allows, to check the suite end to end "
        "(needs STOCKADE_BENCH_OUT: its numbers must not replace the committed ones)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(MAINS))
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; the cases are {', '.join(MAINS)}")
    if args.smoke and OUT_DIR == BENCH_DIR:
        parser.error("--smoke writes results: set STOCKADE_BENCH_OUT=DIR so they go to DIR")
    cases = [case for case in plan.PLAN if case.name in args.only]
    full = len(cases) == len(plan.PLAN)

    started = time.monotonic()
    bootstrap = subprocess.run([str(BENCH_DIR / "bootstrap")], check=False)
    if bootstrap.returncode != 0:
        print("bench: bench/bootstrap failed; fix that first", file=sys.stderr)
        return 1
    print(f"bench: {len(cases)} cases, about {plan.estimate_s() / 60:.0f} min", file=sys.stderr)
    done: list[dict[str, Any]] = []
    for case in cases:
        case_args = case.smoke if args.smoke else case.args
        print(f"bench: {case.command(case_args)}", file=sys.stderr)
        case_started = time.monotonic()
        ok = run_case(case.name, case_args)
        elapsed = time.monotonic() - case_started
        done.append(
            {
                "name": case.name,
                "command": case.command(case_args),
                "ok": ok,
                "elapsed_s": round(elapsed, 1),
                "estimate_s": case.estimate_s,
            }
        )
        total = time.monotonic() - started
        print(
            f"bench: {case.name} {'done' if ok else 'FAILED'} in {elapsed:.0f} s "
            f"(estimate {case.estimate_s} s); {total:.0f} s so far",
            file=sys.stderr,
        )
    total = time.monotonic() - started
    if full:  # the record of a whole run, which the README shows
        save_results(
            "run",
            {
                "bench": "run",
                "date": now_iso(),
                "command": "bench.run --smoke" if args.smoke else "make bench",
                "smoke": args.smoke,  # each case as briefly as it allows: no verdict
                "source": source_revision(RUN_SOURCES),
                "budget_s": plan.BUDGET_S,
                "total_s": round(total, 1),
                "cases": done,
            },
        )
    path = report.write_readme()
    total = time.monotonic() - started
    failed = [entry["name"] for entry in done if not entry["ok"]]
    for entry in done:
        print(
            f"bench:   {entry['name']:<11} {entry['elapsed_s']:6.0f} s"
            f"{'' if entry['ok'] else '  FAILED'}",
            file=sys.stderr,
        )
    over = " - over the budget" if total > plan.BUDGET_S else ""
    print(
        f"bench: done in {total:.0f} s ({total / 60:.1f} min, budget "
        f"{plan.BUDGET_S / 60:.0f} min{over}); {path}",
        file=sys.stderr,
    )
    if failed:
        print(f"bench: failed: {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
