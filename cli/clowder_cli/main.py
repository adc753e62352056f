"""The `clowder` command: run a local cluster and manage images and deployments."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from clowder.controller.v1 import resources_pb2
from clowder_cli import adapter_commands
from clowder_cli import apikey_commands
from clowder_cli import batch_commands
from clowder_cli import describe as describe_command
from clowder_cli import paths
from clowder_cli.formatting import STATE_NAMES, human_bytes
from clowder_cli import storage_commands
from clowder_cli import usage_commands
from clowder.client import Client
from clowder_cli.control import describe, open_control_plane
from clowder_cli.up import pull_with_retry, run_down, run_status, run_up
from clowder_common.auth import read_admin_token
from clowder_common.errors import ClowderError, NotFound



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clowder", description=__doc__,
        epilog="TLS: with CLOWDER_TLS_CA_FILE set, every call goes over TLS and verifies the cluster with that CA; "
               "CLOWDER_TLS_CERT_FILE and CLOWDER_TLS_KEY_FILE add a client certificate (mutual TLS).")
    parser.add_argument("--data-dir", type=pathlib.Path, default=None,
                        help="local cluster directory (default: $CLOWDER_DATA_DIR or ~/.local/share/clowder)")
    parser.add_argument("--controller", default=os.environ.get("CLOWDER_CONTROLLER"),
                        help="controller address host:port (default: the local cluster's)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run etcd, controller, storage and balancer here until Ctrl-C")
    up.add_argument("--demo", action="store_true", help="also serve the bundled SmolLM2 as `smol`")
    up.add_argument("--http-port", type=int, default=3090, help="OpenAI API port (default 3090)")
    up.add_argument("--internal-ports", default="3091",
                    help="first of five consecutive internal ports, or 'auto' for free ones (default 3091)")
    sub.add_parser("down", help="stop the local cluster and everything it started")
    status = sub.add_parser("status", help="the local cluster's components: state, pid, uptime, restarts")
    status.add_argument("--json", action="store_true", help="print the supervisor's state as JSON")

    image = sub.add_parser("image", help="manage aimages").add_subparsers(dest="image_command", required=True)
    add = image.add_parser("add", help="add an aimage and pull it onto a node")
    add.add_argument("alias")
    add.add_argument("url", help="file:///path, http(s)://... or a local path")
    add.add_argument("--system-prompt", default="")
    add.add_argument("--context-size", type=int, default=0, help="context per slot in tokens (default 2048)")
    add_runtime_flags(add, context=False)
    add.add_argument("--no-pull", action="store_true", help="only record it; deployments pull on demand")
    add.add_argument("--credentials-ref", default="",
                     help="where the storage node reads the source's secret: env:NAME or file:/path")
    add.add_argument("--credentials-username", default="", help="Basic auth user or S3 access key id")
    image.add_parser("ls", help="list aimages")
    rm = image.add_parser("rm", help="remove an aimage no deployment uses")
    rm.add_argument("alias")
    pull = image.add_parser("pull", help="pull an aimage onto a node")
    pull.add_argument("alias")
    pull.add_argument("--node", default="")

    deploy = sub.add_parser("deploy", help="run N replicas of an aimage (creates or scales)")
    deploy.add_argument("image")
    deploy.add_argument("--replicas", type=int, default=1)
    deploy.add_argument("--name", default="", help="deployment (and model) name; default: the image alias")
    add_runtime_flags(deploy, context=True)
    undeploy = sub.add_parser("undeploy", help="stop and remove a deployment")
    undeploy.add_argument("name")
    serve_parser = sub.add_parser("serve", help="run a service declared in a YAML spec")
    serve_sub = serve_parser.add_subparsers(dest="serve_command", required=True)
    for verb, text in (("up", "create the service (unchanged spec: no change)"),
                       ("update", "apply a changed spec: a new revision (rolling, canary, or --weight)")):
        serve_sub.add_parser(verb, help=text).add_argument("-f", "--file", type=pathlib.Path, required=True)
    serve_sub.choices["update"].add_argument("--weight", type=int, metavar="PERCENT",
                                             help="the new revision takes this share of the traffic, and stays")
    from clowder_cli.serve import add_revision_commands

    add_revision_commands(serve_sub)
    for verb, text in (("status", "the service's replicas"), ("down", "stop and remove the service")):
        serve_sub.add_parser(verb, help=text).add_argument("name")
    logs = serve_sub.add_parser("logs", help="logs of the service's runtimes on this machine")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true")
    sub.add_parser("ps", help="deployments and their replicas")
    sub.add_parser("nodes", help="registered nodes")
    describe_command.add_parser(sub)
    storage_commands.add_parsers(sub, image)
    apikey_commands.add_parser(sub)
    adapter_commands.add_parser(sub)
    batch_commands.add_parser(sub)
    usage_commands.add_parser(sub)
    return parser


def add_runtime_flags(parser: argparse.ArgumentParser, context: bool) -> None:
    """How each replica runs llama.cpp; unset flags leave the aimage's (or the cluster's) values."""
    parser.add_argument("--slots", type=int, help="sequences decoded together (default 8)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: the node's CPUs shared among "
                                                    "its replicas)")
    if context:
        parser.add_argument("--context-size", type=int, help="context per slot in tokens (default: the aimage's, "
                                                             "else 2048)")
    parser.add_argument("--batch-size", type=int, help="prompt tokens evaluated per step (default 256)")


def runtime_flags(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name, None) for name in ("slots", "threads", "context_size", "batch_size")}


def connect(args: argparse.Namespace, data_dir: pathlib.Path) -> Client:
    address = args.controller or paths.local_address(data_dir, "controller", "--controller")
    return open_control_plane(address, read_admin_token(data_dir))


def cmd_image(args, control: Client, console: Console) -> int:
    if args.image_command == "add":
        flags: dict[str, Any] = {k: v for k, v in runtime_flags(args).items() if v is not None and k != "context_size"}
        config = resources_pb2.ImageConfiguration(system_prompt=args.system_prompt, context_size=args.context_size,
                                                  **flags)
        control.images.create(args.alias, paths.source_url(args.url), config, credentials_ref=args.credentials_ref,
                              credentials_username=args.credentials_username)
        console.print(f"image {args.alias} added")
        if not args.no_pull:
            pull(control, args.alias, "", console)
    elif args.image_command == "pull":
        pull(control, args.alias, args.node, console)
    elif args.image_command == "rm":
        control.images.delete(args.alias)
        console.print(f"image {args.alias} removed")
    else:
        table = Table("ALIAS", "SOURCE", "DIGEST", "SIZE")
        for image in control.images.list():  # every page
            table.add_row(image.alias, image.source_url, image.digest[:19] or "-",
                          human_bytes(image.size_bytes) if image.size_bytes else "-")
        console.print(table)
    return 0


def pull(control: Client, alias: str, node: str, console: Console) -> None:
    blob = pull_with_retry(control, alias, console, node)
    if blob is not None:
        console.print(f"{alias}: {blob.digest} ({human_bytes(blob.size_bytes)})")


def cmd_deploy(args, control: Client, console: Console) -> int:
    name = args.name or args.image
    settings: dict[str, Any] = runtime_flags(args)
    given = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items() if v is not None)
    try:
        control.deployments.get(name)
    except NotFound:
        control.deployments.create(name, args.image, args.replicas, **settings)
        console.print(f"deployment {name} created with {args.replicas} replica(s)" + (f"; {given}" if given else ""))
        return 0
    control.deployments.update(name, replicas=args.replicas, image=args.image, **settings)
    console.print(f"deployment {name} set to {args.replicas} replica(s)" + (f"; {given}" if given else ""))
    return 0


def cmd_serve(args, control: Client, console: Console, data_dir: pathlib.Path) -> int:
    from clowder_cli import serve

    if args.serve_command in ("up", "update"):
        spec = serve.load_spec(args.file)
        if args.serve_command == "up":
            return serve.serve_up(control, spec, console)
        return serve.serve_update(control, spec, console, weight=args.weight)
    if args.serve_command in serve.REVISION_COMMANDS:
        return serve.run_revision_command(args, control, console)
    if args.serve_command == "status":
        return serve.serve_status(control, args.name, console)
    if args.serve_command == "down":
        return serve.serve_down(control, args.name, console)
    try:
        return serve.follow_logs(data_dir / "controller" / "logs", args.name, console, args.follow)
    except KeyboardInterrupt:
        return 0


def cmd_ps(control: Client, console: Console) -> int:
    deployments = list(control.deployments.list())
    table = Table("DEPLOYMENT", "IMAGE", "READY", "LAST EVENT")
    for d in deployments:
        table.add_row(d.name, d.image, f"{d.ready_replicas}/{d.replicas}", describe_command.last_event(d))
    console.print(table)
    replicas = control.deployments.replicas("-")
    table = Table("DEPLOYMENT", "REPLICA", "NODE", "STATE", "RESTARTS", "ENDPOINT", "MESSAGE")
    for r in replicas:
        table.add_row(r.deployment, r.id, r.node or "-", STATE_NAMES.get(r.state, "unknown"), str(r.restarts),
                      r.endpoint or "-", r.message)
    console.print(table)
    return 0


def cmd_nodes(control: Client, console: Console) -> int:
    nodes = control.nodes.list()
    table = Table("NODE", "STORAGE", "CPUS", "MEMORY", "STORE FREE", "LABELS")
    for n in nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        table.add_row(n.name, n.storage_address, str(n.cpus), human_bytes(n.memory_bytes),
                      human_bytes(n.store_free_bytes), labels or "-")
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    data_dir = (args.data_dir or paths.default_data_dir()).expanduser()
    if args.command == "up":
        return run_up(data_dir, args.http_port, args.internal_ports, args.demo, console)
    if args.command == "down":
        return run_down(data_dir, console)
    if args.command == "status":
        return run_status(data_dir, console, args.json)
    try:
        if storage_commands.handles(args):
            return storage_commands.run(args, data_dir, console, lambda: connect(args, data_dir))
        if apikey_commands.handles(args):
            return apikey_commands.run(args, data_dir, console)
        if batch_commands.handles(args):
            return batch_commands.run(args, data_dir, console)
        if usage_commands.handles(args):
            return usage_commands.run(args, data_dir, console)
        control = connect(args, data_dir)
        try:
            if adapter_commands.handles(args):
                return adapter_commands.run(args, control, console)
            if args.command == "image":
                return cmd_image(args, control, console)
            if args.command == "deploy":
                return cmd_deploy(args, control, console)
            if args.command == "undeploy":
                control.deployments.delete(args.name)
                console.print(f"deployment {args.name} removed")
                return 0
            if args.command == "serve":
                return cmd_serve(args, control, console, data_dir)
            if args.command == "ps":
                return cmd_ps(control, console)
            if args.command == "describe":
                return describe_command.run(args, control, console)
            return cmd_nodes(control, console)
        finally:
            control.close()
    except ClowderError as err:
        console.print(f"[red]error:[/red] {describe(err)}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
