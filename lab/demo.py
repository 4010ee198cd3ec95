"""`make demo`: the kernel fast path, end to end, in a throwaway lab.

Builds three network namespaces (client, gateway, upstream), starts the
controller with the XDP program on the gateway's client-facing interface,
shows a client reaching the upstream API, bans it with `stockade ban`, shows
its packets dropped and counted while another client still gets through,
then unbans it. Everything is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from stockade.cli.client import ControllerUnavailable, wait_until_serving
from stockade.lab import probe, topology

STOCKADE = [sys.executable, "-m", "stockade.cli.main"]
BANNED, OTHER = topology.CLIENT_V4[0], topology.CLIENT_V4[1]


def say(text: str) -> None:
    print("\n" + textwrap.fill(text, width=78), flush=True)


def show(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run and print `stockade ARGS` (the config comes through STOCKADE_CONFIG)."""
    print(f"  $ stockade {' '.join(args)}", flush=True)
    env = {**os.environ, "STOCKADE_CONFIG": str(config)}
    result = subprocess.run([*STOCKADE, *args], capture_output=True, text=True, timeout=60, env=env)
    for line in (result.stdout + result.stderr).strip().splitlines():
        print(f"    {line}")
    return result


def fetch(lab: topology.Lab, src: str) -> bool:
    url = lab.upstream_url("/api/hello")
    print(f"  [client {src}] GET {url}", flush=True)
    result = probe.in_netns(lab.client_ns, "http", "--url", url, "--src", src, timeout=1.0)
    if "status" in result:
        print(f"    HTTP {result['status']} {json.dumps(result['body'], sort_keys=True)}")
    else:
        print(f"    no answer after {result.get('elapsed_ms', 0) / 1000:.1f}s: {result['result']}")
    return bool(result["ok"])


def write_config(tmp: Path, lab: topology.Lab) -> Path:
    path = tmp / "stockade.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [controller]
            socket = "{tmp / "control.sock"}"
            state_dir = "{tmp / "state"}"
            pin_root = "/sys/fs/bpf/stockade-{lab.prefix}"
            netns = "{lab.gateway_ns}"

            [xdp]
            interfaces = ["{lab.gateway_if}"]
            syn_rate = 200
            syn_burst = 400
            max_bans_v4 = 65536
            max_bans_v6 = 65536
            """
        )
    )
    return path


def demo(lab: topology.Lab, tmp: Path) -> None:
    config = write_config(tmp, lab)
    cli = [*STOCKADE, "--config", str(config)]
    log = tmp / "controller.log"
    say(
        f"Lab {lab.prefix} is up: client namespace {lab.client_ns} "
        f"({', '.join(topology.CLIENT_V4[:2])}), gateway {lab.gateway_ns} with the XDP "
        f"interface {lab.gateway_if}, upstream {lab.upstream_ns} serving a small API on "
        f"{lab.upstream_url()}."
    )
    say(
        "Starting the controller: it compiles the XDP program with bcc, pins its maps, "
        "and attaches it to the gateway interface."
    )
    with log.open("wb") as out:
        proc = subprocess.Popen([*cli, "controller", "run"], stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until_serving(tmp / "control.sock", proc, timeout=60)
        except ControllerUnavailable as exc:
            raise SystemExit(f"{exc.message}:\n{log.read_text()}") from None
        show(config, "status")

        say("Both clients reach the upstream through the gateway:")
        fetch(lab, BANNED)
        fetch(lab, OTHER)

        say(
            f"Ban {BANNED}. The controller writes the ban store, then the kernel map; "
            "from then on the XDP program drops its packets before TCP sees them."
        )
        show(config, "ban", BANNED, "--ttl", "10m", "--reason", "demo")
        fetch(lab, BANNED)
        fetch(lab, OTHER)

        say("The drops are counted per ban and per reason, in the kernel:")
        show(config, "bans")
        show(config, "stats")

        say(f"Unban {BANNED}; it gets through again.")
        show(config, "unban", BANNED)
        fetch(lab, BANNED)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        subprocess.run([*cli, "detach", "--all", "--remove-maps"], capture_output=True, timeout=60)
        shutil.rmtree(f"/sys/fs/bpf/stockade-{lab.prefix}", ignore_errors=True)


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the demo needs root (network namespaces and XDP)")
    say(
        "stockade demo: XDP bans in a throwaway lab of network namespaces "
        "(addresses from 198.18.0.0/15 and fd00::/8 only)."
    )
    tmp = Path(tempfile.mkdtemp(prefix="stockade-demo-"))
    try:
        with topology.running_lab() as lab:
            demo(lab, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say("Done: the controller stopped, the program was detached, and the lab removed.")


if __name__ == "__main__":
    main()
