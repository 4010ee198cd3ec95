"""The zero-trust mode: a request passes only if its route's OpenAPI 3 document allows it.

openapi-core does the validation: the path and method must be declared
(matched under the document's servers), path, query, header and cookie
parameters must fit their schemas, required ones must be there, the body's
media type must be declared and a JSON body must fit its schema, and a
declared security requirement must be met. Two checks are ours, since a
positive model allows nothing it was not told of: a query parameter that
the operation does not declare is refused, and so is a body sent to an
operation that declares none.

The answer to the client names the check that failed (and, for a declared
parameter, its name from the document); the detail for the log is clipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema_path import SchemaPath
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.exceptions import PathError
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.validation.request.exceptions import (
    MissingRequiredParameter,
    MissingRequiredRequestBody,
    ParameterValidationError,
    RequestBodyValidationError,
    SecurityValidationError,
)
from werkzeug.datastructures import Headers, ImmutableMultiDict

from stockade.proxy.waf.findings import clip

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
MAX_DETAIL = 200


class OpenApiError(ValueError):
    """The document cannot be read or is not a valid OpenAPI 3 document."""


@dataclass(frozen=True)
class Violation:
    reason: str  # a stable code: undeclared_operation, invalid_parameter, ...
    message: str  # for the client: the check, and a declared name at most
    detail: str  # for the log, clipped


@dataclass
class ApiRequest:
    """A request in the shape openapi-core reads (its Request protocol)."""

    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None


@dataclass(frozen=True)
class RequestFacts:
    """What the check needs of a request, taken on the event loop."""

    scheme: str
    host: str
    path: str
    method: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    cookies: tuple[tuple[str, str], ...]
    content_type: str


def load_document(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OpenApiError(f"cannot read the OpenAPI document {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise OpenApiError(f"{path}: not JSON or YAML: {clip(str(exc), MAX_DETAIL)}") from None
    if not isinstance(data, dict):
        raise OpenApiError(f"{path}: not an OpenAPI document (no top-level object)")
    return data


def _query_names(parameters: Iterable[SchemaPath]) -> set[str]:
    return {str(p["name"]) for p in parameters if p["in"] == "query"}


class OpenApiGate:
    """One route's document, loaded and checked once; check() per request."""

    def __init__(self, path: Path) -> None:
        document = load_document(path)
        try:
            self.api = OpenAPI.from_dict(document)
        except Exception as exc:  # openapi-spec-validator's errors have no common base
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OpenApiError(
                f"{path}: not a valid OpenAPI 3 document: {clip(first, 300)}"
            ) from None
        self.path = path
        self.finder = APICallPathFinder(self.api.spec)
        # (path template, method) -> the query parameters it declares
        self.query_names: dict[tuple[str, str], frozenset[str]] = {}
        for template, item in (self.api.spec / "paths").items():
            shared = _query_names(item / "parameters") if (item / "parameters").exists() else set()
            for method in METHODS:
                operation = item / method
                if not operation.exists():
                    continue
                own = operation / "parameters"
                names = shared | (_query_names(own) if own.exists() else set())
                self.query_names[(str(template), method)] = frozenset(names)

    def check(self, facts: RequestFacts, body: bytes | None) -> Violation | None:
        """None if the document allows the request, else what it breaks."""
        method = facts.method.lower()
        host_url = f"{facts.scheme}://{facts.host}"
        try:
            found = self.finder.find(method, host_url + facts.path)
        except PathError as exc:
            return Violation("undeclared_operation", "operation not declared", str(exc))
        template = str(found.path.parts[-1])
        declared = self.query_names.get((template, method), frozenset())
        unknown = [name for name, _ in facts.query if name not in declared]
        if unknown:
            return Violation(
                "unknown_parameter",
                "query parameter not declared",
                f"{method.upper()} {template}: {clip(unknown[0], 64)!r}",
            )
        if body and not (found.operation / "requestBody").exists():
            return Violation(
                "unexpected_body", "the operation takes no body", f"{method.upper()} {template}"
            )
        request = ApiRequest(
            host_url=host_url,
            path=facts.path,
            method=method,
            parameters=RequestParameters(
                query=ImmutableMultiDict(list(facts.query)),
                header=Headers(list(facts.headers)),
                cookie=ImmutableMultiDict(list(facts.cookies)),
            ),
            content_type=facts.content_type,
            body=body if body else None,
        )
        try:
            self.api.validate_request(request)
        except Exception as exc:
            return _violation(exc, f"{method.upper()} {template}")
        return None


def _violation(exc: Exception, operation: str) -> Violation:
    detail = f"{operation}: {clip(str(exc), MAX_DETAIL)}"
    if isinstance(exc, MissingRequiredParameter):
        return Violation("missing_parameter", f"required parameter {exc.name!r} missing", detail)
    if isinstance(exc, ParameterValidationError):
        return Violation("invalid_parameter", f"parameter {exc.name!r} is invalid", detail)
    if isinstance(exc, MissingRequiredRequestBody):
        return Violation("missing_body", "a request body is required", detail)
    if isinstance(exc, RequestBodyValidationError):
        if isinstance(exc.__cause__, MediaTypeNotFound):
            return Violation("unsupported_media_type", "media type not declared", detail)
        return Violation("invalid_body", "the request body does not fit the schema", detail)
    if isinstance(exc, SecurityValidationError):
        return Violation("invalid_security", "declared credentials missing", detail)
    if isinstance(exc, PathError):
        return Violation("undeclared_operation", "operation not declared", detail)
    return Violation("invalid_request", "the request does not fit the API", detail)
