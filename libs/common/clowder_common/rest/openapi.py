"""An OpenAPI 3 document for the REST bridge, generated from the same descriptors and routes."""

from __future__ import annotations

import re
from typing import Any, Iterable

from google.protobuf import descriptor
from google.protobuf.descriptor import FieldDescriptor as FD

from clowder_common.rest.routes import Route

STATUS_SCHEMA = "google.rpc.Status"
_INT32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
_UINT32 = {FD.TYPE_UINT32, FD.TYPE_FIXED32}
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_UINT64, FD.TYPE_FIXED64}
# Protobuf's JSON mapping of the well-known types.
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
_WRAPPER_INNER: dict[str, dict[str, Any]] = {
    "DoubleValue": {"type": "number", "format": "double"},
    "FloatValue": {"type": "number", "format": "float"},
    "Int64Value": {"type": "string", "format": "int64"},
    "UInt64Value": {"type": "string", "format": "uint64"},
    "Int32Value": {"type": "integer", "format": "int32"},
    "UInt32Value": {"type": "integer", "format": "int64", "minimum": 0},
    "BoolValue": {"type": "boolean"},
    "StringValue": {"type": "string"},
    "BytesValue": {"type": "string", "format": "byte"},
}
for _name, _schema in _WRAPPER_INNER.items():
    _WKT[f"google.protobuf.{_name}"] = {**_schema, "nullable": True}
_HTTP_METHODS = {"GET": "get", "POST": "post", "PUT": "put", "PATCH": "patch", "DELETE": "delete"}


class _Schemas:
    """Collects component schemas for messages and enums as they are referenced."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, full_name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{full_name}"}

    def message(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WKT:
            return dict(_WKT[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder first: messages may be recursive
            properties = {field.json_name: self.field(field) for field in message.fields}
            schema: dict[str, Any] = {"type": "object", "properties": properties}
            self.components[message.full_name] = schema
        return self.ref(message.full_name)

    def enum(self, enum: descriptor.EnumDescriptor) -> dict[str, Any]:
        if enum.full_name not in self.components:
            self.components[enum.full_name] = {"type": "string", "enum": [v.name for v in enum.values]}
        return self.ref(enum.full_name)

    def field(self, field: FD) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        single = self.single(field)
        return {"type": "array", "items": single} if field.is_repeated else single

    def single(self, field: FD) -> dict[str, Any]:
        kind = field.type
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        if kind == FD.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == FD.TYPE_STRING:
            return {"type": "string"}
        if kind == FD.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        if kind in _INT32:
            return {"type": "integer", "format": "int32"}
        if kind in _UINT32:
            return {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
        if kind in _INT64:
            # 64-bit integers are JSON strings in protobuf's mapping (they do not fit a double).
            return {"type": "string", "format": "int64" if kind not in (FD.TYPE_UINT64, FD.TYPE_FIXED64)
                    else "uint64"}
        if kind == FD.TYPE_FLOAT:
            return {"type": "number", "format": "float"}
        return {"type": "number", "format": "double"}


def _query_parameters(schemas: _Schemas, message: descriptor.Descriptor, bound: set[str],
                      prefix_proto: str = "", prefix_json: str = "", depth: int = 0) -> list[dict[str, Any]]:
    params = []
    for field in message.fields:
        proto_path, json_path = prefix_proto + field.name, prefix_json + field.json_name
        if proto_path in bound:
            continue
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            continue
        if nested is not None and nested.full_name not in _WKT:
            if field.is_repeated or depth >= 3:
                continue
            params += _query_parameters(schemas, nested, bound, proto_path + ".", json_path + ".", depth + 1)
            continue
        if nested is not None and nested.full_name in ("google.protobuf.Struct", "google.protobuf.Value",
                                                       "google.protobuf.ListValue", "google.protobuf.Any",
                                                       "google.protobuf.Empty"):
            continue
        schema = schemas.field(field)
        param: dict[str, Any] = {"name": json_path, "in": "query", "required": False, "schema": schema}
        if field.is_repeated:
            param.update(style="form", explode=True)
        params.append(param)
    return params


def _operation(schemas: _Schemas, route: Route, names: list[str]) -> dict[str, Any]:
    request, response = route.method.input_type, route.method.output_type
    parameters = []
    for variable, name in zip(route.template.variables, names):
        field = _field_path(request, variable.field_path)
        parameter = {"name": name, "in": "path", "required": True, "schema": schemas.field(field)}
        if name != variable.field_path:
            parameter["description"] = f"sets the request field `{variable.field_path}`"
        parameters.append(parameter)
    bound = {v.field_path for v in route.template.variables}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.service.name],
        "summary": f"{route.service.full_name}.{route.method.name}",
    }
    if route.body == "*":
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": schemas.message(request)}}}
    elif route.body:
        body_field = request.fields_by_name[route.body]
        bound.add(body_field.name)
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": schemas.field(body_field)}}}
    if route.body != "*":
        parameters += _query_parameters(schemas, request, bound)
    if parameters:
        operation["parameters"] = parameters
    if route.response_body:
        result = schemas.field(response.fields_by_name[route.response_body])
    else:
        result = schemas.message(response)
    if route.streaming:
        content = {"application/x-ndjson": {"schema": {
            "type": "object",
            "description": "One JSON object per line: each message as `result`; a failure after the first "
                           "message as `error`.",
            "properties": {"result": result, "error": schemas.ref(STATUS_SCHEMA)},
        }}}
        description = "A stream of newline-delimited JSON objects"
    else:
        content = {"application/json": {"schema": result}}
        description = "OK"
    operation["responses"] = {
        "200": {"description": description, "content": content},
        "default": error_response_spec(),
    }
    return operation


def error_response_spec() -> dict[str, Any]:
    """The `default` response of every operation, hand-made ones too: an error as google.rpc.Status."""
    return {"description": "An error as google.rpc.Status",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}}}}


def _field_path(message: descriptor.Descriptor, path: str) -> FD:
    field = None
    current = message
    for part in path.split("."):
        field = current.fields_by_name[part]
        current = field.message_type
    assert field is not None
    return field


def openapi_document(routes: Iterable[Route], *, title: str, version: str = "v1",
                     extra_paths: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """OpenAPI 3.0 for `routes`; `extra_paths` adds hand-made operations (their schemas inline)."""
    schemas = _Schemas()
    schemas.components[STATUS_SCHEMA] = {
        "type": "object",
        "description": "The error model of gRPC and of this API (google.rpc.Status).",
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": dict(_WKT["google.protobuf.Any"])},
        },
    }
    paths: dict[str, dict[str, Any]] = {}
    # OpenAPI forbids two paths that differ only in variable names ("/d/{name}", "/d/{deployment.name}"):
    # the first route's path stands for both, and later ones name their variables after it.
    canonical: dict[str, tuple[str, list[str]]] = {}
    for route in sorted(routes, key=lambda r: sum(len(v.field_path) for v in r.template.variables)):
        path_text = route.template.openapi_path()
        shape = re.sub(r"\{[^}]*\}", "{}", path_text)
        path_text, names = canonical.setdefault(shape, (path_text, [v.field_path for v in route.template.variables]))
        path = paths.setdefault(path_text, {})
        path[_HTTP_METHODS[route.http_method]] = _operation(schemas, route, names)
    for extra_path, operations in (extra_paths or {}).items():
        paths.setdefault(extra_path, {}).update(operations)
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version,
                 "description": "REST bridge over Clowder's gRPC services, generated from their google.api.http "
                                "annotations. Every call needs `Authorization: Bearer <token>`."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
