"""`clowder adapter add|ls|rm`: LoRA adapters of a running deployment, loaded and unloaded without a restart."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from clowder.client import Client
from clowder_cli import paths


def add_parser(sub: argparse._SubParsersAction) -> None:
    adapter = sub.add_parser("adapter", help="LoRA adapters of a running deployment")
    commands = adapter.add_subparsers(dest="adapter_command", required=True)
    add = commands.add_parser("add", help="add an adapter; every ready replica loads it without a restart")
    add.add_argument("deployment")
    add.add_argument("name", help="what requests select it by (the OpenAI body's \"adapter\")")
    add.add_argument("source", help="a LoRA GGUF: a local file, or file://, http(s)://, hf:///, s3:// URL")
    add.add_argument("--digest", default="", help="sha256:<hex> the download must match")
    add.add_argument("--credentials-ref", default="", help="env:NAME or file:/path on the storage nodes")
    add.add_argument("--no-wait", action="store_true", help="return at once instead of when every replica has it")
    add.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the replicas (default 300)")
    ls = commands.add_parser("ls", help="a deployment's adapters and how many replicas serve each")
    ls.add_argument("deployment")
    rm = commands.add_parser("rm", help="remove an adapter; running streams finish, new requests are refused")
    rm.add_argument("deployment")
    rm.add_argument("name")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "adapter"


def run(args: argparse.Namespace, control: Client, console: Console) -> int:
    if args.adapter_command == "add":
        added = control.adapters.add(args.deployment, args.name, paths.source_url(args.source), digest=args.digest,
                                     credentials_ref=args.credentials_ref)
        if args.no_wait:
            console.print(f"adapter {added.name} added to {added.deployment}")
            return 0
        loaded = control.adapters.wait_loaded(args.deployment, args.name, timeout_s=args.timeout)
        console.print(f"adapter {loaded.name} loaded on {loaded.loaded_replicas}/{loaded.ready_replicas} replicas "
                      f"of {loaded.deployment} ({loaded.digest})")
        return 0
    if args.adapter_command == "rm":
        control.adapters.remove(args.deployment, args.name)
        console.print(f"adapter {args.name} removed from {args.deployment}; replicas unload it once its streams end")
        return 0
    table = Table("NAME", "LOADED", "SOURCE", "DIGEST", "MESSAGE")
    for a in control.adapters.list(args.deployment):
        table.add_row(a.name, f"{a.loaded_replicas}/{a.ready_replicas}", a.source_url, a.digest[:19], a.message)
    console.print(table)
    return 0
