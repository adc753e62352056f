"""`clowder serve`: a service declared in a YAML file, applied idempotently.

A spec names one model source, its configuration and how many replicas serve
it. The aimage's alias is derived from the spec's image part
(`<service>-<hash>`), so `up` of an unchanged file finds everything in place
and changes nothing, while `update` of a changed source or configuration
creates the new aimage and points the deployment at it (the controller rolls
the replicas over).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time

import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from clowder.controller.v1 import resources_pb2
from clowder.client import Client
from clowder_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from clowder_common.keys import validate_name

SPEC_KEYS = {"name", "image", "replicas", "runtime"}
IMAGE_KEYS = {"source", "configuration"}
# Under `runtime:`, the deployment's own settings (they override image.configuration's slots, threads, ...).
RUNTIME_KEYS = ("slots", "threads", "context_size", "batch_size")


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    name: str
    source: str
    configuration: resources_pb2.ImageConfiguration
    replicas: int
    # runtime: settings the spec gives (the others stay unset on the deployment).
    runtime: dict[str, int] = dataclasses.field(default_factory=dict)

    def matches(self, deployment: resources_pb2.Deployment) -> bool:
        """The deployment runs this spec already: same aimage, replicas and runtime settings."""
        current = {k: getattr(deployment, k) for k in RUNTIME_KEYS if deployment.HasField(k)}
        return (deployment.image, deployment.replicas, current) == (self.image_alias, self.replicas, self.runtime)

    @property
    def image_alias(self) -> str:
        """Stable for an unchanged image part, different for any change to it."""
        canonical = json.dumps({"source": self.source,
                                "configuration": json_format.MessageToDict(self.configuration)}, sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
        return f"{self.name[:54]}-{digest}"


def load_spec(path: pathlib.Path) -> ServiceSpec:
    """Parse and check a spec file; every mistake names its field."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a mapping at the top level")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise InvalidArgument(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(SPEC_KEYS)}")
    name = validate_name(str(data.get("name", "")), "name")
    image = data.get("image")
    if not isinstance(image, dict) or not image.get("source"):
        raise InvalidArgument(f"{path}: image.source is required", field="image.source")
    unknown = set(image) - IMAGE_KEYS
    if unknown:
        raise InvalidArgument(f"{path}: unknown keys under image: {sorted(unknown)}", field="image")
    configuration = resources_pb2.ImageConfiguration()
    try:
        json_format.ParseDict(image.get("configuration") or {}, configuration)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{path}: image.configuration: {exc}", field="image.configuration") from None
    replicas = data.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        raise InvalidArgument(f"{path}: replicas must be a whole number >= 0", field="replicas")
    runtime = data.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise InvalidArgument(f"{path}: runtime must be a mapping of {', '.join(RUNTIME_KEYS)}", field="runtime")
    unknown = set(runtime) - set(RUNTIME_KEYS)
    if unknown:
        raise InvalidArgument(f"{path}: unknown keys under runtime: {sorted(unknown)}; expected {list(RUNTIME_KEYS)}",
                              field="runtime")
    for key, value in runtime.items():
        # Ranges (and the model's context) are the controller's to check; here only the type.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"{path}: runtime.{key} must be a whole number >= 1", field=f"runtime.{key}")
    return ServiceSpec(name, str(image["source"]), configuration, replicas, dict(runtime))


def _ensure_image(control: Client, spec: ServiceSpec, console: Console) -> bool:
    """Create the spec's aimage unless it exists; True when created."""
    try:
        control.images.create(spec.image_alias, spec.source, spec.configuration)
    except AlreadyExists:
        return False
    console.print(f"image {spec.image_alias} created from {spec.source}")
    return True


def _deployment(control: Client, name: str) -> resources_pb2.Deployment | None:
    try:
        return control.deployments.get(name)
    except NotFound:
        return None


def serve_up(control: Client, spec: ServiceSpec, console: Console) -> int:
    current = _deployment(control, spec.name)
    if current is not None:
        if spec.matches(current):
            console.print(f"service {spec.name} is up to date; nothing changed")
            return 0
        raise FailedPrecondition(f"service {spec.name} already runs a different spec; "
                                 "use `clowder serve update -f FILE` to roll it")
    _ensure_image(control, spec, console)
    control.deployments.create(spec.name, spec.image_alias, spec.replicas, **spec.runtime)
    console.print(f"service {spec.name} created: {spec.replicas} replica(s) of {spec.image_alias}")
    return 0


def serve_update(control: Client, spec: ServiceSpec, console: Console) -> int:
    current = _deployment(control, spec.name)
    if current is None:
        raise NotFound(f"service {spec.name} does not exist; `clowder serve up -f FILE` creates it")
    if spec.matches(current):
        console.print(f"service {spec.name} is up to date; nothing changed")
        return 0
    _ensure_image(control, spec, console)
    # The spec is the whole truth: runtime settings it no longer gives are unset.
    control.deployments.update(spec.name, replicas=spec.replicas, image=spec.image_alias, **spec.runtime,
                               clear=[k for k in RUNTIME_KEYS if k not in spec.runtime])
    what = []
    if current.image != spec.image_alias:
        what.append(f"image {current.image} -> {spec.image_alias}")
    if current.replicas != spec.replicas:
        what.append(f"replicas {current.replicas} -> {spec.replicas}")
    for key in RUNTIME_KEYS:
        before = getattr(current, key) if current.HasField(key) else None
        if before != spec.runtime.get(key):
            what.append(f"{key} {before or '-'} -> {spec.runtime.get(key, '-')}")
    console.print(f"service {spec.name} updated: {', '.join(what)}")
    return 0


def serve_status(control: Client, name: str, console: Console) -> int:
    current = _deployment(control, name)
    if current is None:
        raise NotFound(f"service {name} does not exist")
    console.print(f"service {name}: image {current.image}, {current.ready_replicas}/{current.replicas} ready")
    replicas = control.deployments.replicas(name)
    table = Table("REPLICA", "NODE", "STATE", "RESTARTS", "MESSAGE")
    for r in replicas:
        state = resources_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower()
        table.add_row(r.id, r.node or "-", state, str(r.restarts), r.message)
    console.print(table)
    return 0


def serve_down(control: Client, name: str, console: Console, timeout: float = 120) -> int:
    """Delete the deployment, wait for its replicas to go, then remove the service's unused aimages."""
    if _deployment(control, name) is None:
        raise NotFound(f"service {name} does not exist")
    control.deployments.delete(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(r.deployment == name for r in control.deployments.replicas("-")):
            break
        time.sleep(0.2)
    for image in list(control.images.list()):
        if _is_service_image(image.alias, name):
            try:
                control.images.delete(image.alias)
            except FailedPrecondition:
                continue  # another deployment uses it
    console.print(f"service {name} is down")
    return 0


def _is_service_image(alias: str, name: str) -> bool:
    prefix, _, suffix = alias.rpartition("-")
    return prefix == name[:54] and len(suffix) == 8 and all(c in "0123456789abcdef" for c in suffix)


def follow_logs(log_dir: pathlib.Path, name: str, console: Console, follow: bool, poll_s: float = 0.3,
                max_seconds: float | None = None) -> int:
    """Print the logs of the service's runtimes on this machine; with `follow`, keep printing new lines."""
    offsets: dict[pathlib.Path, int] = {}
    started = time.monotonic()
    while True:
        for path in sorted(log_dir.glob(f"runtime-{name}-*.log")):
            replica = path.stem.removeprefix(f"runtime-{name}-")
            with open(path, "rb") as handle:
                handle.seek(offsets.get(path, 0))
                chunk = handle.read()
                offsets[path] = handle.tell()
            for line in chunk.decode(errors="replace").splitlines():
                console.print(f"[{replica}] {line}", highlight=False, markup=False, soft_wrap=True)
        if not follow or (max_seconds is not None and time.monotonic() - started > max_seconds):
            return 0
        time.sleep(poll_s)

