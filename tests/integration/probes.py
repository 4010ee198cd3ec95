"""Traffic probes run inside the lab's client namespace (via nsenter).

Each prints one JSON object on stdout. Every loop is bounded in attempts and
seconds and stops by itself.

  connect SRC DST PORT [--timeout S]          one TCP connect from SRC
  watch SRC DST PORT --seconds S --interval S repeated connects with timestamps
  synflood SRC DST PORT --count N --seconds S raw SYNs from SRC (no handshake)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import struct
import time


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def connect_once(src: str, dst: str, port: int, timeout: float) -> bool:
    with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((src, 0))
        try:
            sock.connect((dst, port))
        except OSError:
            return False
        return True


def watch(src: str, dst: str, port: int, seconds: float, interval: float, timeout: float) -> list:
    """[(start monotonic, ok)] for connects every `interval` for `seconds`."""
    results = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(results) < 100_000:
        start = time.monotonic()
        results.append((start, connect_once(src, dst, port, timeout)))
        time.sleep(interval)
    return results


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_segment(src: str, dst: str, sport: int, dport: int) -> bytes:
    header = struct.pack(
        "!HHIIBBHHH", sport, dport, int.from_bytes(os.urandom(4)), 0, 5 << 4, 0x02, 65535, 0, 0
    )
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    else:
        pseudo = s + d + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP)
    csum = _checksum(pseudo + header)
    return header[:16] + struct.pack("!H", csum) + header[18:]


def synflood(src: str, dst: str, port: int, count: int, seconds: float) -> dict:
    """Send up to `count` SYNs from `src` within `seconds`; the kernel adds the IP header."""
    sock = socket.socket(_family(dst), socket.SOCK_RAW, socket.IPPROTO_TCP)
    sock.bind((src, 0))
    sent = 0
    start = time.monotonic()
    deadline = start + seconds
    while sent < count and time.monotonic() < deadline:
        sock.sendto(syn_segment(src, dst, 20000 + sent % 40000, port), (dst, 0))
        sent += 1
    elapsed = time.monotonic() - start
    sock.close()
    return {"sent": sent, "elapsed": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("connect", "watch", "synflood"):
        p = sub.add_parser(name)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=0.5)
        p.add_argument("--seconds", type=float, default=1.0)
        p.add_argument("--interval", type=float, default=0.01)
        p.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    if args.cmd == "connect":
        out: object = {"ok": connect_once(args.src, args.dst, args.port, args.timeout)}
    elif args.cmd == "watch":
        out = watch(
            args.src, args.dst, args.port, min(args.seconds, 30.0), args.interval, args.timeout
        )
    else:
        out = synflood(
            args.src, args.dst, args.port, min(args.count, 100_000), min(args.seconds, 10.0)
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
