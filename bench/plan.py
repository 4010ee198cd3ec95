"""What `make bench` runs: every case, in order, with the arguments that fit the whole
suite in its budget, and about how long each takes on this host.

bench.run runs these commands; bench.report lists them in bench/README.md. A case
run by hand without arguments takes its own defaults (more rounds, longer runs).

The estimates are for this 2-core host, from the per-round times of earlier full
runs: most of a case's time is fixed by its arguments (wrk's -d, the warm-ups, the
penalties between trials), the rest scales with how busy the host is.
"""

from __future__ import annotations

from dataclasses import dataclass

BUDGET_S = 20 * 60  # issue 10: the whole suite in under 20 minutes on 2 cores


@dataclass(frozen=True)
class Case:
    name: str  # the module bench.<name>, and its results bench/results/<name>.json
    title: str
    args: tuple[str, ...]  # what `make bench` passes
    estimate_s: int  # with args, here
    smoke: tuple[str, ...]  # `bench.run --smoke`: as short as the case allows

    def command(self, args: tuple[str, ...] | None = None) -> str:
        return " ".join((".venv/bin/python", "-m", f"bench.{self.name}", *(args or self.args)))


PLAN = (
    Case(
        "xdp_cost",
        "XDP cost per packet vs bans",
        ("--rounds", "10"),
        85,
        ("--rounds", "1", "--counts", "1,10000"),
    ),
    Case(
        "flood",
        "receiver CPU under a veth flood",
        ("--rounds", "7", "--packets", "1000000"),
        105,
        ("--rounds", "1", "--packets", "100000"),
    ),
    Case(
        "l7",
        "L7 gateway per workload vs HAProxy",
        ("--rounds", "5", "--duration", "3"),
        210,
        ("--rounds", "1", "--duration", "1", "--no-profile"),
    ),
    Case(
        "jwt",
        "JWT auth vs HAProxy's jwt_verify",
        ("--rounds", "5", "--duration", "3"),
        95,
        ("--rounds", "1", "--duration", "1", "--tokens", "40000", "--no-profile"),
    ),
    Case(
        "limits",
        "three rate limits vs stick tables",
        ("--rounds", "5", "--duration", "3"),
        75,
        ("--rounds", "1", "--duration", "1"),
    ),
    Case(
        "escalation",
        "rule to kernel drop, goodput under a flood",
        ("--trials", "30", "--rounds", "5", "--duration", "4"),
        185,
        ("--trials", "2", "--rounds", "1", "--duration", "1"),
    ),
    Case(
        "waf",
        "the WAF per mode",
        ("--rounds", "5", "--duration", "3", "--transactions", "300000"),
        130,
        ("--rounds", "1", "--duration", "1", "--transactions", "100000"),
    ),
    Case(
        "cluster",
        "cluster ban propagation and limits",
        ("--trials", "20", "--rounds", "5", "--duration", "3"),
        125,
        ("--trials", "2", "--rounds", "1", "--duration", "1"),
    ),
    Case(
        "bulk",
        "100,000 bans from a file, and a packet's cost with them",
        ("--rounds", "5", "--count", "100000"),
        55,
        ("--rounds", "1", "--count", "10000", "--repeat", "100000"),
    ),
)
# bench/bootstrap (idempotent: seconds once installed) and the run's own README: the
# 2026-11-24 run spent 0.4 s outside its cases (988.8 s in all, 988.4 s in the cases)
OVERHEAD_S = 15


def estimate_s() -> int:
    return sum(case.estimate_s for case in PLAN) + OVERHEAD_S
