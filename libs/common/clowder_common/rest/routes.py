"""HTTP routes read from the google.api.http options of gRPC service descriptors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pool, message_factory

from clowder_common.rest.template import PathTemplate, TemplateError, parse_template

_METHODS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str  # upper case
    template: PathTemplate
    # "" (no body), "*" (the whole request) or a top-level request field name.
    body: str
    # "" or the response field sent instead of the whole response.
    response_body: str
    method: descriptor.MethodDescriptor

    @property
    def service(self) -> descriptor.ServiceDescriptor:
        return self.method.containing_service

    @property
    def grpc_path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def operation_id(self) -> str:
        return f"{self.service.name}_{self.method.name}"

    def request_class(self):
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self):
        return message_factory.GetMessageClass(self.method.output_type)


def resolve_services(names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
                     ) -> list[descriptor.ServiceDescriptor]:
    """Service descriptors by full name (their generated _pb2 module must have been imported)."""
    pool = pool or descriptor_pool.Default()
    services = []
    for name in names:
        try:
            services.append(pool.FindServiceByName(name))
        except KeyError:
            raise ValueError(f"unknown gRPC service {name!r}: import its generated _pb2 module first") from None
    return services


def routes_of(services: Iterable[descriptor.ServiceDescriptor]) -> list[Route]:
    """Every binding (additional_bindings included) of every annotated RPC, most specific first."""
    routes: list[Route] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for binding in [rule, *rule.additional_bindings]:
                routes.append(_route(method, binding))
    # Verbs and more literal segments first, so "/images/{alias}:pull" wins over "/images/{alias}".
    routes.sort(key=lambda r: (not r.template.verb, -r.template.literal_segments, -len(r.template.text)))
    return routes


def _route(method: descriptor.MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    kind = rule.WhichOneof("pattern")
    where = f"{method.full_name}"
    if kind is None:
        raise ValueError(f"{where}: google.api.http rule without a pattern")
    if method.client_streaming:
        raise ValueError(f"{where}: client-streaming RPCs cannot be bridged to REST")
    if kind == "custom":
        http_method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, path = kind.upper(), getattr(rule, kind)
    try:
        template = parse_template(path)
    except TemplateError as err:
        raise ValueError(f"{where}: {err}") from None
    request = method.input_type
    for variable in template.variables:
        field = field_at(request, variable.field_path)
        if field is None or field.type == field.TYPE_MESSAGE or _is_repeated(field):
            raise ValueError(f"{where}: path variable {variable.field_path!r} is not a singular scalar field")
    if rule.body not in ("", "*") and rule.body not in request.fields_by_name:
        raise ValueError(f"{where}: body {rule.body!r} is not a field of {request.full_name}")
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise ValueError(f"{where}: response_body {rule.response_body!r} is not a response field")
    return Route(http_method, template, rule.body, rule.response_body, method)


def field_at(message: descriptor.Descriptor, path: str) -> descriptor.FieldDescriptor | None:
    """The field at a dotted path of proto (or JSON) names, or None."""
    field = None
    current: descriptor.Descriptor | None = message
    for part in path.split("."):
        if current is None:
            return None
        field = find_field(current, part)
        if field is None:
            return None
        current = field.message_type
    return field


def find_field(message: descriptor.Descriptor, name: str) -> descriptor.FieldDescriptor | None:
    field = message.fields_by_name.get(name)
    if field is None:
        field = next((f for f in message.fields if f.json_name == name), None)
    return field


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    return field.is_repeated
