"""Zero trust: an XML request body read as its OpenAPI schema describes it.

XML has no types and no arrays; the schema's `xml` objects say how a body
maps onto the JSON-like value the schema validates (OpenAPI 3, "XML
Object"):

- an object is an element whose properties are child elements named by the
  property (or its `xml.name`), or attributes with `xml.attribute: true`;
- an array is its items repeated in place (each named by the items'
  `xml.name`, else by the property), or with `xml.wrapped: true` inside one
  wrapping element (named by the array's `xml.name`, else by the property);
- a scalar is an element's text (or an attribute's value), read as the
  schema's type: integer, number, boolean ("true", "false", "1", "0") or
  string; `xsi:nil="true"` is null;
- the root element must carry the schema's `xml.name` when it has one, and an
  element whose schema declares `xml.namespace` must be in that namespace.

What the mapping cannot place is refused, never guessed: the same element
twice for a property that is not an array, text in an object, an undeclared
element with children or attributes, xsi attributes other than nil. An
undeclared plain element or attribute becomes a string member, so that the
schema's additionalProperties decides, as it does for JSON. The parser
(expat) takes UTF-8 only and refuses a DOCTYPE, entity declarations and
processing instructions: no entity expansion, no external fetch. A schema
with allOf/anyOf/oneOf/not, a scalar whose types include object or array,
or an object or array as an attribute cannot be mapped: the document is
refused when the config is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from xml.parsers import expat

from jsonschema_path import SchemaPath
from openapi_core.exceptions import OpenAPIError

XML_MEDIA_TYPE = re.compile(r"(?:application|text)/(?:[a-z0-9!#$&^_.-]+\+)?xml")
XSI = "http://www.w3.org/2001/XMLSchema-instance"
MAX_DEPTH = 32  # elements nested deeper are refused; schemas are checked this deep
MAX_SCHEMA_NODES = 10_000
COMPOSITION = ("allOf", "anyOf", "oneOf", "not")
_XML_SPACE = " \t\r\n"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


class XmlBodyError(OpenAPIError):
    """The body is not XML stockade accepts, or does not map onto its schema."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class XmlSchemaError(ValueError):
    """A schema an XML body cannot be mapped onto (refused at config load)."""


@dataclass
class Element:
    namespace: str | None
    name: str
    attributes: dict[tuple[str | None, str], str]
    children: list[Element] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def _split(qualified: str) -> tuple[str | None, str]:
    namespace, _, local = qualified.rpartition(" ")
    return namespace or None, local


def parse(body: bytes) -> Element:
    """The body's element tree; XmlBodyError for anything but plain, well-formed UTF-8 XML."""
    parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.buffer_text = True
    stack: list[Element] = []
    roots: list[Element] = []

    def refuse(what: str) -> Any:
        def handler(*_: Any) -> None:
            raise XmlBodyError(f"{what} is not accepted in an XML body")

        return handler

    def declaration(_version: str, encoding: str | None, _standalone: int) -> None:
        if encoding is not None and encoding.lower() != "utf-8":
            raise XmlBodyError(f"XML body declared as {encoding!r}: only UTF-8 is accepted")

    def start(name: str, attributes: dict[str, str]) -> None:
        if len(stack) >= MAX_DEPTH:
            raise XmlBodyError(f"XML nested deeper than {MAX_DEPTH} elements")
        namespace, local = _split(name)
        element = Element(namespace, local, {_split(k): v for k, v in attributes.items()})
        (stack[-1].children if stack else roots).append(element)
        stack.append(element)

    def end(_name: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if stack:
            stack[-1].text.append(data)

    parser.XmlDeclHandler = declaration
    parser.StartDoctypeDeclHandler = refuse("a DOCTYPE")
    parser.EntityDeclHandler = refuse("an entity declaration")
    parser.UnparsedEntityDeclHandler = refuse("an entity declaration")
    parser.ExternalEntityRefHandler = refuse("an external entity")
    parser.ProcessingInstructionHandler = refuse("a processing instruction")
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise XmlBodyError(f"not well-formed XML: {exc}") from None
    if len(roots) != 1:
        raise XmlBodyError("not well-formed XML: no root element")
    return roots[0]


# -- the schema side -------------------------------------------------------------


def _contents(schema: SchemaPath) -> dict[str, Any]:
    value = schema.read_value()
    if value is True or value is None:
        return {}
    if not isinstance(value, dict):
        raise XmlBodyError("the schema allows no value here")
    return value


def _xml(contents: dict[str, Any]) -> dict[str, Any]:
    xml = contents.get("xml")
    return xml if isinstance(xml, dict) else {}


def _types(contents: dict[str, Any]) -> list[str]:
    declared = contents.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    return []


def _kind(contents: dict[str, Any]) -> str:
    """object, array or scalar, as the schema's type (or its keywords) says."""
    types = [t for t in _types(contents) if t != "null"]
    if types == ["object"] or (not types and "properties" in contents):
        return "object"
    if types == ["array"] or (not types and "items" in contents):
        return "array"
    return "scalar"


def check_schema(schema: SchemaPath, where: str) -> None:
    """Refuse (XmlSchemaError) a schema an XML body cannot be mapped onto."""
    seen: set[int] = set()

    def visit(node: SchemaPath, at: str, depth: int) -> None:
        if depth > MAX_DEPTH or len(seen) > MAX_SCHEMA_NODES:
            return  # deeper elements are refused at run time
        value = node.read_value()
        if not isinstance(value, dict) or id(value) in seen:
            return
        seen.add(id(value))
        used = [k for k in COMPOSITION if k in value]
        if used:
            raise XmlSchemaError(
                f"{where}: the XML body's schema uses {used[0]} at {at}, which an XML body "
                "cannot be mapped onto; declare plain object schemas, or drop the XML media type"
            )
        types = [t for t in _types(value) if t != "null"]
        if len(types) > 1 and ("object" in types or "array" in types):
            raise XmlSchemaError(f"{where}: the XML body's schema at {at} has types {types}")
        if _xml(value).get("attribute") and _kind(value) != "scalar":
            raise XmlSchemaError(f"{where}: an {_kind(value)} cannot be an XML attribute ({at})")
        if "properties" in value:
            for name, prop in (node / "properties").str_items():
                visit(prop, f"{at}.{name}", depth + 1)
        if "items" in value:
            visit(node / "items", f"{at}[]", depth + 1)
        if isinstance(value.get("additionalProperties"), dict):
            visit(node / "additionalProperties", f"{at}.*", depth + 1)

    visit(schema, "the body", 0)


# -- the mapping -----------------------------------------------------------------


def _text(element: Element) -> str:
    return "".join(element.text)


def scalar(text: str, types: list[str], where: str) -> Any:
    """A string from XML or a form read as the schema's scalar type."""
    wanted = [t for t in types if t != "null"]
    if not wanted or wanted == ["string"]:
        return text
    trimmed = text.strip(_XML_SPACE)
    if ("integer" in wanted or "number" in wanted) and _INTEGER.fullmatch(trimmed):
        return int(trimmed)
    if "number" in wanted and _NUMBER.fullmatch(trimmed):
        return float(trimmed)
    if "boolean" in wanted and trimmed in _BOOLEANS:
        return _BOOLEANS[trimmed]
    if "string" in wanted:
        return text
    raise XmlBodyError(f"{where}: {text[:32]!r} is not {' or '.join(wanted)}")


def _is_nil(element: Element) -> bool:
    return element.attributes.get((XSI, "nil")) in ("true", "1")


def _check_namespace(element_ns: str | None, contents: dict[str, Any], where: str) -> None:
    wanted = _xml(contents).get("namespace")
    if isinstance(wanted, str) and element_ns != wanted:
        raise XmlBodyError(f"{where}: not in the namespace {wanted}")


def _value(element: Element, schema: SchemaPath, name_hint: str | None, where: str) -> Any:
    contents = _contents(schema)
    for namespace, attribute in element.attributes:
        if namespace == XSI and attribute != "nil":
            raise XmlBodyError(f"{where}: the attribute xsi:{attribute} is not accepted")
    if _is_nil(element):
        if element.children or _text(element).strip(_XML_SPACE):
            raise XmlBodyError(f"{where}: a nil element with content")
        return None
    kind = _kind(contents)
    if kind == "object":
        return _object(element, schema, contents, where)
    attributes = [a for a in element.attributes if a[0] != XSI]
    if attributes:
        raise XmlBodyError(f"{where}: undeclared attribute {attributes[0][1]!r}")
    if kind == "array":
        return _array(element, schema, name_hint, where)
    if element.children:
        raise XmlBodyError(f"{where}: elements where a value is expected")
    return scalar(_text(element), _types(contents), where)


def _array(element: Element, schema: SchemaPath, name_hint: str | None, where: str) -> list[Any]:
    """A wrapping element's items."""
    if _text(element).strip(_XML_SPACE):
        raise XmlBodyError(f"{where}: text in a list")
    items = schema / "items"
    item_contents = _contents(items) if items.exists() else {}
    item_name = _xml(item_contents).get("name") or name_hint
    values = []
    for child in element.children:
        if item_name is not None and child.name != item_name:
            raise XmlBodyError(f"{where}: {child.name!r} where {item_name!r} items are expected")
        _check_namespace(child.namespace, item_contents, where)
        values.append(_value(child, items, None, f"{where}[]") if items.exists() else _text(child))
    return values


@dataclass(frozen=True)
class _Place:
    prop: str
    schema: SchemaPath  # what each matching element is read as
    contents: dict[str, Any]
    repeated: bool  # an unwrapped array: each element is one item


def _places(schema: SchemaPath, where: str) -> tuple[dict[str, _Place], dict[str, _Place]]:
    """Where an object's properties are: (by element name, by attribute name)."""
    elements: dict[str, _Place] = {}
    attributes: dict[str, _Place] = {}
    properties = schema / "properties"
    if not properties.exists():
        return elements, attributes
    for prop, prop_schema in properties.str_items():
        contents = _contents(prop_schema)
        xml = _xml(contents)
        if xml.get("attribute"):
            attributes[str(xml.get("name") or prop)] = _Place(prop, prop_schema, contents, False)
            continue
        if _kind(contents) == "array" and not xml.get("wrapped"):
            items = prop_schema / "items"
            item_contents = _contents(items) if items.exists() else {}
            name = str(_xml(item_contents).get("name") or prop)
            place = _Place(prop, items, item_contents, True)
        else:
            name = str(xml.get("name") or prop)
            place = _Place(prop, prop_schema, contents, False)
        if name in elements:
            raise XmlBodyError(f"{where}: two properties are read from <{name}>")
        elements[name] = place
    return elements, attributes


def _object(
    element: Element, schema: SchemaPath, contents: dict[str, Any], where: str
) -> dict[str, Any]:
    if _text(element).strip(_XML_SPACE):
        raise XmlBodyError(f"{where}: text in an object")
    by_element, by_attribute = _places(schema, where)
    instance: dict[str, Any] = {}

    def put(key: str, value: Any, what: str) -> None:
        if key in instance:
            raise XmlBodyError(f"{where}: {what} given more than once")
        instance[key] = value

    for (namespace, name), value in element.attributes.items():
        if namespace == XSI:
            continue
        place = by_attribute.get(name)
        if place is None:
            put(name, value, f"attribute {name!r}")
            continue
        _check_namespace(namespace, place.contents, f"{where}@{name}")
        put(place.prop, scalar(value, _types(place.contents), f"{where}@{name}"), name)
    for child in element.children:
        place = by_element.get(child.name)
        at = f"{where}.{child.name}"
        if place is None:
            if child.children or child.attributes:
                raise XmlBodyError(f"{at}: an undeclared element with content")
            put(child.name, _text(child), f"element {child.name!r}")
            continue
        _check_namespace(child.namespace, place.contents, at)
        if place.repeated:
            items = instance.setdefault(place.prop, [])
            if not isinstance(items, list):
                raise XmlBodyError(f"{at}: given more than once")
            items.append(_value(child, place.schema, None, at))
        else:
            put(place.prop, _value(child, place.schema, place.prop, at), f"<{child.name}>")
    return instance


def to_instance(root: Element, schema: SchemaPath) -> Any:
    """The value the body's schema validates: the root element read as the schema."""
    contents = _contents(schema)
    name = _xml(contents).get("name")
    if isinstance(name, str) and root.name != name:
        raise XmlBodyError(f"the root element is <{root.name}>, not <{name}>")
    _check_namespace(root.namespace, contents, "the root element")
    return _value(root, schema, None, root.name)
