"""`clowder apikey create|ls|revoke`: user API keys for the OpenAI API, managed on a balancer with the admin token."""

from __future__ import annotations

import argparse
import os
import pathlib

from rich.console import Console
from rich.table import Table

from clowder.client import Client
from clowder_cli import paths
from clowder_common.auth import read_admin_token
from clowder_common.errors import NotFound

CALL_DEADLINE_S = 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    apikey = sub.add_parser("apikey", help="manage user API keys for the OpenAI API")
    apikey.add_argument("--balancer", default=os.environ.get("CLOWDER_BALANCER_GRPC"),
                        help="balancer gRPC address host:port (default: the local cluster's)")
    verbs = apikey.add_subparsers(dest="apikey_command", required=True)
    create = verbs.add_parser("create", help="create a key (its secret is printed once)")
    create.add_argument("--group", action="append", default=[], dest="groups",
                        help="group the key belongs to (repeatable)")
    create.add_argument("--description", default="", help="who or what uses the key")
    verbs.add_parser("ls", help="list keys (never their secrets)")
    revoke = verbs.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("id")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "apikey"


def _address(args: argparse.Namespace, data_dir: pathlib.Path) -> str:
    if args.balancer:
        return args.balancer
    cluster = paths.read_cluster(data_dir)
    if cluster is None or not cluster.get("balancer_grpc"):
        raise NotFound(f"no local cluster is running from {data_dir}: run `clowder up` (or pass --balancer)")
    return cluster["balancer_grpc"]


def run(args: argparse.Namespace, data_dir: pathlib.Path, console: Console) -> int:
    with Client(balancer=_address(args, data_dir), admin_token=read_admin_token(data_dir),
                timeout_s=CALL_DEADLINE_S) as client:
        if args.apikey_command == "create":
            record, secret = client.api_keys.create(args.description, args.groups)
            console.print(f"API key {record.id} created; it is shown only now:", highlight=False)
            # Plain print: rich could wrap the key across lines.
            print(secret)
            return 0
        if args.apikey_command == "ls":
            table = Table("ID", "GROUPS", "DESCRIPTION", "CREATED")
            for key in client.api_keys.list():
                created = key.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M") if key.create_time.seconds else ""
                table.add_row(key.id, ",".join(key.groups), key.description, created)
            console.print(table)
            return 0
        client.api_keys.revoke(args.id)
        console.print(f"API key {args.id} revoked")
        return 0
