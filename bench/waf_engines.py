"""Two ways to run ModSecurity from Python, compared on the same CRS rules and requests.

- `ctypes` : stockade's own binding (proxy/waf/modsec.py) with Debian's
  libmodsecurity3 (3.0.9): what the proxy runs.
- `pypi`   : the PyPI package `libmodsecurity` (pybind11 bindings whose wheel
  bundles its own libmodsecurity 3.0.15, with libcurl, OpenSSL 1.1.1k,
  libxml2 and PCRE2 compiled in, and no GeoIP/MaxMind and no Lua).
- `ctypes-pypi-so` : stockade's binding with the wheel's bundled library (the
  newer engine without the other binding: which of the two a difference
  comes from).

Rules: stockade's engine settings and CRS setup (proxy/waf/rulesets.py) and
Debian's modsecurity-crs 3.3.4 request rules at paranoia level 1, without
REQUEST-910 (IP reputation), which the wheel's engine refuses to load ("not
compiled with GeoIP or MaxMind support"); whether each engine loads the full
set as stockade does is recorded too.

Requests: tests/waf/corpus/crs_regression.jsonl (a request per CRS rule, as
CRS's own regression tests do it, and clean ones) and the API corpora
(tests/waf/corpus/attacks.jsonl, benign_api.jsonl): 1,290 or so requests.

Correctness: per request, the verdict, every rule match (rule id, variable,
points: proxy/waf/findings.py matched()) and CRS's anomaly score, from each
engine's log lines; every difference is listed.

Cost: each engine runs in a process of its own (the two libraries are never
loaded together), once per round, the engines in a shuffled order each round.
A round: one warm-up pass over the requests, then `passes` timed passes, single
threaded; microseconds per request (wall and the process's CPU) = elapsed /
(passes x requests). Then one more pass while a pure-Python thread counts: the
loop share is how far it counts meanwhile against as long alone (the proxy's
event loop beside its engine threads): near 1 when the binding lets go of the
GIL in the engine's calls (less on a busy host), near 0 when it holds it.

Run: .venv/bin/python -m bench.waf_engines [--rounds N] [--passes N]
(needs the package for the pypi engines: .venv/bin/pip install libmodsecurity)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from bench.common import machine, now_iso, save_results, source_revision
from stockade.proxy.waf.findings import matched, rule_ids
from stockade.proxy.waf.modsec import Engine, RuleSet
from stockade.proxy.waf.rulesets import crs_files, crs_setup, engine_settings
from stockade.proxy.waf_settings import WafConfig

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "waf" / "corpus"
REGRESSION = CORPUS / "crs_regression.jsonl"
API_CORPORA = (CORPUS / "attacks.jsonl", CORPUS / "benign_api.jsonl")
NAME = "waf_engines"
PACKAGES = ("libmodsecurity3", "modsecurity-crs", "libxml2")
SOURCES = ("proxy", "stockade", "bench")
ENGINES = ("ctypes", "pypi", "ctypes-pypi-so")
IP_REPUTATION = "REQUEST-910-IP-REPUTATION.conf"
BODY_LIMIT = 1 << 20
ROUNDS = 5
PASSES = 3
TIMED_EVERY = 4
COMMAND = ".venv/bin/python -m bench.waf_engines"

Request = dict[str, Any]


class Driver(Protocol):
    version: str
    known_ids: set[str]

    def evaluate(self, request: Request) -> tuple[int, list[str]]: ...

    def close(self) -> None: ...


def rule_sources(full: bool = False) -> list[tuple[str, str | Path]]:
    """What stockade's crs mode loads, in order: ("text", ...) or ("file", path);
    without REQUEST-910 unless `full`."""
    crs = WafConfig().crs
    files = [p for p in crs_files(crs) if full or p.name != IP_REPUTATION]
    return [
        ("text", engine_settings(BODY_LIMIT)),
        ("text", crs_setup(crs)),
        *(("file", p) for p in files),
    ]


def _known(sources: Iterable[tuple[str, str | Path]]) -> set[str]:
    ids: set[str] = set()
    for kind, source in sources:
        text = source if kind == "text" else Path(source).read_text(errors="replace")
        ids |= rule_ids(str(text))
    return ids


class CtypesDriver:
    """stockade's binding, as proxy/waf/firewall.py drives it."""

    def __init__(self, library: str = "libmodsecurity.so.3", full: bool = False) -> None:
        self.engine = Engine(library)
        self.version = self.engine.version
        self.rules: RuleSet = self.engine.rule_set()
        sources = rule_sources(full)
        for kind, source in sources:
            if kind == "text":
                self.rules.add(str(source))
            else:
                self.rules.add_file(Path(source))
        self.known_ids = _known(sources)
        self._next = 0

    def evaluate(self, request: Request) -> tuple[int, list[str]]:
        self._next += 1
        body = request["body"].encode()
        with self.engine.transaction(self.rules, f"bench{self._next}") as tx:
            tx.connection("198.18.0.1", 40000, "198.18.0.2", 443)
            tx.uri(request["target"].encode(), request["method"], "1.1")
            tx.add_headers((n.encode(), v.encode()) for n, v in request["headers"])
            tx.process_headers()
            found = tx.intervention()
            if found is None:
                if body:
                    tx.append_body(body)
                tx.process_body()
                found = tx.intervention()
            lines = list(tx.messages)
        if found is None:
            return 0, lines
        return found.status, [*lines, found.log]

    def close(self) -> None:
        self.rules.close()
        self.engine.close()


class PypiDriver:
    """The PyPI package's own API (pybind11), as its README drives it."""

    def __init__(self, full: bool = False) -> None:
        # installed into the venv for the bench only: not a dependency of stockade
        import libmodsecurity  # type: ignore[import-not-found, unused-ignore]

        self.module = libmodsecurity
        self.engine = libmodsecurity.ModSecurity()
        self.engine.set_connector_information("stockade-bench")
        self.version = self.engine.who_am_i()
        self._lines: list[str] = []
        # one callback per engine, with no transaction passed: lines are collected
        # here, which is only right with one transaction at a time
        self.engine.set_log_callback(self._lines.append)
        self.rules = libmodsecurity.RulesSet()
        sources = rule_sources(full)
        for kind, source in sources:
            count = (
                self.rules.load(str(source))
                if kind == "text"
                else self.rules.load_from_uri(str(source))
            )
            if count < 0:
                raise RuntimeError(f"{source}: {self.rules.get_parser_error().strip()}")
        self.known_ids = _known(sources)
        self._next = 0

    def evaluate(self, request: Request) -> tuple[int, list[str]]:
        self._next += 1
        self._lines.clear()
        body = request["body"].encode()
        tx = self.module.Transaction(self.engine, self.rules, f"bench{self._next}")
        tx.process_connection("198.18.0.1", 40000, "198.18.0.2", 443)
        tx.process_uri(request["target"], request["method"], "1.1")
        for name, value in request["headers"]:
            tx.add_request_header(name, value)
        tx.process_request_headers()
        found = tx.intervention()
        if found is None:
            if body:
                tx.append_request_body(body)
            tx.process_request_body()
            found = tx.intervention()
        lines = list(self._lines)
        if found is None:
            return 0, lines
        return found.status, [*lines, found.log or ""]

    def close(self) -> None:
        self.engine.set_log_callback(None)


def pypi_library() -> str:
    """The libmodsecurity the PyPI wheel bundles (for ctypes-pypi-so)."""
    import libmodsecurity  # type: ignore[import-not-found, unused-ignore]

    libs = Path(libmodsecurity.__file__).resolve().parent.parent / "libmodsecurity.libs"
    found = sorted(libs.glob("libmodsecurity-*.so*"))
    if not found:
        raise RuntimeError(f"no bundled libmodsecurity in {libs}")
    return str(found[0])


def driver(name: str, full: bool = False) -> Driver:
    if name == "ctypes":
        return CtypesDriver(full=full)
    if name == "pypi":
        return PypiDriver(full)
    if name == "ctypes-pypi-so":
        return CtypesDriver(pypi_library(), full)
    raise ValueError(name)


def reference() -> CtypesDriver:
    """What the regression corpus's expectations come from: the proxy's engine."""
    return CtypesDriver()


def findings(engine: Driver, request: Request) -> dict[str, Any]:
    status, lines = engine.evaluate(request)
    found = matched(lines, engine.known_ids)
    return {
        "status": status,
        "score": found.score,
        "matches": sorted([m.rule_id, m.variable, m.points] for m in found.matches),
    }


def evaluate(engine: Driver, request: Request) -> tuple[int, list[str]]:
    """The verdict and the ids of the rules that matched (sorted, unique)."""
    result = findings(engine, request)
    return result["status"], sorted({rule for rule, _, _ in result["matches"]}, key=int)


def corpus() -> list[Request]:
    """The regression corpus as written, and the API corpora with the headers their
    sender adds (Host, Accept, Content-Length)."""
    requests = [json.loads(line) for line in REGRESSION.read_text().splitlines()]
    for path in API_CORPORA:
        for line in path.read_text().splitlines():
            raw = json.loads(line)
            headers = [["Host", "api.example.com"], ["Accept", "application/json"]]
            headers += raw["headers"]
            if raw["body"]:
                headers.append(["Content-Length", str(len(raw["body"].encode()))])
            requests.append({**raw, "headers": headers})
    return requests


# -- one engine, in its own process ------------------------------------------------------


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_requests(requests: list[Request]) -> list[Request]:
    """What the cost is measured on: the regression corpus and every TIMED_EVERY-th
    request of the API corpora (the findings are compared on all of them)."""
    regression = [r for r in requests if r["id"].startswith("r")]
    api = [r for r in requests if not r["id"].startswith("r")]
    return regression + api[::TIMED_EVERY]


def worker(name: str, passes: int, with_findings: bool) -> dict[str, Any]:
    requests = corpus()
    timed = timed_requests(requests)
    out: dict[str, Any] = {"engine": name, "requests": len(requests), "timed": len(timed)}
    if with_findings:
        try:
            driver(name, full=True).close()
            out["full_crs"] = "loads"
        except Exception as exc:  # the engine's own message is the result
            out["full_crs"] = str(exc).strip().splitlines()[0][:300]
    engine = driver(name)
    out["version"] = engine.version
    try:
        if with_findings:
            out["findings"] = {r["id"]: findings(engine, r) for r in requests}

        def one_pass() -> None:
            for request in timed:
                engine.evaluate(request)

        def passes_over() -> None:
            for _ in range(passes):
                one_pass()

        one_pass()  # warm-up
        cpu = time.process_time()
        elapsed = _timed(passes_over)
        cpu = time.process_time() - cpu
        out["us_per_request"] = elapsed / (passes * len(timed)) * 1e6
        out["cpu_us_per_request"] = cpu / (passes * len(timed)) * 1e6
        out["loop_share"] = _loop_share(engine)
    finally:
        engine.close()
    return out


def _loop_share(engine: Driver) -> float:
    """How much a pure-Python thread (an event loop, say) gets done while another thread
    is in one long engine call, against the same time alone: near 1 (less on a busy
    host) when the binding lets go of the GIL in the engine's calls, near 0 when it
    holds it."""
    stop = threading.Event()

    def spin(counts: list[int]) -> None:
        n = 0
        while not stop.is_set():
            n += 1
        counts.append(n)

    def spun(during: Callable[[], object]) -> float:
        counts: list[int] = []
        stop.clear()
        spinner = threading.Thread(target=spin, args=(counts,))
        spinner.start()
        elapsed = _timed(during)
        stop.set()
        spinner.join()
        return counts[0] / elapsed

    # one long call into the engine (a big JSON body: the time is in process_body),
    # so that what the spinner gets is what it gets while the engine's call runs
    text = " ".join(f"lorem ipsum dolor {n} sit amet" for n in range(12_000))
    big = {
        "id": "big",
        "method": "POST",
        "target": "/api/notes",
        "headers": [
            ["Host", "api.example.com"],
            ["Content-Type", "application/json"],
            ["Content-Length", str(len(json.dumps({"note": text})))],
        ],
        "body": json.dumps({"note": text}),
    }
    busy = spun(lambda: engine.evaluate(big))
    alone = spun(lambda: time.sleep(0.3))
    return busy / alone


# -- the comparison ----------------------------------------------------------------------


def _run_worker(name: str, passes: int, with_findings: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.waf_engines", "--worker", name]
    command += ["--passes", str(passes)] + (["--findings"] if with_findings else [])
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for request_id, mine in a.items():
        theirs = b.get(request_id)
        if theirs != mine:
            out.append({"id": request_id, "a": mine, "b": theirs})
    return out


def compare(rounds: int, passes: int) -> dict[str, Any]:
    available = [e for e in ENGINES if e == "ctypes" or _has_pypi()]
    samples: dict[str, list[dict[str, Any]]] = {e: [] for e in available}
    for round_number in range(rounds):
        order = random.sample(available, len(available))
        for name in order:
            samples[name].append(_run_worker(name, passes, with_findings=round_number == 0))
    first = {name: runs[0] for name, runs in samples.items()}
    reference_findings = first["ctypes"]["findings"]
    result: dict[str, Any] = {
        "command": COMMAND + f" --rounds {rounds} --passes {passes}",
        "date": now_iso(),
        "source": source_revision(SOURCES),
        "machine": machine(PACKAGES),
        "requests": first["ctypes"]["requests"],
        "timed": first["ctypes"]["timed"],
        "load_average": os.getloadavg(),
        "engines": {},
    }
    for name, runs in samples.items():
        costs = [run["us_per_request"] for run in runs]
        cpu = [run["cpu_us_per_request"] for run in runs]
        shares = [run["loop_share"] for run in runs]
        diff = differences(reference_findings, first[name]["findings"])
        result["engines"][name] = {
            "version": first[name]["version"],
            "full_crs": first[name]["full_crs"],
            "us_per_request": statistics.median(costs),
            "us_range": [min(costs), max(costs)],
            "cpu_us_per_request": statistics.median(cpu),
            "cpu_us_range": [min(cpu), max(cpu)],
            "loop_share": statistics.median(shares),
            "loop_share_range": [min(shares), max(shares)],
            "same_findings": first[name]["requests"] - len(diff),
            "differences": diff,
        }
    return result


def _has_pypi() -> bool:
    try:
        import libmodsecurity  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "## ModSecurity from Python: stockade's ctypes binding vs PyPI `libmodsecurity`",
        "",
        "Not part of `make bench`: run by hand, after `.venv/bin/pip install "
        "libmodsecurity` (installed for this comparison only; stockade does not depend "
        "on it).",
        "",
        f"Run {result['date']} on stockade {result.get('source', '?')} with "
        f"`{result['command']}` (total {result['total_s']:.0f} s).",
        f"Machine: {m['cpu']}, {m['memory']}, {m['os']}, kernel {m['kernel']}, "
        f"Python {m['python']}; {m['packages']}.",
        "",
        f"{result['requests']} requests (tests/waf/corpus: crs_regression.jsonl, a request "
        "per CRS rule and clean ones, and the API corpora), CRS 3.3.4 at paranoia level 1 "
        "without REQUEST-910; findings (verdict, every rule match with its variable and "
        "points, CRS's score) compared request by request against `ctypes`. Cost on "
        f"{result['timed']} of them (the regression corpus and every {TIMED_EVERY}th API "
        "request), each engine in a process of its own, once per round in a shuffled "
        "order: wall and CPU microseconds per request on one thread, median over rounds "
        "(min-max); loop share = how far a pure-Python thread counts while the engine "
        "runs on another, against alone (near 1 when the binding lets go of the GIL in "
        "the engine's calls, as the proxy's event loop needs; near 0 when it holds it). "
        f"Load average at the end: {result['load_average'][0]:.1f}.",
        "",
        "| engine | library | loads stockade's CRS | same findings | wall µs | CPU µs "
        "| loop share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, data in result["engines"].items():
        low, high = data["us_range"]
        cpu_low, cpu_high = data["cpu_us_range"]
        least, most = data["loop_share_range"]
        loads = "yes" if data["full_crs"] == "loads" else f"no: {_load_note(data['full_crs'])}"
        lines.append(
            f"| {name} | {data['version']} | {loads} | "
            f"{data['same_findings']} / {result['requests']} | "
            f"{data['us_per_request']:.0f} ({low:.0f}-{high:.0f}) | "
            f"{data['cpu_us_per_request']:.0f} ({cpu_low:.0f}-{cpu_high:.0f}) | "
            f"{data['loop_share']:.2f} ({least:.2f}-{most:.2f}) |"
        )
    for name, data in result["engines"].items():
        for diff in data["differences"][:10]:
            lines.append(
                f"- {name} differs on {diff['id']}: ctypes {diff['a']}, {name} {diff['b']}"
            )
    lines += ["", *_decision(result), ""]
    return "\n".join(lines)


def _decision(result: dict[str, Any]) -> list[str]:
    """What docs/proxy.md says was decided, and why, with this run's numbers."""
    engines = result["engines"]
    pypi = engines.get("pypi")
    if pypi is None:
        return ["The PyPI package was not installed: only stockade's binding was measured."]
    ours = engines["ctypes"]
    return [
        "**Decision: stockade keeps its ctypes binding and Debian's libmodsecurity3.** The "
        f"PyPI wheel gives the same findings on {pypi['same_findings']} of "
        f"{result['requests']} requests, and on one thread costs "
        f"{_versus(pypi['cpu_us_per_request'], ours['cpu_us_per_request'])} "
        f"({pypi['cpu_us_per_request']:.0f} against {ours['cpu_us_per_request']:.0f} µs of "
        f"CPU per request{_newer(engines)}); but its binding keeps the GIL for the whole "
        "of each engine call (loop share "
        f"{pypi['loop_share']:.2f} against {ours['loop_share']:.2f}), so on the proxy's "
        "engine threads every inspection would stop the worker's event loop for as long "
        "as it runs (a millisecond or more with CRS); its engine is built without "
        "GeoIP/MaxMind, so CRS's REQUEST-910 as Debian ships it is a parse error and the "
        "crs mode would not start; and the wheel bundles its own libxml2 2.9.7 (which "
        "parses XML request bodies), libcurl and OpenSSL 1.1.1k, which Debian's security "
        "updates never reach, where Debian's 3.0.9 carries upstream's security fixes as "
        "patches. Should a newer engine be wanted, stockade's binding loads another "
        "libmodsecurity.so.3 as it is (`[proxy.waf] library`), as the `ctypes-pypi-so` "
        "row does."
    ]


def _load_note(error: str) -> str:
    """The engine's parse error, short: the file and what it said."""
    found = re.search(r"(REQUEST-[\w.-]+\.conf)\b.*Column: \d+\. (.*)", error)
    return f"{found.group(1)}: {found.group(2).strip()}" if found else error[-120:]


def _versus(theirs: float, ours: float) -> str:
    """How one cost compares with another, with this host's noise (about 10%) in mind."""
    change = theirs / ours - 1
    if abs(change) < 0.1:
        return "about the same as stockade's"
    return f"{abs(change):.0%} {'less' if change < 0 else 'more'} than stockade's"


def _newer(engines: dict[str, Any]) -> str:
    mixed = engines.get("ctypes-pypi-so")
    if mixed is None:
        return ""
    return f"; stockade's binding on the wheel's newer library: {mixed['cpu_us_per_request']:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--passes", type=int, default=PASSES)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--findings", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.passes < 1:
        parser.error("--rounds and --passes must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.passes, args.findings)))
        return
    started = time.monotonic()
    result = compare(args.rounds, args.passes)
    result["total_s"] = time.monotonic() - started
    from bench import report

    path = save_results(NAME, result)
    print(render(result))
    print(f"{NAME}: results in {path}; README in {report.write_readme()}", file=sys.stderr)


if __name__ == "__main__":
    main()
