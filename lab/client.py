"""A lab client: one bounded HTTP GET from a chosen source address.

  python -m stockade.lab.client --src 198.18.0.10 http://198.18.1.10:8080/api/hello

Prints the status and body, or the error; exit 0 on an HTTP answer, 1 if
the request failed (dropped, refused, timed out).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from urllib.parse import urlsplit


def fetch(src: str, url: str, timeout: float) -> tuple[int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    conn = http.client.HTTPConnection(
        parts.hostname, parts.port or 80, timeout=timeout, source_address=(src, 0)
    )
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        return response.status, response.read(4096).decode(errors="replace")
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="source address to send from")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("url")
    args = parser.parse_args()
    start = time.monotonic()
    try:
        status, body = fetch(args.src, args.url, min(args.timeout, 10.0))
    except (OSError, ValueError) as exc:
        elapsed = time.monotonic() - start
        print(f"no answer after {elapsed:.1f}s: {exc}")
        sys.exit(1)
    print(f"HTTP {status} {body.strip()}")


if __name__ == "__main__":
    main()
