"""The zero-trust mode: a request passes only if its route's OpenAPI 3 document allows it.

openapi-core finds the operation and validates path, query, header and
cookie parameters and JSON and form bodies against their schemas. What it
leaves open, stockade closes, since a positive model allows nothing it was
not told of:

- Security requirements are checked here, against the credentials the
  route's auth verified (openapi_security.py); a requirement no auth of the
  route can verify refuses the document when the config is loaded.
- Every value of every parameter is checked. openapi-core reads the first
  of repeated values, so a parameter that arrives more than once is refused
  unless the document makes it an exploded array (form style, explode true:
  `?id=1&id=2`), whose every item is then validated; a header parameter
  sent on several lines is refused unless it is an array (the lines are then
  one comma-separated list). The query is parsed from the bytes the
  upstream gets (`&` separated, `+` a space, strict UTF-8; a raw `;`, a
  separator to some parsers, is refused), cookies from every Cookie line.
- A query parameter the operation does not declare is refused; undeclared
  headers and cookies pass unchecked (clients and proxies add their own).
- A body sent to an operation that declares none is refused. JSON bodies
  are parsed strictly (UTF-8, no duplicate member names, no NaN/Infinity);
  a form body may repeat only array fields; XML bodies are read through the
  schema's `xml` objects (openapi_xml.py).
- A path parameter is never empty, and is checked percent-decoded, as the
  upstream reads it.
- Operations match under the paths of the document's `servers` (absolute
  URLs included: the route decides which hosts and listeners reach the
  document), or under the route's `openapi_base_path`, which replaces them.

The answer to the client names the check that failed (and, for a declared
parameter, its name from the document); the detail for the log is clipped.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import yaml
from jsonschema_path import SchemaPath
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.util import data_form_loads
from openapi_core.exceptions import OpenAPIError
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.datatypes import PathOperationServer
from openapi_core.templating.paths.exceptions import PathError
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.validation.request.exceptions import (
    MissingRequiredParameter,
    MissingRequiredRequestBody,
    ParameterValidationError,
    RequestBodyValidationError,
)
from openapi_core.validation.request.validators import BaseAPICallRequestValidator
from werkzeug.datastructures import Headers, ImmutableMultiDict

from stockade.proxy.waf.findings import clip
from stockade.proxy.waf.openapi_security import (
    Presented,
    Requirements,
    RouteAccess,
    SecurityLoadError,
    check_security,
    requirements_for,
)
from stockade.proxy.waf.openapi_xml import (
    XML_MEDIA_TYPE,
    XmlBodyError,
    XmlSchemaError,
    check_schema,
    parse,
    to_instance,
)

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
MAX_DETAIL = 200
MAX_QUERY_FIELDS = 1000
HOST_URL = "http://gateway"  # servers are paths only (rebase): hosts never decide
MAX_SERVER_PATHS = 64  # server URL variables expanded to their enum values, at most this many
JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.-]+\+)?json")
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
_VARIABLE = re.compile(r"\{([^{}]*)\}")


class OpenApiError(ValueError):
    """The document cannot be read, is not a valid OpenAPI 3 document, or asks for a check
    stockade cannot make on the route."""


@dataclass(frozen=True)
class Violation:
    reason: str  # a stable code: undeclared_operation, invalid_parameter, ...
    message: str  # for the client: the check, and a declared name at most
    detail: str  # for the log, clipped
    status: int = 403  # 401: the credentials the operation requires are missing
    challenge: str = ""  # WWW-Authenticate, with 401 and insufficient_scope


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

    path: str  # normalized, as the upstream gets it
    method: str
    raw_query: str  # as sent, as the upstream gets it
    headers: tuple[tuple[str, str], ...]  # every line, in order
    content_type: str
    presented: Presented = field(default_factory=lambda: Presented(api_key=False, scopes=None))


class BodyError(OpenAPIError):
    """A body stockade does not accept as its media type (JSON, form)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- reading the document -----------------------------------------------------------


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


def server_paths(server: Any, where: str) -> list[str]:
    """The base paths a server object stands for: its URL without scheme and host, each
    variable replaced by its enum values (or its default when it has none)."""
    url = server.get("url") if isinstance(server, dict) else None
    if not isinstance(url, str):
        raise OpenApiError(f"{where}: a server without a url")
    if "://" in url or url.startswith("//"):
        rest = url.split("//", 1)[1]
        path = rest[rest.index("/") :] if "/" in rest else "/"
    elif url.startswith("/"):
        path = url
    else:
        raise OpenApiError(
            f"{where}: server url {url!r} is relative to where the document is served; "
            "set the route's openapi_base_path"
        )
    path = path.split("?", 1)[0].split("#", 1)[0]
    variables = server.get("variables") or {}
    choices: list[list[str]] = []
    for name in _VARIABLE.findall(path):
        variable = variables.get(name) if isinstance(variables, dict) else None
        if not isinstance(variable, dict):
            raise OpenApiError(f"{where}: server url {url!r}: variable {name!r} not declared")
        values = variable.get("enum") or [variable.get("default")]
        if not all(isinstance(v, str) for v in values):
            raise OpenApiError(f"{where}: server variable {name!r} needs a default")
        choices.append([str(v) for v in values])
    paths = []
    pieces = _VARIABLE.split(path)  # literal, name, literal, name, ..., literal
    for combination in itertools.islice(itertools.product(*choices), MAX_SERVER_PATHS + 1):
        pieces[1::2] = combination
        paths.append("".join(pieces).rstrip("/") or "/")
    if len(paths) > MAX_SERVER_PATHS:
        raise OpenApiError(f"{where}: server url {url!r} stands for too many paths")
    return paths


def rebase(document: dict[str, Any], base_path: str | None, path: Path) -> dict[str, Any]:
    """A copy whose servers are base paths: the route's, or the document's without hosts."""
    document = copy.deepcopy(document)
    items = document.get("paths")
    holders: list[dict[str, Any]] = [document]
    if isinstance(items, dict):
        for item in items.values():
            if isinstance(item, dict):
                holders.append(item)
                holders += [op for m, op in item.items() if m in METHODS and isinstance(op, dict)]
    for holder in holders:
        servers = holder.get("servers")
        if base_path is not None:
            holder.pop("servers", None)
        elif isinstance(servers, list) and servers:
            paths = [p for s in servers for p in server_paths(s, str(path))]
            holder["servers"] = [{"url": p} for p in dict.fromkeys(paths)]
    if base_path is not None:
        document["servers"] = [{"url": base_path}]
    return document


@dataclass(frozen=True)
class Parameter:
    name: str
    location: str  # query, header, cookie, path
    repeatable: bool  # an exploded form array: each occurrence is one item
    array: bool
    deep_object: bool  # query style deepObject: sent as NAME[PROP]=...


@dataclass(frozen=True)
class Operation:
    template: str
    method: str
    query: dict[str, Parameter]
    deep_objects: frozenset[str]
    headers: dict[str, Parameter]  # by lowercase name
    cookies: dict[str, Parameter]
    has_body: bool
    contents: dict[str, Any]  # the raw operation object (security)

    @property
    def name(self) -> str:
        return f"{self.method.upper()} {self.template}"


def _schema_type(param: SchemaPath, where: str) -> str:
    schema = param / "schema"
    if not schema.exists():
        return ""  # a `content` parameter: one value, decoded as its media type
    types = (schema / "type").read_str_or_list("")
    if isinstance(types, str):
        return types
    single = [t for t in types if t != "null"]
    if len(single) != 1:
        raise OpenApiError(f"{where}: a parameter of several types ({types}) cannot be read")
    return single[0]


def _parameter(param: SchemaPath, where: str) -> Parameter:
    name, location = str(param["name"]), str(param["in"])
    where = f"{where}: {location} parameter {name!r}"
    kind = _schema_type(param, where)
    default_style = "simple" if location in ("path", "header") else "form"
    style = str(param["style"]) if "style" in param else default_style
    explode = bool(param["explode"]) if "explode" in param else style == "form"
    unsupported = (
        (location == "path" and style != "simple")
        or (location == "query" and style == "spaceDelimited")
        or (location == "query" and style == "form" and explode and kind == "object")
        or (style == "deepObject" and kind != "object")
    )
    if unsupported:
        raise OpenApiError(
            f"{where}: style {style!r} (explode {str(explode).lower()}) for a "
            f"{kind or 'content'} parameter is not supported; zero trust cannot check it"
        )
    return Parameter(
        name=name,
        location=location,
        repeatable=location in ("query", "cookie")
        and style == "form"
        and explode
        and kind == "array",
        array=kind == "array",
        deep_object=style == "deepObject",
    )


def _operations(api: OpenAPI, path: Path) -> dict[tuple[str, str], Operation]:
    operations: dict[tuple[str, str], Operation] = {}
    for template, item in (api.spec / "paths").str_items():
        shared = list(item / "parameters") if (item / "parameters").exists() else []
        for method in METHODS:
            node = item / method
            if not node.exists():
                continue
            where = f"{path}, {method.upper()} {template}"
            own = list(node / "parameters") if (node / "parameters").exists() else []
            declared: dict[tuple[str, str], Parameter] = {}
            for param in own + shared:  # the operation's own override the path item's
                parameter = _parameter(param, where)
                declared.setdefault((parameter.location, parameter.name), parameter)
            parameters = tuple(declared.values())
            operations[(template, method)] = Operation(
                template=template,
                method=method,
                query={p.name: p for p in parameters if p.location == "query"},
                deep_objects=frozenset(
                    p.name for p in parameters if p.location == "query" and p.deep_object
                ),
                headers={p.name.lower(): p for p in parameters if p.location == "header"},
                cookies={p.name: p for p in parameters if p.location == "cookie"},
                has_body=(node / "requestBody").exists(),
                contents=cast(dict[str, Any], node.read_value()),
            )
            if (node / "requestBody").exists():
                _check_body(node / "requestBody", where)
    return operations


def _check_body(request_body: SchemaPath, where: str) -> None:
    """Refuse at load what a body of the operation could not be checked against."""
    content = request_body / "content"
    for media_type, entry in content.str_items() if content.exists() else ():
        base = media_type.split(";", 1)[0].strip().lower()
        if XML_MEDIA_TYPE.fullmatch(base) and (entry / "schema").exists():
            try:
                check_schema(entry / "schema", f"{where}: {media_type}")
            except XmlSchemaError as exc:
                raise OpenApiError(str(exc)) from None
        if base in (FORM, MULTIPART) and (entry / "encoding").exists():
            raise OpenApiError(
                f"{where}: {media_type}: per-field `encoding` is not supported; zero trust "
                "cannot check it"
            )


# -- openapi-core, with zero trust's changes -------------------------------------------


def _reject_constant(name: str) -> Any:
    raise BodyError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:  # parsers disagree on which one counts
            raise BodyError(f"JSON member {clip(name, 64)!r} given more than once")
        members[name] = value
    return members


def strict_json(raw: bytes | str) -> Any:
    """JSON as every parser reads it alike: UTF-8, unique member names, finite numbers."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_unique_members, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"not JSON: {clip(str(exc), 80)}") from None


def _form_pairs(raw: bytes | str, base: str, parameters: dict[str, str]) -> list[tuple[str, Any]]:
    if base == FORM:
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            return parse_qsl(
                text, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS
            )
        except ValueError as exc:
            raise BodyError(f"not a form: {clip(str(exc), 80)}") from None
    try:
        data = raw if isinstance(raw, bytes) else raw.encode()
        form = cast(ImmutableMultiDict[str, bytes], data_form_loads(data, **parameters))
        return list(form.items(multi=True))
    except (ValueError, AssertionError) as exc:
        raise BodyError(f"not multipart form data: {clip(str(exc), 80)}") from None


class StrictRequestValidator(BaseAPICallRequestValidator):
    """openapi-core's request validator with zero trust's own body readers; security is
    the gate's (openapi-core passes what it cannot check)."""

    def _get_security(self, parameters: RequestParameters, operation: SchemaPath) -> dict[str, str]:
        return {}

    def _get_content_schema_value_and_schema(
        self, raw: bytes, content: SchemaPath, mimetype: str | None = None
    ) -> tuple[Any, SchemaPath | None]:
        declared, parameters, media_type = self._find_media_type(content, mimetype)
        base = (mimetype or declared).split(";", 1)[0].strip().lower()
        schema = media_type / "schema" if "schema" in media_type else None
        if XML_MEDIA_TYPE.fullmatch(base):
            charset = parameters.get("charset", "utf-8").lower()
            if charset != "utf-8":
                raise XmlBodyError(f"XML in {charset}: only UTF-8 is accepted")
            root = parse(raw if isinstance(raw, bytes) else raw.encode())
            return (to_instance(root, schema) if schema is not None else None), schema
        if JSON_MEDIA_TYPE.fullmatch(base):
            return strict_json(raw), schema
        if base in (FORM, MULTIPART) and schema is not None:
            return self._form(raw, base, dict(parameters), content, mimetype, schema)
        return super()._get_content_schema_value_and_schema(raw, content, mimetype)

    def _form(
        self,
        raw: bytes,
        base: str,
        parameters: dict[str, str],
        content: SchemaPath,
        mimetype: str | None,
        schema: SchemaPath,
    ) -> tuple[Any, SchemaPath | None]:
        pairs = _form_pairs(raw, base, parameters)
        properties = schema / "properties"
        arrays = {
            name
            for name, prop in (properties.str_items() if properties.exists() else ())
            if (prop / "type").read_str_or_list("") == "array"
        }
        counts: dict[str, int] = {}
        for name, _ in pairs:
            counts[name] = counts.get(name, 0) + 1
            if counts[name] > 1 and name not in arrays:
                raise BodyError(f"form field {clip(name, 64)!r} given more than once")
        value, schema_out = super()._get_content_schema_value_and_schema(raw, content, mimetype)
        if isinstance(value, dict):
            # openapi-core reads only declared fields; the others are the schema's to judge
            declared = set(properties.str_keys()) if properties.exists() else set()
            for name, field in pairs:
                if name not in declared:
                    value[name] = (
                        field.decode("utf-8", "replace") if isinstance(field, bytes) else field
                    )
        return value, schema_out

    def errors(self, request: ApiRequest, found: PathOperationServer) -> list[Exception]:
        """The parameter and body errors of a request on the operation found for it."""
        return list(itertools.islice(self._iter_errors(request, found.operation, found.path), 1))


@dataclass(frozen=True)
class _Found:
    operation: Operation
    found: PathOperationServer


class OpenApiDocument:
    """One document under one base path, loaded and checked once (shared by routes)."""

    def __init__(self, path: Path, base_path: str | None = None) -> None:
        document = rebase(load_document(path), base_path, path)
        try:
            self.api = OpenAPI.from_dict(document)
        except Exception as exc:  # openapi-spec-validator's errors have no common base
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OpenApiError(
                f"{path}: not a valid OpenAPI 3 document: {clip(first, 300)}"
            ) from None
        self.path = path
        spec = self.api.spec
        self.security: Any = document.get("security")  # the default for operations
        schemes = spec / "components" / "securitySchemes"
        self.schemes: dict[str, Any] = (
            {name: scheme.read_value() for name, scheme in schemes.str_items()}
            if schemes.exists()
            else {}
        )
        self.finder = APICallPathFinder(self.api.spec)
        self.operations = _operations(self.api, path)
        base = self.api.request_validator_cls
        if base is None:
            raise OpenApiError(f"{path}: openapi-core cannot validate requests of this version")
        validator_class = type("ZeroTrustValidator", (StrictRequestValidator, base), {})
        self.validator = cast(StrictRequestValidator, validator_class(self.api.spec))


class OpenApiGate:
    """One route's view of a document: its security checked against the route's auth."""

    def __init__(self, document: OpenApiDocument, access: RouteAccess) -> None:
        self.document = document
        self.access = access
        self.security: dict[tuple[str, str], Requirements] = {}
        for key, operation in document.operations.items():
            where = f"route {access.route!r}, {document.path}, {operation.name}"
            try:
                self.security[key] = requirements_for(
                    document.security, operation.contents, document.schemes, access, where
                )
            except SecurityLoadError as exc:
                raise OpenApiError(str(exc)) from None

    def check(self, facts: RequestFacts, body: bytes | None) -> Violation | None:
        """None if the document allows the request, else what it breaks."""
        method = facts.method.lower()
        try:
            found = self.document.finder.find(method, HOST_URL + facts.path)
        except PathError as exc:
            return Violation("undeclared_operation", "operation not declared", str(exc))
        template = str(found.path.parts[-1])
        operation = self.document.operations[(template, method)]
        failure = check_security(
            self.security[(template, method)],
            facts.presented,
            self.access.api_key_header,
            operation.name,
        )
        if failure is not None:
            return Violation(
                failure.reason, failure.message, failure.detail, failure.status, failure.challenge
            )
        try:
            parameters = _parameters(operation, facts, found)
        except _Refused as refused:
            return refused.violation
        if body and not operation.has_body:
            return Violation("unexpected_body", "the operation takes no body", operation.name)
        request = ApiRequest(
            host_url=HOST_URL,
            path=facts.path,
            method=method,
            parameters=parameters,
            content_type=facts.content_type,
            body=body if body else None,
        )
        try:
            errors = self.document.validator.errors(request, found)
        except Exception as exc:  # openapi-core's casters raise what they meet
            return _violation(exc, operation.name)
        return _violation(errors[0], operation.name) if errors else None


class _Refused(Exception):
    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.reason)
        self.violation = violation


def _cookies(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Every cookie of every Cookie line, raw (RFC 6265 5.4: "; " separated name=value)."""
    pairs = []
    for name, value in headers:
        if name.lower() != "cookie":
            continue
        for piece in value.split(";"):
            piece = piece.strip(" \t")
            if piece:
                cookie, _, content = piece.partition("=")
                pairs.append((cookie.strip(" \t"), content.strip(" \t")))
    return pairs


def _query(raw: str, operation: Operation) -> list[tuple[str, str]]:
    if ";" in raw:  # some upstreams split there too (form encoding sends %3B)
        raise _Refused(
            Violation(
                "invalid_parameter",
                "the query string cannot be read",
                f"{operation.name}: a raw ';' in the query, a separator to some parsers",
            )
        )
    try:
        pairs = parse_qsl(
            raw, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS
        )
    except ValueError as exc:  # UnicodeDecodeError included
        raise _Refused(
            Violation("invalid_parameter", "the query string cannot be read", str(exc))
        ) from None
    for name, _ in pairs:
        if name in operation.query:
            continue
        owner, bracket, rest = name.partition("[")
        if bracket and owner in operation.deep_objects and re.fullmatch(r"[^\[\]]+\]", rest):
            continue
        raise _Refused(
            Violation(
                "unknown_parameter",
                "query parameter not declared",
                f"{operation.name}: {clip(name, 64)!r}",
            )
        )
    return pairs


def _once(
    names: list[str], declared: dict[str, Parameter], operation: Operation, where: str
) -> None:
    """Refuse a parameter given more than once, unless it is an exploded array (each
    occurrence an item) or a header array (its lines one list). In the query, where
    every name is declared by now, this covers deepObject members too."""
    seen: set[str] = set()
    for name in names:
        parameter = declared.get(name)
        if parameter is None and where != "query":
            continue  # undeclared headers and cookies are not checked
        if parameter is not None and (
            parameter.repeatable or (where == "header" and parameter.array)
        ):
            continue
        if name in seen:
            shown = parameter.name if parameter is not None else name
            raise _Refused(
                Violation(
                    "repeated_parameter",
                    f"parameter {clip(shown, 64)!r} given more than once",
                    f"{operation.name}: {where} {clip(shown, 64)!r} repeated",
                )
            )
        seen.add(name)


def _parameters(
    operation: Operation, facts: RequestFacts, found: PathOperationServer
) -> RequestParameters:
    query = _query(facts.raw_query, operation)
    _once([name for name, _ in query], operation.query, operation, "query")
    _once([name.lower() for name, _ in facts.headers], operation.headers, operation, "header")
    cookies = _cookies(facts.headers)
    _once([name for name, _ in cookies], operation.cookies, operation, "cookie")
    path: dict[str, str] = {}
    for name, value in found.path_result.variables.items():
        try:
            decoded = unquote(value, errors="strict")
        except UnicodeDecodeError:
            decoded = ""
        if not decoded:
            raise _Refused(
                Violation(
                    "invalid_parameter",
                    f"parameter {name!r} is invalid",
                    f"{operation.name}: path parameter {name!r} empty or not UTF-8",
                )
            )
        path[name] = decoded
    headers = Headers()
    for name, value in facts.headers:
        parameter = operation.headers.get(name.lower())
        if parameter is not None and parameter.array and name in headers:
            headers[name] = f"{headers[name]},{value}"  # one list, as RFC 9110 5.3 joins lines
        else:
            headers.add(name, value)
    return RequestParameters(
        query=ImmutableMultiDict(query),
        header=headers,
        cookie=ImmutableMultiDict(cookies),
        path=path,
    )


def _violation(exc: Exception, operation: str) -> Violation:
    detail = f"{operation}: {clip(str(exc), MAX_DETAIL)}"
    if isinstance(exc, MissingRequiredParameter):
        return Violation("missing_parameter", f"required parameter {exc.name!r} missing", detail)
    if isinstance(exc, ParameterValidationError):
        return Violation("invalid_parameter", f"parameter {exc.name!r} is invalid", detail)
    if isinstance(exc, MissingRequiredRequestBody):
        return Violation("missing_body", "a request body is required", detail)
    if isinstance(exc, RequestBodyValidationError):
        cause = exc.__cause__
        if isinstance(cause, MediaTypeNotFound):
            return Violation("unsupported_media_type", "media type not declared", detail)
        if isinstance(cause, (XmlBodyError, BodyError)):
            detail = f"{operation}: {clip(str(cause), MAX_DETAIL)}"
        return Violation("invalid_body", "the request body does not fit the schema", detail)
    if isinstance(exc, PathError):
        return Violation("undeclared_operation", "operation not declared", detail)
    return Violation("invalid_request", "the request does not fit the API", detail)
