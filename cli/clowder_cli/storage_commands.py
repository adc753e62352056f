"""`clowder storage ls|gc|verify|pull` and `clowder image push`: operator commands on a node's store."""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, Callable, Iterable

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_cli import paths
from clowder_cli.formatting import human_bytes
from clowder.client import Client
from clowder.client._settings import client_security
from clowder_common.auth import bearer_metadata, read_admin_token
from clowder_common.clients import sync_channel
from clowder_common.errors import FailedPrecondition, InvalidArgument, from_rpc_error

CALL_DEADLINE_S = 60
TRANSFER_DEADLINE_S = 6 * 3600


def add_parsers(sub: argparse._SubParsersAction, image: argparse._SubParsersAction) -> None:
    """Adds `storage ...` and `image push` to the main parser."""
    storage = sub.add_parser("storage", help="inspect and maintain a node's layer store")
    storage.add_argument("--storage", default=os.environ.get("CLOWDER_STORAGE"),
                         help="storage address host:port (default: the local cluster's)")
    verbs = storage.add_subparsers(dest="storage_command", required=True)
    verbs.add_parser("ls", help="images, blobs and usage of the store")
    gc = verbs.add_parser("gc", help="remove blobs no image references and no runtime pins")
    gc.add_argument("--dry-run", action="store_true", help="only list what would go")
    verify = verbs.add_parser("verify", help="re-hash blobs; quarantine the ones that no longer match")
    verify.add_argument("digests", nargs="*", help="default: every blob")
    pull = verbs.add_parser("pull", help="pull an aimage from an OCI registry into the store")
    pull.add_argument("source", help="oci://REGISTRY/REPO:TAG or oci://REGISTRY/REPO@sha256:...")
    pull.add_argument("--name", required=True, help="name in the store")
    _credential_flags(pull)

    push = image.add_parser("push", help="push an aimage to an OCI registry (oci://REGISTRY/REPO:TAG)")
    push.add_argument("alias")
    push.add_argument("target")
    push.add_argument("--storage", default=os.environ.get("CLOWDER_STORAGE"),
                      help="storage address host:port holding the aimage (default: the local cluster's)")
    _credential_flags(push)


def _credential_flags(parser: argparse.ArgumentParser) -> None:
    # Secrets come from the environment, never from argv (visible to every user in `ps`).
    parser.add_argument("--username", default="", help="registry user")
    parser.add_argument("--password-env", default="", metavar="VAR", help="environment variable with the password")
    parser.add_argument("--token-env", default="", metavar="VAR", help="environment variable with a bearer token")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "storage" or (args.command == "image" and args.image_command == "push")


def _credentials(args: argparse.Namespace) -> storage_pb2.Credentials:
    def secret(var: str) -> str:
        value = os.environ.get(var)
        if value is None:
            raise InvalidArgument(f"environment variable {var} is not set", field=var)
        return value

    return storage_pb2.Credentials(
        username=args.username,
        password=secret(args.password_env) if args.password_env else "",
        bearer_token=secret(args.token_env) if args.token_env else "",
    )


class StorageClient:
    def __init__(self, address: str, token: str | None) -> None:
        # TLS as the SDK's clients have it (CLOWDER_TLS_* files); storage takes the admin token as credential.
        self._channel = sync_channel(address, client_security())
        self._metadata = bearer_metadata(token)
        self.stub = storage_pb2_grpc.StorageServiceStub(self._channel)

    def call(self, method, request, timeout: float = CALL_DEADLINE_S):
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method, request) -> Iterable:
        try:
            yield from method(request, metadata=self._metadata, timeout=TRANSFER_DEADLINE_S)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()


def _storage_address(args: argparse.Namespace, data_dir: pathlib.Path) -> str:
    return args.storage or paths.local_address(data_dir, "storage", "--storage")


def show_layers(title: str, stream: Iterable[Any], console: Console, final: Callable[[Any], bool]) -> Any:
    """One bar per layer (bytes, rate, ETA); returns the message `final` accepts."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    last = None
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[int, TaskID] = {}
        for message in stream:
            if final(message):
                last = message
                continue
            layer = message.layer
            if layer.index not in tasks:
                label = "config" if layer.index < 0 else f"layer {layer.index}"
                tasks[layer.index] = bar.add_task(f"{title} {label}", total=None)
            bar.update(tasks[layer.index], completed=layer.progress.bytes_done,
                       total=layer.progress.bytes_total or None)
    return last


def run(args: argparse.Namespace, data_dir: pathlib.Path, console: Console,
        connect: Callable[[], Client]) -> int:
    client = StorageClient(_storage_address(args, data_dir), read_admin_token(data_dir))
    try:
        if args.command == "image":
            return _push(args, client, console, connect)
        if args.storage_command == "ls":
            return _ls(client, console)
        if args.storage_command == "gc":
            reply = client.call(client.stub.CollectGarbage, storage_pb2.CollectGarbageRequest(dry_run=args.dry_run))
            verb = "would remove" if args.dry_run else "removed"
            for digest in reply.removed_digests:
                console.print(f"  {digest}")
            console.print(f"{verb} {len(reply.removed_digests)} blob(s), {human_bytes(reply.freed_bytes)}")
            return 0
        if args.storage_command == "verify":
            reply = client.call(client.stub.VerifyBlobs, storage_pb2.VerifyBlobsRequest(digests=args.digests),
                                timeout=TRANSFER_DEADLINE_S)
            for digest in reply.quarantined_digests:
                console.print(f"[red]quarantined[/red] {digest}", highlight=False)
            console.print(f"checked {reply.checked} blob(s), {len(reply.quarantined_digests)} bad")
            return 1 if reply.quarantined_digests else 0
        request = storage_pb2.PullImageRequest(name=args.name, source_url=args.source,
                                               credentials=_credentials(args))
        done = show_layers(f"pull {args.name}", client.stream(client.stub.PullImage, request), console,
                           lambda m: m.HasField("image"))
        if done is not None:
            console.print(f"{args.name}: {done.image.manifest_digest} ({human_bytes(done.image.size_bytes)})")
        return 0
    finally:
        client.close()


def _push(args: argparse.Namespace, client: StorageClient, console: Console,
          connect: Callable[[], Client]) -> int:
    control = connect()
    try:
        image = control.images.get(args.alias)
    finally:
        control.close()
    if not image.digest:
        raise FailedPrecondition(f"image {args.alias} has not been pulled yet: run `clowder image pull {args.alias}`")
    # Record the aimage as an OCI manifest in the store (instant: its layer is already there), then push it.
    layer = storage_pb2.LayerSource(kind=storage_pb2.LAYER_KIND_MODEL, source_url=image.source_url,
                                    expected_digest=image.digest)
    # The same JSON the controller stores, so the config blob (and the manifest digest) stay the same.
    config = json_format.MessageToJson(image.configuration, indent=None)
    request = storage_pb2.PullImageRequest(name=args.alias, layers=[layer], configuration_json=config)
    for _ in client.stream(client.stub.PullImage, request):
        pass
    push = storage_pb2.PushImageRequest(name=args.alias, target_url=args.target, credentials=_credentials(args))
    done = show_layers(f"push {args.alias}", client.stream(client.stub.PushImage, push), console,
                       lambda m: bool(m.manifest_digest))
    if done is not None:
        console.print(f"pushed {args.alias} to {args.target} as {done.manifest_digest}")
    return 0


def _ls(client: StorageClient, console: Console) -> int:
    images = client.call(client.stub.ListImages, storage_pb2.ListImagesRequest()).images
    table = Table("IMAGE", "MANIFEST", "LAYERS", "SIZE", "COMPLETE")
    for image in images:
        table.add_row(image.name, image.manifest_digest[:19], str(len(image.layers)), human_bytes(image.size_bytes),
                      "yes" if image.complete else "no")
    console.print(table)
    blobs = client.call(client.stub.ListBlobs, storage_pb2.ListBlobsRequest()).blobs
    table = Table("BLOB", "SIZE")
    for blob in blobs:
        table.add_row(blob.digest, human_bytes(blob.size_bytes))
    console.print(table)
    stats = client.call(client.stub.GetStoreStats, storage_pb2.GetStoreStatsRequest())
    quota = human_bytes(stats.quota_bytes) if stats.quota_bytes else "none"
    console.print(f"used {human_bytes(stats.used_bytes)} in {stats.blob_count} blob(s), pinned"
                  f" {human_bytes(stats.pinned_bytes)}, quota {quota}, volume free {human_bytes(stats.free_bytes)}")
    return 0
