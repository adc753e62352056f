"""`clowder serve`: a service declared in a YAML file, applied idempotently, with numbered revisions.

A spec names one model source, its configuration and how many replicas serve
it. The aimage's alias is derived from the spec's image part
(`<service>-<hash>`), so `up` of an unchanged file finds everything in place
and changes nothing, while `update` of a changed spec makes a new revision
(the controller's ServingService): rolled over in place by default, or run
beside the stable one as a canary that takes a growing share of the traffic
(`rollout:` in the spec), or a fixed split (`--weight`). `history`, `status`,
`promote`, `rollback` and `traffic` show and steer the revisions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from clowder.controller.v1 import resources_pb2
from clowder.client import Client
from clowder_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from clowder_common.keys import validate_name

SPEC_KEYS = {"name", "image", "replicas", "runtime", "rollout"}
ROLLOUT_KEYS = {"strategy", "steps", "interval", "maxErrorRate", "maxTtftRatio"}
STRATEGIES = {"rolling": resources_pb2.ROLLOUT_STRATEGY_ROLLING, "canary": resources_pb2.ROLLOUT_STRATEGY_CANARY}
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
    rollout: resources_pb2.RolloutPolicy = dataclasses.field(default_factory=resources_pb2.RolloutPolicy)
    # The file's text, kept with the revision for `history`.
    text: str = ""

    def template(self) -> resources_pb2.Deployment:
        runtime: dict[str, Any] = dict(self.runtime)
        return resources_pb2.Deployment(name=self.name, image=self.image_alias, replicas=self.replicas, **runtime)

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
    rollout = _rollout(path, data.get("rollout"))
    return ServiceSpec(name, str(image["source"]), configuration, replicas, dict(runtime), rollout,
                       path.read_text())


def _seconds(path: pathlib.Path, value) -> float:
    """`60`, `60s`, `1.5m`: seconds."""
    text = str(value).strip()
    scale = 1.0
    if text.endswith("ms"):
        text, scale = text[:-2], 0.001
    elif text[-1:] in ("s", "m", "h"):
        text, scale = text[:-1], {"s": 1.0, "m": 60.0, "h": 3600.0}[text[-1]]
    try:
        seconds = float(text) * scale
    except ValueError:
        raise InvalidArgument(f"{path}: rollout.interval must be a duration such as 60s, got {value!r}",
                              field="rollout.interval") from None
    if seconds <= 0:
        raise InvalidArgument(f"{path}: rollout.interval must be positive", field="rollout.interval")
    return seconds


def _rollout(path: pathlib.Path, data) -> resources_pb2.RolloutPolicy:
    """The `rollout:` section; types here, ranges (steps, rates) are the controller's to check."""
    policy = resources_pb2.RolloutPolicy()
    if data is None:
        return policy
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: rollout must be a mapping of {', '.join(sorted(ROLLOUT_KEYS))}",
                              field="rollout")
    unknown = set(data) - ROLLOUT_KEYS
    if unknown:
        raise InvalidArgument(f"{path}: unknown keys under rollout: {sorted(unknown)}; expected "
                              f"{sorted(ROLLOUT_KEYS)}", field="rollout")
    strategy = data.get("strategy", "rolling")
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"{path}: rollout.strategy must be one of {sorted(STRATEGIES)}",
                              field="rollout.strategy")
    policy.strategy = STRATEGIES[strategy]
    steps = data.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps):
        raise InvalidArgument(f"{path}: rollout.steps must be a list of percents", field="rollout.steps")
    policy.steps.extend(steps)
    if "interval" in data:
        policy.interval_s = _seconds(path, data["interval"])
    for key, attr in (("maxErrorRate", "max_error_rate"), ("maxTtftRatio", "max_ttft_ratio")):
        if key in data:
            value = data[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InvalidArgument(f"{path}: rollout.{key} must be a number", field=f"rollout.{key}")
            setattr(policy, attr, float(value))
    return policy


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


def _service(control: Client, name: str) -> resources_pb2.Service | None:
    try:
        return control.services.get(name)
    except NotFound:
        return None


def _revision(service: resources_pb2.Service, number: int) -> resources_pb2.Revision | None:
    return next((r for r in service.revisions if r.number == number), None)


def _stable_template(control: Client, name: str) -> resources_pb2.Deployment | None:
    """What the service runs now: its stable revision's template, or (made before revisions) its deployment."""
    service = _service(control, name)
    if service is not None:
        stable = _revision(service, service.rollout.stable_revision)
        return stable.template if stable is not None else None
    return _deployment(control, name)


def serve_up(control: Client, spec: ServiceSpec, console: Console) -> int:
    current = _stable_template(control, spec.name)
    if current is not None and not spec.matches(current):
        raise FailedPrecondition(f"service {spec.name} already runs a different spec; "
                                 "use `clowder serve update -f FILE` to roll it")
    _ensure_image(control, spec, console)
    reply = control.services.apply(spec.template(), spec.rollout, spec=spec.text)
    if not reply.changed:
        console.print(f"service {spec.name} is up to date; nothing changed")
        return 0
    console.print(f"service {spec.name} created: {spec.replicas} replica(s) of {spec.image_alias} (revision 1)")
    return 0


def serve_update(control: Client, spec: ServiceSpec, console: Console, weight: int | None = None) -> int:
    if _stable_template(control, spec.name) is None:
        raise NotFound(f"service {spec.name} does not exist; `clowder serve up -f FILE` creates it")
    _ensure_image(control, spec, console)
    reply = control.services.apply(spec.template(), spec.rollout, weight=weight, spec=spec.text)
    if not reply.changed:
        console.print(f"service {spec.name} is up to date; nothing changed")
        return 0
    revision = _revision(reply.service, reply.revision)
    change = revision.change if revision is not None else ""
    console.print(f"service {spec.name} updated: revision {reply.revision}: {change}")
    if reply.service.rollout.candidate_revision:
        console.print(f"  {reply.service.rollout.message}")
    return 0


def _state(service: resources_pb2.Service) -> str:
    return resources_pb2.RolloutState.Name(service.rollout.state).removeprefix("ROLLOUT_STATE_").lower()


def _ago(stamp, now: float) -> str:
    seconds = max(0, int(now - stamp.seconds))
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60}m ago" if seconds < 7200 else f"{seconds // 3600}h ago"


def serve_status(control: Client, name: str, console: Console) -> int:
    service = _service(control, name)
    if service is None:
        current = _deployment(control, name)
        if current is None:
            raise NotFound(f"service {name} does not exist")
        console.print(f"service {name}: image {current.image}, {current.ready_replicas}/{current.replicas} ready")
        _replica_table(control, [name], console)
        return 0
    rollout = service.rollout
    weights = {t.revision: t.percent for t in service.traffic}
    live = sorted({rollout.stable_revision, rollout.candidate_revision, *weights} - {0})
    deployments = {n: _deployment(control, r.deployment) for n in live if (r := _revision(service, n)) is not None}
    ready = sum(d.ready_replicas for d in deployments.values() if d is not None)
    wanted = sum(d.replicas for d in deployments.values() if d is not None)
    console.print(f"service {name}: {_state(service)}, stable revision {rollout.stable_revision}"
                  + (f", candidate revision {rollout.candidate_revision}" if rollout.candidate_revision else "")
                  + f"; {ready}/{wanted} ready")
    if rollout.message:
        console.print(f"  {rollout.message}")
    if rollout.state == resources_pb2.ROLLOUT_STATE_PROGRESSING:
        policy = rollout.policy
        console.print(f"  steps {list(policy.steps)} every {policy.interval_s:g}s; limits: error rate "
                      f"{policy.max_error_rate:.0%}, p95 TTFT {policy.max_ttft_ratio:g}x the stable revision's")
    metrics = {m.revision: m for m in service.metrics}
    window = max((m.window_s for m in service.metrics), default=0.0)
    table = Table("REVISION", "DEPLOYMENT", "IMAGE", "TRAFFIC", "READY", "REQ/S", "ERRORS", "P95 TTFT",
                  title=f"window: last {window:.0f}s" if window else None)
    for number, deployment in deployments.items():
        revision = _revision(service, number)
        assert revision is not None  # the deployments listed are the service's revisions'
        shown = f"{deployment.ready_replicas}/{deployment.replicas}" if deployment is not None else "-"
        m = metrics.get(number)
        table.add_row(str(number), revision.deployment, revision.template.image, f"{weights.get(number, 0)}%", shown,
                      f"{m.request_rate:.2f}" if m else "-",
                      f"{m.error_rate:.1%} ({m.errors}/{m.requests})" if m else "-",
                      f"{m.p95_ttft_s * 1000:.0f}ms" if m and m.p95_ttft_s else "-")
    console.print(table)
    now = time.time()
    for event in list(service.events)[-5:]:
        console.print(f"  {_ago(event.time, now):>8}  {event.reason:<12} {event.message}", highlight=False)
    _replica_table(control, [r.deployment for r in (_revision(service, n) for n in live) if r], console)
    return 0


def _replica_table(control: Client, deployments: list[str], console: Console) -> None:
    table = Table("REPLICA", "DEPLOYMENT", "NODE", "STATE", "RESTARTS", "MESSAGE")
    for name in dict.fromkeys(deployments):
        for r in control.deployments.replicas(name) if _deployment(control, name) is not None else []:
            state = resources_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower()
            table.add_row(r.id, name, r.node or "-", state, str(r.restarts), r.message)
    console.print(table)


def serve_history(control: Client, name: str, console: Console) -> int:
    service = _service(control, name)
    if service is None:
        raise NotFound(f"service {name} has no revisions (it does not exist, or was made before revisions: "
                       "`clowder serve update` records them from now on)")
    rollout = service.rollout
    weights = {t.revision: t.percent for t in service.traffic}
    table = Table("REVISION", "CREATED", "DEPLOYMENT", "IMAGE", "REPLICAS", "STATUS", "CHANGE")
    for revision in service.revisions:
        n = revision.number
        status = ("stable" if n == rollout.stable_revision else "candidate" if n == rollout.candidate_revision
                  else "retired")
        if n in weights and status != "retired":
            status += f" ({weights[n]}%)"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(revision.create_time.seconds))
        table.add_row(str(n), created, revision.deployment, revision.template.image, str(revision.template.replicas),
                      status, revision.change)
    console.print(table)
    return 0


def serve_promote(control: Client, name: str, console: Console) -> int:
    service = control.services.promote(name)
    console.print(f"service {name}: revision {service.rollout.stable_revision} takes all traffic")
    return 0


def serve_rollback(control: Client, name: str, console: Console, to: int = 0) -> int:
    service = control.services.rollback(name, to)
    console.print(f"service {name}: {service.rollout.message}")
    return 0


def serve_traffic(control: Client, name: str, console: Console, pairs: list[str]) -> int:
    percents = {}
    for pair in pairs:
        revision, sep, percent = pair.partition("=")
        if not sep or not revision.strip().isdigit() or not percent.strip().isdigit():
            raise InvalidArgument(f"{pair!r}: expected REVISION=PERCENT, e.g. 2=30", field="traffic")
        percents[int(revision)] = int(percent)
    service = control.services.set_traffic(name, percents)
    console.print(f"service {name}: {service.rollout.message}")
    return 0


def serve_down(control: Client, name: str, console: Console, timeout: float = 120) -> int:
    """Delete the service and its revisions' deployments, wait for their replicas to go, then remove the
    service's unused aimages."""
    service = _service(control, name)
    deployments = {name}
    if service is not None:
        deployments |= {r.deployment for r in service.revisions}
        control.services.delete(name)
    elif _deployment(control, name) is None:
        raise NotFound(f"service {name} does not exist")
    if _deployment(control, name) is not None:
        control.deployments.delete(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(r.deployment in deployments for r in control.deployments.replicas("-")):
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


# Commands `clowder serve` has beside up, update, status, down and logs (main.py wires them).
def add_revision_commands(serve_sub) -> None:
    serve_sub.add_parser("history", help="the service's revisions").add_argument("name")
    serve_sub.add_parser("promote", help="all traffic to the new revision").add_argument("name")
    rollback = serve_sub.add_parser("rollback", help="all traffic back to the stable (or an older) revision")
    rollback.add_argument("name")
    rollback.add_argument("--to", type=int, default=0, metavar="REVISION")
    traffic = serve_sub.add_parser("traffic", help="split the traffic by hand: REVISION=PERCENT ...")
    traffic.add_argument("name")
    traffic.add_argument("split", nargs="+", metavar="REVISION=PERCENT")


REVISION_COMMANDS = ("history", "promote", "rollback", "traffic")


def run_revision_command(args, control: Client, console: Console) -> int:
    if args.serve_command == "history":
        return serve_history(control, args.name, console)
    if args.serve_command == "promote":
        return serve_promote(control, args.name, console)
    if args.serve_command == "rollback":
        return serve_rollback(control, args.name, console, args.to)
    return serve_traffic(control, args.name, console, args.split)


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

