"""Client side of bench/escalation.py, run inside the lab's client namespace.

    python -m bench.lab_client wait --dst 198.18.0.1 --port 8080 [--src ADDR] [--seconds 20]
    python -m bench.lab_client trip --src 198.18.0.10 --dst 198.18.0.1 --port 8080 --paths 21

`wait` repeats a GET / until it answers 200 (bounded by --seconds). `trip`
sends --paths GETs of paths that do not exist on one keep-alive connection
from --src (the last of them trips a distinct-404-paths rule), notes the wall
clock when the last answer has arrived, then opens a TCP connection from the
same source every --interval ms until one gets no answer within --timeout ms
(its SYN was dropped) or --limit seconds have passed. Each prints one JSON
object; times are CLOCK_REALTIME (time.time()), which every process on the
host shares whatever its network namespace, so they compare with the proxy's
and the controller's timestamps.
"""

from __future__ import annotations

import argparse
import http.client
import json
import select
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def get(src: str | None, dst: str, port: int, path: str, timeout: float) -> int:
    conn = http.client.HTTPConnection(
        dst, port, timeout=timeout, source_address=(src, 0) if src else None
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait(src: str | None, dst: str, port: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = get(src, dst, port, "/", 1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return {"ok": True, "status": status}
            last = f"status {status}"
        time.sleep(0.1)
    return {"ok": False, "error": last}


def connect_once(src: str, dst: str, port: int, timeout: float) -> tuple[str, float]:
    """One TCP connect from src: ("ok" | "timeout" | an error name, connect seconds)."""
    sock = socket.socket(_family(dst), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind((src, 0))
        started = time.monotonic()
        sock.connect_ex((dst, port))  # EINPROGRESS: the SYN is on its way
        _, writable, _ = select.select([], [sock], [], timeout)
        took = time.monotonic() - started
        if not writable:
            return "timeout", took
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return ("ok" if error == 0 else f"errno {error}"), took
    finally:
        sock.close()  # a socket still in SYN_SENT goes away without a packet


def trip(
    src: str, dst: str, port: int, paths: int, interval: float, timeout: float, limit: float
) -> dict[str, Any]:
    conn = http.client.HTTPConnection(dst, port, timeout=5, source_address=(src, 0))
    tag = time.time_ns()
    statuses = []
    try:
        for n in range(paths):
            conn.request("GET", f"/scan/{tag}/{n}")
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        answered = time.time()
    finally:
        conn.close()
    last_ok: float | None = None
    first_drop: float | None = None
    outcome = "no drop"
    probes = 0
    slowest_ok = 0.0
    deadline = answered + limit
    while time.time() < deadline:
        sent = time.time()
        result, took = connect_once(src, dst, port, timeout)
        probes += 1
        if result == "ok":
            last_ok = sent
            slowest_ok = max(slowest_ok, took)
        else:
            outcome = result
            if result == "timeout":
                first_drop = sent
            break
        pause = sent + interval - time.time()
        if pause > 0:
            time.sleep(pause)
    return {
        "statuses": statuses,
        "answered": answered,
        "last_ok": last_ok,
        "first_drop": first_drop,
        "outcome": outcome if first_drop is None else "dropped",
        "probes": probes,
        "slowest_ok_ms": round(slowest_ok * 1e3, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab_client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("wait", "trip"):
        p = sub.add_parser(name)
        p.add_argument("--src", required=name == "trip")
        p.add_argument("--dst", required=True)
        p.add_argument("--port", type=int, required=True)
        if name == "wait":
            p.add_argument("--seconds", type=float, default=20.0)
        else:
            p.add_argument("--paths", type=int, required=True)
            p.add_argument("--interval", type=float, default=1.0, help="ms between probes")
            p.add_argument("--timeout", type=float, default=50.0, help="ms to wait for a SYN-ACK")
            p.add_argument("--limit", type=float, default=3.0, help="seconds of probing at most")
    args = parser.parse_args(argv)
    if args.command == "wait":
        result = wait(args.src, args.dst, args.port, min(args.seconds, 60.0))
    else:
        if not 1 <= args.paths <= 1000 or not 0 < args.limit <= 10:
            parser.error("--paths must be 1-1000 and --limit at most 10 seconds")
        result = trip(
            args.src,
            args.dst,
            args.port,
            args.paths,
            args.interval / 1e3,
            args.timeout / 1e3,
            args.limit,
        )
    print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
