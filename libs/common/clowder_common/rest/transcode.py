"""HTTP request parts to a request message, and messages and statuses to protobuf JSON."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import grpc
from google.protobuf import descriptor, json_format, message
from google.protobuf.descriptor import FieldDescriptor as FD
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (registers the detail types for Any)
from grpc_status import rpc_status

from clowder_common.errors import InvalidArgument
from clowder_common.rest.routes import Route, find_field

_INT32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32, FD.TYPE_UINT32, FD.TYPE_FIXED32}
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_UINT64, FD.TYPE_FIXED64}
_FLOAT = {FD.TYPE_FLOAT, FD.TYPE_DOUBLE}
# Well-known types whose JSON form is a string, so a path or query value can carry them.
_STRING_WKT = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
_WRAPPERS = {f"google.protobuf.{n}Value" for n in
             ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")}


def build_request(route: Route, path_values: Mapping[str, str], query: Iterable[tuple[str, str]],
                  body: bytes) -> message.Message:
    """grpc-gateway's rules: body first, then query parameters for unbound fields, then path variables win."""
    request_type = route.method.input_type
    data: dict[str, Any] = {}
    if route.body:
        parsed = _parse_body(body)
        if route.body == "*":
            if parsed is not None:
                if not isinstance(parsed, dict):
                    raise InvalidArgument("the request body must be a JSON object", field="body")
                data = parsed
        else:
            field = request_type.fields_by_name[route.body]
            if parsed is not None:
                data[field.name] = parsed
    elif body.strip():
        raise InvalidArgument(f"{route.http_method} {route.template.text} takes no request body", field="body")

    bound = set(path_values)
    if route.body and route.body != "*":
        bound.add(route.body)
    for key, value in query:
        if route.body == "*":
            raise InvalidArgument(f"unknown query parameter {key!r}: this call takes every field in the body",
                                  field=key)
        fields = _fields_on_path(request_type, key)
        if fields is None:
            raise InvalidArgument(f"unknown query parameter {key!r}", field=key)
        proto_path = ".".join(f.name for f in fields)
        if any(proto_path == b or proto_path.startswith(b + ".") for b in bound):
            raise InvalidArgument(f"query parameter {key!r} repeats a field the path or body already sets",
                                  field=key)
        _put(data, fields, _scalar(fields[-1], value, key), append=fields[-1].is_repeated)
    for path, value in path_values.items():
        fields = _fields_on_path(request_type, path)
        assert fields is not None  # checked when the route was built
        _put(data, fields, _scalar(fields[-1], value, path), append=False)

    request = route.request_class()()
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as err:
        raise InvalidArgument(f"bad request: {err}", field="body") from None
    return request


def _parse_body(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"the request body is not valid JSON: {err}", field="body") from None


def _fields_on_path(message_type: descriptor.Descriptor, path: str) -> list[FD] | None:
    fields: list[FD] = []
    current: descriptor.Descriptor | None = message_type
    for part in path.split("."):
        if current is None or current.full_name in _STRING_WKT | _WRAPPERS:
            return None
        field = find_field(current, part)
        if field is None:
            return None
        if fields and fields[-1].is_repeated:
            return None  # no way to address one element of a repeated message from a query string
        fields.append(field)
        current = field.message_type
    last = fields[-1]
    if last.message_type is not None and last.message_type.GetOptions().map_entry:
        return None
    if last.message_type is not None and last.message_type.full_name not in _STRING_WKT | _WRAPPERS:
        return None
    return fields


def _put(data: dict[str, Any], fields: list[FD], value: Any, append: bool) -> None:
    node = data
    for field in fields[:-1]:
        child = _pop_either(node, field)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise InvalidArgument(f"{field.name} must be an object", field=field.name)
        node[field.name] = child
        node = child
    last = fields[-1]
    previous = _pop_either(node, last)
    if append:
        node[last.name] = [*(previous if isinstance(previous, list) else []), value]
    else:
        node[last.name] = value


def _pop_either(node: dict[str, Any], field: FD) -> Any:
    """Remove the field under either spelling, so body and query/path values never clash in ParseDict."""
    value = node.pop(field.json_name, None)
    proto_value = node.pop(field.name, None)
    return proto_value if proto_value is not None else value


def _scalar(field: FD, text: str, name: str) -> Any:
    """A path or query string as the JSON value protobuf's JSON mapping expects for this field."""
    kind = field.type
    if field.message_type is not None:
        if field.message_type.full_name in _WRAPPERS:
            return _scalar(field.message_type.fields_by_name["value"], text, name)
        return text
    try:
        if kind == FD.TYPE_BOOL:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return lowered in ("true", "1")
        if kind in _INT32:
            return int(text)
        if kind in _INT64:
            int(text)
            return text
        if kind in _FLOAT:
            float(text)
            return text if text in ("NaN", "Infinity", "-Infinity") else float(text)
        if kind == FD.TYPE_ENUM:
            return int(text) if text.lstrip("-").isdigit() else text
    except ValueError:
        raise InvalidArgument(f"{name}: {text!r} is not a valid {_type_word(field)}", field=name) from None
    return text


def _type_word(field: FD) -> str:
    if field.type == FD.TYPE_BOOL:
        return "boolean"
    if field.type in _INT32 | _INT64:
        return "integer"
    return "number"


def message_json(msg: message.Message) -> dict[str, Any]:
    # Every field with no presence is printed, as grpc-gateway's default marshaler does.
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)


def response_json(route: Route, msg: message.Message) -> Any:
    if route.response_body:
        whole = message_json(msg)
        field = msg.DESCRIPTOR.fields_by_name[route.response_body]
        return whole.get(field.json_name)
    return message_json(msg)


def status_of_rpc_error(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status the server sent (details intact), else one built from code and message."""
    status = None
    try:
        status = rpc_status.from_call(error)
    except Exception:  # details that do not parse are dropped rather than failing the response
        status = None
    if status is None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else ""
        status = status_pb2.Status(code=code.value[0], message=details or code.name)
    return status


def status_json(status: status_pb2.Status) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
    except (json_format.SerializeToJsonError, TypeError, KeyError):
        # A detail of a type this process does not know: keep code and message.
        return {"code": status.code, "message": status.message, "details": []}
