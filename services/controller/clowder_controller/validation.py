"""Checks on what clients send the control plane, each failure naming its field."""

from __future__ import annotations

import urllib.parse

from clowder.controller.v1 import resources_pb2
from clowder_common.chat_templates import check_chat_template
from clowder_common.errors import FieldViolation, InvalidArgument
from clowder_common.keys import validate_name

# What the storage service can pull an aimage from (peer:// is node to node, not for users).
SUPPORTED_SCHEMES = ("file", "http", "https", "hf", "s3", "oci")
MAX_CONTEXT = 1 << 20


def validate_source_url(url: str, field: str = "image.source_url") -> str:
    parsed = urllib.parse.urlsplit(url or "")
    if parsed.scheme not in SUPPORTED_SCHEMES:
        raise InvalidArgument(
            f"source URL {url!r} must start with one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}",
            field=field,
        )
    if parsed.scheme == "file" and (parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")):
        raise InvalidArgument(f"file URL {url!r} must name an absolute path (file:///path)", field=field)
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise InvalidArgument(f"URL {url!r} has no host", field=field)
    return url


def validate_configuration(config: resources_pb2.ImageConfiguration, prefix: str) -> None:
    violations = []
    if config.context_size > MAX_CONTEXT:
        violations.append(FieldViolation(f"{prefix}.context_size", f"must be at most {MAX_CONTEXT}"))
    if config.HasField("temperature") and not 0.0 <= config.temperature <= 2.0:
        violations.append(FieldViolation(f"{prefix}.temperature", "must be between 0 and 2"))
    if config.HasField("top_p") and not 0.0 < config.top_p <= 1.0:
        violations.append(FieldViolation(f"{prefix}.top_p", "must be in (0, 1]"))
    if config.HasField("max_tokens") and config.max_tokens == 0:
        violations.append(FieldViolation(f"{prefix}.max_tokens", "must be positive when set"))
    if violations:
        raise InvalidArgument("invalid image configuration", violations=violations)
    if config.chat_template:
        check_chat_template(config.chat_template, f"{prefix}.chat_template")


def validate_credentials_ref(ref: str, field: str = "image.credentials_ref") -> None:
    """Only a pointer to a secret is accepted; a secret itself would end up in etcd."""
    if not ref:
        return
    kind, _, rest = ref.partition(":")
    if kind == "env" and rest.replace("_", "").isalnum() and not rest[0].isdigit():
        return
    if kind == "file" and rest.startswith("/") and ".." not in rest.split("/"):
        return
    raise InvalidArgument("credentials_ref must be env:NAME or file:/absolute/path (a reference, never the secret)",
                          field=field)


def validate_image(image: resources_pb2.Image) -> None:
    validate_name(image.alias, "image.alias")
    validate_source_url(image.source_url)
    validate_credentials_ref(image.credentials_ref)
    validate_configuration(image.configuration, "image.configuration")


def validate_replicas(replicas: int, maximum: int, field: str = "deployment.replicas") -> None:
    if replicas > maximum:
        raise InvalidArgument(f"replicas must be at most {maximum}", field=field)


def validate_deployment(deployment: resources_pb2.Deployment, maximum: int) -> None:
    """Replica counts, autoscaling bounds and placement constraints, every bad field named."""
    violations = []
    if deployment.replicas > maximum:
        violations.append(FieldViolation("deployment.replicas", f"must be at most {maximum}"))
    if deployment.max_replicas > maximum:
        violations.append(FieldViolation("deployment.max_replicas", f"must be at most {maximum}"))
    if deployment.max_replicas and deployment.min_replicas > deployment.max_replicas:
        violations.append(FieldViolation("deployment.min_replicas", "must not exceed max_replicas"))
    if not deployment.max_replicas and deployment.min_replicas:
        violations.append(FieldViolation("deployment.max_replicas", "must be set when min_replicas is"))
    if deployment.target_in_flight < 0 or deployment.target_in_flight != deployment.target_in_flight:
        violations.append(FieldViolation("deployment.target_in_flight", "must be a positive number"))
    if deployment.scale_to_zero_after_s and deployment.min_replicas:
        violations.append(FieldViolation("deployment.scale_to_zero_after_s", "needs min_replicas 0"))
    for key, value in deployment.node_selector.items():
        if not key or len(key) > 253 or len(value) > 63:
            violations.append(FieldViolation(f"deployment.node_selector[{key!r}]",
                                             "keys are 1-253 characters, values at most 63"))
    if violations:
        raise InvalidArgument("invalid deployment", violations=violations)
