"""Case 9: 100,000 bans loaded at once, and the cost of a packet with them loaded.

Issue 16: an operator of 10,000+ bans needs a batch path. A real `stockade
controller run` (no interface: its program is loaded against fresh pinned
maps, 262,144 exact bans per family, the defaults) and, each round:

1. `stockade ban --file FILE` with N targets (IPv4 from 198.18.0.0/15 and
   IPv6 from fd00::/8, a quarter each with no TTL, a TTL, a reason, and as JSON
   lines), timed as an operator sees it: the whole command, from the CLI
   process starting to its exit (reading and checking the file, the batch over
   the control socket, one store transaction, BPF_MAP_UPDATE_BATCH);
2. the controller's own program, run with BPF_PROG_TEST_RUN on an IPv4 and an
   IPv6 SYN that pass and two that are banned, N bans loaded (the SYN rate
   limit off: a million runs of one source would hit it);
3. `unban.all` with force over the control API (what `stockade unban --all
   --force` sends, without the CLI's start), timed;
4. the same packets with one ban loaded (the baseline).

Target: N = 100,000 loaded in under 10 s (median over the rounds), and a packet
costs no more with them loaded than with one ban (within this host's noise, 10%).

Run as root: .venv/bin/python -m bench.bulk [--rounds 5] [--count 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import report
from bench.common import BenchError, machine, now_iso, source_revision
from stockade.cli.client import ControllerUnavailable, call, wait_until_serving
from stockade.controller import libbpf, loader
from stockade.lab.packets import tcp4, tcp6
from stockade.protocol import CommandError

COMMAND = "python -m bench.bulk"
STOCKADE = (sys.executable, "-m", "stockade.cli.main")
ROUNDS = 5
COUNT = 100_000
REPEAT = 300_000  # BPF_PROG_TEST_RUN runs per packet measurement (five of them, fastest)
MAP_SIZE = 262_144  # xdp.max_bans_v4 / v6 (the defaults)
LOAD_TARGET_S = 10.0
COST_NOISE = 1.10  # "unchanged": within 10%, this host's noise
READY_S = 120.0
CLI_TIMEOUT_S = 300.0

CONFIG = """\
[controller]
socket = "{home}/control.sock"
state_dir = "{home}/state"
pin_root = "{pin_root}"
sweep_interval = "1s"

[controller.admin]
enabled = false

[xdp]
interfaces = []
max_bans_v4 = {size}
max_bans_v6 = {size}
syn_rate = 0  # a million test runs of one SYN would be rate-limited: not what is measured
"""

# (name, frame): banned ones are sources the file bans; passing ones are not in it
PACKETS = (
    ("IPv4 pass", "pass", tcp4("198.19.255.254")),
    ("IPv4 banned", "banned", tcp4("198.18.0.1")),
    ("IPv6 pass", "pass", tcp6("fd00:ffff::1")),
    ("IPv6 banned", "banned", tcp6("fd00::1")),
)


def targets(count: int) -> list[str]:
    """`count` distinct targets: three quarters IPv4, one quarter IPv6."""
    v6 = count // 4
    v4 = count - v6
    if v4 > 2**17 - 2:
        raise BenchError(f"{v4} IPv4 targets do not fit in 198.18.0.0/15")
    out = [f"198.{18 + (i + 1) // 65536}.{(i + 1) // 256 % 256}.{(i + 1) % 256}" for i in range(v4)]
    return out + [f"fd00::{i + 1:x}" for i in range(v6)]


def ban_file(path: Path, count: int) -> None:
    lines = ["# case 9: every form a ban file may use"]
    for i, target in enumerate(targets(count)):
        form = i % 4
        if form == 0:
            lines.append(target)
        elif form == 1:
            lines.append(f"{target} 1d")
        elif form == 2:
            lines.append(f"{target} - scanner from the nightly report")
        else:
            lines.append(json.dumps({"target": target, "ttl": "7d", "reason": "json line"}))
    path.write_text("\n".join(lines) + "\n")


def cli(config: Path, *args: str) -> tuple[float, Any]:
    """Run `stockade ARGS --json`: its wall time in seconds and what it printed (BenchError
    if it fails)."""
    started = time.monotonic()
    result = subprocess.run(
        [*STOCKADE, "--config", str(config), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    took = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"stockade {' '.join(args)}: {result.stderr.strip()}")
    return took, json.loads(result.stdout)


@contextmanager
def controller(home: Path) -> Iterator[Path]:
    """A `stockade controller run` on fresh pins; stopped and its maps removed after."""
    pin_root = loader.BPFFS / f"stockade-bench-bulk-{os.getpid()}"
    if pin_root.exists():
        raise BenchError(f"{pin_root} exists; remove it (a bench run that died?)")
    config = home / "stockade.toml"
    config.write_text(CONFIG.format(home=home, pin_root=pin_root, size=MAP_SIZE))
    log = home / "controller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*STOCKADE, "--config", str(config), "controller", "run"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_until_serving(home / "control.sock", proc, timeout=READY_S)
        except ControllerUnavailable as exc:
            raise BenchError(f"controller: {exc.message}:\n{log.read_text()[-2000:]}") from None
        yield config
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by PID
                proc.wait()
        settings = loader.ProgramSettings(pin_root=pin_root, max_bans_v4=MAP_SIZE)
        loader.remove_pins(settings)
        shutil.rmtree(pin_root, ignore_errors=True)


def packet_costs(prog_id: int, repeat: int) -> dict[str, float]:
    """ns per packet of each of PACKETS through the program: the fastest of five
    measurements of `repeat` runs each, averaged by the kernel (BPF_PROG_TEST_RUN).
    The fastest, because other work on the host (the load just done, writeback) only
    ever adds time: the least disturbed measurement is the closest to the cost."""
    fd = libbpf.prog_fd_by_id(prog_id)
    try:
        costs = {}
        for name, expected, frame in PACKETS:
            runs = [libbpf.prog_test_run(fd, frame, repeat=repeat) for _ in range(5)]
            verdict = {1: "banned", 2: "pass"}.get(runs[0].retval, str(runs[0].retval))
            if verdict != expected:
                raise BenchError(f"{name}: the program says {verdict}, expected {expected}")
            costs[name] = float(min(run.duration_ns for run in runs))
        return costs
    finally:
        os.close(fd)


def run(rounds: int, count: int, repeat: int) -> dict[str, Any]:
    started = time.monotonic()
    samples = []
    with tempfile.TemporaryDirectory(prefix="stockade-bench-bulk-") as tmp:
        home = Path(tmp)
        path = home / "bans.txt"
        ban_file(path, count)
        with controller(home) as config:
            socket = home / "control.sock"
            prog_id = int(call(socket, "status")["program"]["id"])
            for number in range(1, rounds + 1):
                load_s, banned = cli(config, "ban", "--file", str(path))
                if banned["added"] != count:
                    raise BenchError(f"round {number}: {banned} after the load")
                loaded = packet_costs(prog_id, repeat)
                started_unload = time.monotonic()
                lifted = call(socket, "unban.all", force=True, timeout=CLI_TIMEOUT_S)
                unload_s = time.monotonic() - started_unload
                if lifted["count"] != count:
                    raise BenchError(f"round {number}: {lifted} after the unban")
                call(socket, "ban", target="198.18.0.1")
                call(socket, "ban", target="fd00::1")
                baseline = packet_costs(prog_id, repeat)
                call(socket, "unban.all", force=True, timeout=CLI_TIMEOUT_S)
                samples.append(
                    {
                        "round": number,
                        "load_s": round(load_s, 3),
                        "unload_s": round(unload_s, 3),
                        "loaded_ns": loaded,
                        "baseline_ns": baseline,
                    }
                )
                print(
                    f"bulk: round {number}: {count} bans loaded in {load_s:.2f} s, lifted in "
                    f"{unload_s:.2f} s; IPv4 pass {loaded['IPv4 pass']:.0f} ns "
                    f"(one ban: {baseline['IPv4 pass']:.0f} ns)",
                    file=sys.stderr,
                )
    return {
        "bench": "bulk",
        "date": now_iso(),
        "source": source_revision(("bpf", "controller", "cli", "stockade")),
        "machine": machine(),
        "command": f"{COMMAND} --rounds {rounds} --count {count}",
        "rounds": rounds,
        "count": count,
        "repeat": repeat,
        "map_size": MAP_SIZE,
        "total_s": round(time.monotonic() - started, 1),
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.bulk --rounds 5 --count 100000",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument("--count", type=int, default=COUNT, help="bans (default %(default)s)")
    parser.add_argument(
        "--repeat", type=int, default=REPEAT, help="runs per packet measurement (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 4 <= args.count <= 200_000 or args.repeat < 1000:
        parser.error("--rounds >= 1, --count 4..200000, --repeat >= 1000")
    if os.geteuid() != 0:
        parser.error("run as root: it starts a controller, which loads an XDP program")
    try:
        results = run(args.rounds, args.count, args.repeat)
    except (BenchError, CommandError) as exc:
        print(f"bench.bulk: {exc}", file=sys.stderr)
        return 1
    report.publish("bulk", results, summary=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
