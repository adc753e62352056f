"""`clowder usage`: tokens used per API key, model and day (UTC), as the balancers recorded them."""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from clowder.balancer.v1 import apikeys_pb2
from clowder.client import Client
from clowder_cli.apikey_commands import CALL_DEADLINE_S, balancer_address
from clowder_common.auth import read_admin_token


def add_parser(sub: argparse._SubParsersAction) -> None:
    usage = sub.add_parser("usage", help="tokens used per API key, model and day")
    usage.add_argument("--balancer", default=os.environ.get("CLOWDER_BALANCER_GRPC"),
                       help="balancer gRPC address host:port (default: the local cluster's)")
    usage.add_argument("--key", default="", help="only this API key id")
    usage.add_argument("--group", default="", help="only keys in this group")
    usage.add_argument("--model", default="", help="only this model")
    usage.add_argument("--since", default="", metavar="YYYY-MM-DD", help="first day (UTC)")
    usage.add_argument("--until", default="", metavar="YYYY-MM-DD", help="last day (UTC; default today)")
    usage.add_argument("--json", action="store_true", help="print the records as JSON")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "usage"


def run(args: argparse.Namespace, data_dir: pathlib.Path, console: Console) -> int:
    request = apikeys_pb2.GetUsageRequest(key=args.key, group=args.group, model=args.model,
                                          start_date=args.since, end_date=args.until)
    with Client(balancer=balancer_address(args, data_dir), admin_token=read_admin_token(data_dir),
                timeout_s=CALL_DEADLINE_S) as client:
        reply = client.api_keys.usage(request)
    if args.json:
        print(json.dumps(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
        return 0
    table = Table("DATE", "KEY", "MODEL", "GROUPS", "REQUESTS", "PROMPT", "CACHED", "COMPLETION")
    for r in reply.records:
        table.add_row(r.date, r.key, r.model, ",".join(r.groups), str(r.requests), str(r.prompt_tokens),
                      str(r.cached_prompt_tokens), str(r.completion_tokens))
    table.add_row("total", "", "", "", str(reply.requests), str(reply.prompt_tokens),
                  str(reply.cached_prompt_tokens), str(reply.completion_tokens))
    console.print(table)
    return 0
