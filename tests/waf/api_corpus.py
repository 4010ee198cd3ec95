"""The API corpora of tests/waf/corpus as raw requests, and their generator."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

CORPUS = Path(__file__).resolve().parent / "corpus"
HOST = "api.example.com"


def generator() -> ModuleType:
    """tests/waf/corpus/make_corpus.py, which wrote the files."""
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Request:
    id: str
    kind: str
    route: str  # "api" or "graphql"
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    category: str = ""  # attacks: sqli, xss, ...
    place: str = ""  # attacks: where the payload is
    payload: str = ""

    @classmethod
    def of(cls, line: dict[str, Any]) -> Request:
        return cls(
            id=line.get("id", "-"),
            kind=line["kind"],
            route=line["route"],
            method=line["method"],
            target=line["target"],
            headers=tuple((name, value) for name, value in line["headers"]),
            body=line["body"].encode(),
            category=line.get("category", ""),
            place=line.get("place", ""),
            payload=line.get("payload", ""),
        )

    def raw(self, prefix: str) -> bytes:
        """The request as bytes on the wire, under a route's path prefix."""
        lines = [f"{self.method} {prefix}{self.target} HTTP/1.1", f"Host: {HOST}"]
        lines.append("Accept: application/json")
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + self.body


def load(name: str) -> list[Request]:
    text = (CORPUS / name).read_text(encoding="utf-8")
    return [Request.of(json.loads(line)) for line in text.splitlines()]


def benign() -> list[Request]:
    return load("benign_api.jsonl")


def attacks() -> list[Request]:
    return load("attacks.jsonl")
