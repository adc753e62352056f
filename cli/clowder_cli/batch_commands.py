"""`clowder batch create|ls|get|cancel|results`: batch jobs (the OpenAI Batch API) on a balancer, under the
API key in CLOWDER_API_KEY (or none)."""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys

from rich.console import Console
from rich.table import Table

from clowder.balancer.v1 import batch_pb2
from clowder.client import Client
from clowder_cli.apikey_commands import balancer_address
from clowder_common.errors import InvalidArgument

CALL_DEADLINE_S = 60
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def add_parser(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="batch jobs: a JSONL file of requests run on idle capacity")
    batch.add_argument("--balancer", default=os.environ.get("CLOWDER_BALANCER_GRPC"),
                       help="balancer gRPC address host:port (default: the local cluster's)")
    verbs = batch.add_subparsers(dest="batch_command", required=True)
    create = verbs.add_parser("create", help="upload a JSONL file and start a batch on it")
    create.add_argument("file", type=pathlib.Path, help="JSONL: one {custom_id, method, url, body} per line")
    create.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/chat/completions")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    create.add_argument("--wait", action="store_true", help="wait until the batch has ended")
    verbs.add_parser("ls", help="batches, newest first")
    get = verbs.add_parser("get", help="one batch: status, counts, files")
    get.add_argument("id")
    cancel = verbs.add_parser("cancel", help="stop a batch; finished results are kept")
    cancel.add_argument("id")
    results = verbs.add_parser("results", help="print a batch's output lines (JSONL)")
    results.add_argument("id")
    results.add_argument("--errors", action="store_true", help="the error file's lines instead")
    results.add_argument("-o", "--output", type=pathlib.Path, help="write to this file instead of stdout")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "batch"


def status_name(status: int) -> str:
    return batch_pb2.BatchStatus.Name(status).removeprefix("BATCH_STATUS_").lower()


def _when(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--metadata {pair!r} is not KEY=VALUE", field="metadata")
        out[key] = value
    return out


def _show(batch: batch_pb2.Batch, console: Console) -> None:
    counts = batch.request_counts
    console.print(f"batch {batch.id}: {status_name(batch.status)}", highlight=False)
    console.print(f"  endpoint {batch.endpoint}, input {batch.input_file_id}, created {_when(batch.created_at)}",
                  highlight=False)
    console.print(f"  requests: {counts.total} total, {counts.completed} completed, {counts.failed} failed",
                  highlight=False)
    if batch.output_file_id or batch.error_file_id:
        console.print(f"  output {batch.output_file_id or '-'}, errors {batch.error_file_id or '-'}", highlight=False)
    for error in batch.errors:
        where = f"line {error.line}: " if error.line else ""
        console.print(f"  error {where}{error.code}: {error.message}", highlight=False)


def run(args: argparse.Namespace, data_dir: pathlib.Path, console: Console) -> int:
    with Client(balancer=balancer_address(args, data_dir), timeout_s=CALL_DEADLINE_S) as client:
        batches = client.batches
        if args.batch_command == "create":
            uploaded = batches.upload(args.file)
            batch = batches.create(uploaded.id, args.endpoint, metadata=_metadata(args.metadata))
            if args.wait:
                batch = batches.wait(batch.id)
            _show(batch, console)
            return 1 if batch.status == batch_pb2.BATCH_STATUS_FAILED else 0
        if args.batch_command == "ls":
            table = Table("ID", "STATUS", "ENDPOINT", "DONE", "FAILED", "TOTAL", "CREATED")
            for batch in batches.list():
                counts = batch.request_counts
                table.add_row(batch.id, status_name(batch.status), batch.endpoint, str(counts.completed),
                              str(counts.failed), str(counts.total), _when(batch.created_at))
            console.print(table)
            return 0
        if args.batch_command == "get":
            _show(batches.get(args.id), console)
            return 0
        if args.batch_command == "cancel":
            _show(batches.cancel(args.id), console)
            return 0
        batch = batches.get(args.id)
        file_id = batch.error_file_id if args.errors else batch.output_file_id
        content = batches.content(file_id) if file_id else b""
        if args.output:
            args.output.write_bytes(content)
            console.print(f"{len(content.splitlines())} lines written to {args.output}", highlight=False)
        else:
            sys.stdout.write(content.decode())
        if not file_id:
            # On stderr: stdout stays the (empty) JSONL a script may be reading.
            which = "error" if args.errors else "output"
            print(f"batch {args.id} ({status_name(batch.status)}) has no {which} file", file=sys.stderr)
        return 0
