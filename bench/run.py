"""`make bench`: the kernel fast-path and L7 benchmarks, then bench/README.md.

Runs bench/bootstrap (idempotent: installs trafgen, wrk, haproxy, py-spy),
bench.xdp_cost, bench.flood, bench.l7, bench.jwt, bench.limits and
bench.escalation with their defaults, and rebuilds the README from the
results. A failing case is reported and the others still run; the exit code
is 1 if any failed. As root, after ./scripts/bootstrap (which `make bench`
runs).

Run: .venv/bin/python -m bench.run
"""

from __future__ import annotations

import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from bench import cluster, escalation, flood, jwt, l7, limits, report, waf, xdp_cost
from bench.common import BENCH_DIR


def run_case(name: str, case: Callable[[Sequence[str]], int]) -> bool:
    try:
        return case([]) == 0
    except Exception:  # report it and go on with the other cases
        traceback.print_exc()
        print(f"bench: {name} crashed", file=sys.stderr)
        return False


def main() -> int:
    started = time.monotonic()
    bootstrap = subprocess.run([str(BENCH_DIR / "bootstrap")], check=False)
    if bootstrap.returncode != 0:
        print("bench: bench/bootstrap failed; fix that first", file=sys.stderr)
        return 1
    cases = {
        "xdp_cost": xdp_cost.main,
        "flood": flood.main,
        "l7": l7.main,
        "jwt": jwt.main,
        "limits": limits.main,
        "escalation": escalation.main,
        "waf": waf.main,
        "cluster": cluster.main,
    }
    failed = [name for name, case in cases.items() if not run_case(name, case)]
    path = report.write_readme()
    minutes = (time.monotonic() - started) / 60
    print(f"bench: done in {minutes:.1f} min; {path}", file=sys.stderr)
    if failed:
        print(f"bench: failed: {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
