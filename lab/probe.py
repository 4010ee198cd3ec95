"""Bounded reachability probes with plain Python sockets (no ping, no curl).

Run inside a namespace, from the source address of your choice:

    python -m stockade.lab.probe tcp  --dst 198.18.0.1 --port 9000 [--src 198.18.0.11]
    python -m stockade.lab.probe http --url http://[fd00:19::10]:8080/health [--src fd00:18::12]
    python -m stockade.lab.probe ping --dst fd00:18::1 [--src fd00:18::11]
    python -m stockade.lab.probe listen --host :: --port 9000 [--duration 60]
    python -m stockade.lab.probe watch --dst 198.18.1.10 --port 8080 --src 198.18.0.10 \
        --duration 2 --interval 0.01 --timeout 0.05
    python -m stockade.lab.probe synflood --dst 198.18.1.10 --port 8080 --src 198.18.0.13 \
        --count 3000 --duration 3

Each probe prints one JSON object ({"ok": ..., "result": ..., "elapsed_ms": ...})
and exits 0 when it succeeded, 1 when not. Every probe is bounded by
--timeout (default 1 s); `listen` by --duration. From Python, `in_netns()`
runs one in a namespace and returns the parsed JSON.

Standard library only, so starting one costs a bare interpreter start.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 1.0

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _result(ok: bool, result: str, started: float, **extra: Any) -> dict[str, Any]:
    return {
        "ok": ok,
        "result": result,
        "elapsed_ms": round((time.monotonic() - started) * 1000, 3),
        **extra,
    }


def tcp_connect(
    dst: str, port: int, src: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """Connect and close. result: "open", "refused" (reachable, port closed), "timeout", ..."""
    started = time.monotonic()
    with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if src:
            sock.bind((src, 0))
        try:
            sock.connect((dst, port))
        except TimeoutError:
            return _result(False, "timeout", started)
        except ConnectionRefusedError:
            return _result(False, "refused", started)
        except OSError as exc:
            return _result(False, f"error: {exc.strerror or exc}", started)
        return _result(True, "open", started, local=sock.getsockname()[0])


def http_get(url: str, src: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """GET `url` (http only); ok when the answer is 2xx. The body is parsed as JSON if it is."""
    started = time.monotonic()
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host[:port]/path URLs: {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    conn = http.client.HTTPConnection(
        parts.hostname,
        parts.port or 80,
        timeout=timeout,
        source_address=(src, 0) if src else None,
    )
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        raw = response.read()
    except TimeoutError:
        return _result(False, "timeout", started)
    except ConnectionRefusedError:
        return _result(False, "refused", started)
    except (OSError, http.client.HTTPException) as exc:
        return _result(False, f"error: {exc}", started)
    finally:
        conn.close()
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    ok = 200 <= response.status < 300
    return _result(ok, f"http {response.status}", started, status=response.status, body=body)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(dst: str, src: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """One ICMP/ICMPv6 echo request (raw socket, needs root); ok when the reply arrives."""
    started = time.monotonic()
    v6 = _family(dst) == socket.AF_INET6
    ident = (os.getpid() ^ int(started * 1e6)) & 0xFFFF
    payload = b"stockade-lab-probe"
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        # the kernel fills in the ICMPv6 checksum (it covers the pseudo-header)
        packet = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, 1) + payload
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, 1)
        cksum = _checksum(header + payload)
        packet = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, cksum, ident, 1) + payload
    want = ipaddress.ip_address(dst)
    with sock:
        if src:
            sock.bind((src, 0))
        sock.sendto(packet, (dst, 0))
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _result(False, "timeout", started)
            sock.settimeout(remaining)
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                return _result(False, "timeout", started)
            if ipaddress.ip_address(peer[0].split("%", 1)[0]) != want:
                continue
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            if len(icmp) < 8:
                continue
            kind, _, _, got_ident, seq = struct.unpack("!BBHHH", icmp[:8])
            reply = ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY
            if kind == reply and got_ident == ident and seq == 1:
                return _result(True, "reply", started)


def listen(host: str, port: int, duration: float) -> int:
    """Accept TCP connections and close them, for at most `duration` seconds."""
    family = _family(host)
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind((host, port))
        server.listen(128)
        print(f"ready {server.getsockname()[1]}", flush=True)
        deadline = time.monotonic() + duration
        while (remaining := deadline - time.monotonic()) > 0:
            server.settimeout(remaining)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            conn.close()
    return 0


def watch(
    dst: str, port: int, src: str | None, duration: float, interval: float, timeout: float
) -> dict[str, Any]:
    """TCP connects every `interval` for `duration` s: [[start (CLOCK_MONOTONIC), ok], ...].

    Monotonic start times let a test line attempts up with events in another
    process (the clock is shared by every process on the host).
    """
    started = time.monotonic()
    attempts: list[tuple[float, bool]] = []
    deadline = started + min(duration, 60.0)
    while time.monotonic() < deadline and len(attempts) < 100_000:
        at = time.monotonic()
        attempts.append((at, bool(tcp_connect(dst, port, src, timeout)["ok"])))
        time.sleep(interval)
    return _result(True, f"{len(attempts)} attempts", started, attempts=attempts)


def syn_segment(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A bare TCP SYN with a valid checksum (the kernel adds the IP header)."""
    seq = int.from_bytes(os.urandom(4), "big")
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 65535, 0, 0)
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    else:
        pseudo = s + d + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP)
    cksum = _checksum(pseudo + header)
    return header[:16] + struct.pack("!H", cksum) + header[18:]


def synflood(dst: str, port: int, src: str, count: int, duration: float) -> dict[str, Any]:
    """Up to `count` raw SYNs from `src` within `duration` s (both capped): no handshake."""
    started = time.monotonic()
    deadline = started + min(duration, 10.0)
    sent = 0
    with socket.socket(_family(dst), socket.SOCK_RAW, socket.IPPROTO_TCP) as sock:
        sock.bind((src, 0))
        while sent < min(count, 1_000_000) and time.monotonic() < deadline:
            sock.sendto(syn_segment(src, dst, 20000 + sent % 40000, port), (dst, 0))
            sent += 1
    elapsed = time.monotonic() - started
    return _result(True, f"{sent} SYNs", started, sent=sent, elapsed=elapsed)


def in_netns(netns: str, kind: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Run a probe in `netns` and return its JSON, e.g.

    in_netns(lab.client_ns, "tcp", "--dst", "198.18.0.1", "--port", "9000", "--src", "198.18.0.11")
    """
    from stockade.lab.netns_exec import python_argv, run_in_netns

    argv = python_argv("-m", "stockade.lab.probe", kind, *args, "--timeout", str(timeout))
    try:
        done = run_in_netns(netns, argv, capture_output=True, timeout=timeout + 10.0)
    except subprocess.TimeoutExpired:
        return {"ok": False, "result": "probe process did not finish"}
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return {"ok": False, "result": f"probe failed: {done.stderr.strip() or done.stdout}"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.lab.probe", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("tcp", "http", "ping"):
        p = sub.add_parser(kind)
        p.add_argument("--src", help="source address to bind")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
        if kind == "http":
            p.add_argument("--url", required=True)
        else:
            p.add_argument("--dst", required=True)
        if kind == "tcp":
            p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("watch")
    p.add_argument("--src")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=0.05)
    p = sub.add_parser("synflood")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=argparse.SUPPRESS)
    p = sub.add_parser("listen")
    p.add_argument("--host", default="::")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.kind == "listen":
        return listen(args.host, args.port, args.duration)
    if args.kind == "watch":
        result = watch(args.dst, args.port, args.src, args.duration, args.interval, args.timeout)
    elif args.kind == "synflood":
        result = synflood(args.dst, args.port, args.src, args.count, args.duration)
    elif args.kind == "tcp":
        result = tcp_connect(args.dst, args.port, args.src, args.timeout)
    elif args.kind == "http":
        result = http_get(args.url, args.src, args.timeout)
    else:
        result = icmp_echo(args.dst, args.src, args.timeout)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
