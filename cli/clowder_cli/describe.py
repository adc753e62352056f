"""`clowder describe DEPLOYMENT`: a deployment's settings, its replicas and its recent events."""

from __future__ import annotations

import argparse
import datetime

from rich.console import Console
from rich.table import Table

from clowder.controller.v1 import resources_pb2
from clowder.client import Client
from clowder_cli.formatting import STATE_NAMES



def add_parser(sub: argparse._SubParsersAction) -> None:
    describe = sub.add_parser("describe", help="a deployment's replicas and recent events")
    describe.add_argument("name")


def when(event: resources_pb2.DeploymentEvent) -> str:
    moment = event.time.ToDatetime(tzinfo=datetime.timezone.utc).astimezone()
    return moment.strftime("%H:%M:%S")


def last_event(deployment: resources_pb2.Deployment) -> str:
    """`clowder ps` shows this: the newest event in one line."""
    if not deployment.events:
        return "-"
    event = deployment.events[-1]
    return f"{when(event)} {event.reason}: {event.message}"


def run(args: argparse.Namespace, control: Client, console: Console) -> int:
    d = control.deployments.get(args.name)
    console.print(f"[bold]{d.name}[/bold]  image {d.image}  ready {d.ready_replicas}/{d.replicas}", highlight=False)
    if d.max_replicas:
        zero = f", to zero after {d.scale_to_zero_after_s}s idle" if d.scale_to_zero_after_s else ""
        console.print(f"autoscaling {d.min_replicas}..{d.max_replicas} replicas, "
                      f"target {d.target_in_flight or 4:g} requests per replica{zero}", highlight=False)
    settings = [f"{name.replace('_', ' ')} {getattr(d, name)}" for name in ("slots", "threads", "context_size",
                                                                             "batch_size") if d.HasField(name)]
    if settings:
        console.print("runtime (overrides the aimage's): " + ", ".join(settings), highlight=False)
    constraints = [f"{k}={v}" for k, v in sorted(d.node_selector.items())]
    if d.memory_bytes:
        constraints.append(f"memory {d.memory_bytes / (1 << 30):.2f} GiB")
    if d.gpus:
        constraints.append(f"{d.gpus} GPU(s)")
    if constraints:
        console.print("placement: " + ", ".join(constraints), highlight=False)
    replicas = control.deployments.replicas(args.name)
    table = Table("REPLICA", "NODE", "STATE", "RESTARTS", "ENDPOINT", "MESSAGE", title="replicas")
    for r in replicas:
        table.add_row(r.id, r.node or "-", STATE_NAMES.get(r.state, "unknown"), str(r.restarts), r.endpoint or "-",
                      r.message)
    console.print(table)
    events = Table("TIME", "REASON", "REPLICA", "MESSAGE", title="events")
    for e in d.events:
        events.add_row(when(e), e.reason, e.replica or "-", e.message)
    console.print(events)
    return 0
