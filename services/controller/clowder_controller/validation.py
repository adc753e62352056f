"""Checks on what clients send the control plane, each failure naming its field."""

from __future__ import annotations

import urllib.parse

from clowder.controller.v1 import resources_pb2
from clowder_common.chat_templates import check_chat_template
from clowder_common.errors import FieldViolation, InvalidArgument
from clowder_common.keys import validate_name
from clowder_common.runtime_settings import (
    DEFAULT_CONTEXT_SIZE, MAX_CONTEXT_SIZE, MAX_SLOTS, MAX_THREADS, MIN_CONTEXT_SIZE, of_message,
)

# What the storage service can pull an aimage from (peer:// is node to node, not for users).
SUPPORTED_SCHEMES = ("file", "http", "https", "hf", "s3", "oci")


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


def runtime_violations(message, prefix: str, *, context_size: int = 0, train_context: int = 0,
                       node_cpus: int = 0) -> list[FieldViolation]:
    """Slots, threads, context and batch size of a Deployment or ImageConfiguration, where set.

    `context_size` is the context the replica gets when `message` sets none (for the batch size bound);
    `train_context` the model's (GGUF context_length) and `node_cpus` the most CPUs a registered node has,
    each 0 when unknown.
    """
    violations = []
    if message.HasField("slots") and not 1 <= message.slots <= MAX_SLOTS:
        violations.append(FieldViolation(f"{prefix}.slots", f"must be between 1 and {MAX_SLOTS}, got {message.slots}"))
    if message.HasField("threads"):
        if not 1 <= message.threads <= MAX_THREADS:
            violations.append(FieldViolation(f"{prefix}.threads",
                                             f"must be between 1 and {MAX_THREADS}, got {message.threads}"))
        elif node_cpus and message.threads > node_cpus:
            # More llama.cpp threads than cores stall each other: slower than fewer, never faster.
            violations.append(FieldViolation(
                f"{prefix}.threads", f"must be at most {node_cpus}, the most CPUs a registered node has; "
                                     f"got {message.threads}"))
    context_field = message.DESCRIPTOR.fields_by_name["context_size"]
    context_set = message.HasField("context_size") if context_field.has_presence else bool(message.context_size)
    if context_set:
        context = message.context_size
        if not MIN_CONTEXT_SIZE <= context <= MAX_CONTEXT_SIZE:
            violations.append(FieldViolation(
                f"{prefix}.context_size", f"must be between {MIN_CONTEXT_SIZE} and {MAX_CONTEXT_SIZE}, got {context}"))
        elif train_context and context > train_context:
            violations.append(FieldViolation(
                f"{prefix}.context_size", f"must be at most {train_context}, the context the model was trained "
                                          f"for; got {context}"))
    effective_context = of_message(message).context_size or context_size or DEFAULT_CONTEXT_SIZE
    if message.HasField("batch_size") and not 1 <= message.batch_size <= effective_context:
        # A step prefills one prompt's chunk at most, and a prompt fits the context: more is never used.
        violations.append(FieldViolation(f"{prefix}.batch_size", f"must be between 1 and the context size "
                                                                 f"({effective_context}), got {message.batch_size}"))
    return violations


def validate_configuration(config: resources_pb2.ImageConfiguration, prefix: str, *, train_context: int = 0,
                           node_cpus: int = 0) -> None:
    violations = runtime_violations(config, prefix, train_context=train_context, node_cpus=node_cpus)
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


def validate_image(image: resources_pb2.Image, node_cpus: int = 0) -> None:
    """`node_cpus`: the most CPUs a registered node has (0: unknown); image.model_shape as far as known."""
    validate_name(image.alias, "image.alias")
    validate_source_url(image.source_url)
    validate_credentials_ref(image.credentials_ref)
    validate_configuration(image.configuration, "image.configuration",
                           train_context=image.model_shape.train_context, node_cpus=node_cpus)


def validate_replicas(replicas: int, maximum: int, field: str = "deployment.replicas") -> None:
    if replicas > maximum:
        raise InvalidArgument(f"replicas must be at most {maximum}", field=field)


def validate_deployment(deployment: resources_pb2.Deployment, maximum: int,
                        image: resources_pb2.Image | None = None, node_cpus: int = 0) -> None:
    """Replica counts, autoscaling bounds, placement constraints and runtime settings, every bad field named.

    `image` (the aimage served) bounds the context by the model's and gives the context a batch size must
    fit; `node_cpus` is the most CPUs a registered node has (0: unknown).
    """
    image = image or resources_pb2.Image()
    violations = runtime_violations(deployment, "deployment", context_size=image.configuration.context_size,
                                    train_context=image.model_shape.train_context, node_cpus=node_cpus)
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
