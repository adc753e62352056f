"""`python -m clowder_storage`: run one node's storage service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Sequence

from clowder_common.auth import TOKEN_ENV
from clowder_common.config import load_config
from clowder_common.errors import ClowderError
from clowder_common.lifecycle import Lifecycle, die_with_parent, serve_until_stopped
from clowder_common.logs import setup_logging
from clowder_common.telemetry import setup_telemetry, shutdown_telemetry

from clowder_storage.app import create_storage
from clowder_storage.config import StorageConfig
from clowder_storage.malloc import keep_transfer_buffers

log = logging.getLogger("clowder_storage")

EXIT_USAGE = 2


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clowder_storage",
        description="Content-addressed model store of one node. Needs the admin token in "
        f"{TOKEN_ENV}; callers present it, or the cluster's service credential (CLOWDER_SERVICE_TOKEN or "
        "CLOWDER_SERVICE_TOKEN_FILE). Pulls by digest copy from peer nodes first (CLOWDER_PEER_PULLS; "
        "CLOWDER_PEERS_ONLY=true for an air-gapped node). "
        "Precedence: defaults < --config file < CLOWDER_<FIELD> environment < flags.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with StorageConfig fields")
    parser.add_argument("--listen", help="gRPC address host:port (default 127.0.0.1:3093)")
    parser.add_argument("--advertise-address", help="address published in etcd for others to dial")
    parser.add_argument("--data-dir", help="store root (default ~/.local/share/clowder/storage)")
    parser.add_argument("--node-name", help="node name in etcd (default local)")
    parser.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE",
                        help="node label, repeatable (replaces configured labels)")
    parser.add_argument("--etcd-endpoints", help="comma-separated host:port list")
    parser.add_argument("--etcd-prefix", help="key prefix (default /clowder/)")
    parser.add_argument("--lease-ttl-s", type=int, help="node lease TTL in seconds (default 10)")
    parser.add_argument("--max-parallel-pulls", type=int, help="downloads at once (default 4)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (default INFO or CLOWDER_LOG_LEVEL)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("storage", args.log_level)
    die_with_parent()
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        # An unauthenticated store would let anyone on the network read or replace model files.
        print(f"clowder_storage: refusing to start without an admin token; set {TOKEN_ENV}", file=sys.stderr)
        return EXIT_USAGE
    overrides = {
        "listen": args.listen,
        "advertise_address": args.advertise_address,
        "data_dir": args.data_dir,
        "node_name": args.node_name,
        "labels": dict(args.label) if args.label else None,
        "etcd_endpoints": args.etcd_endpoints,
        "etcd_prefix": args.etcd_prefix,
        "lease_ttl_s": args.lease_ttl_s,
        "max_parallel_pulls": args.max_parallel_pulls,
    }
    try:
        config = load_config(StorageConfig, args.config, overrides=overrides)
    except (ClowderError, OSError) as exc:
        print(f"clowder_storage: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    keep_transfer_buffers()

    async def start(lifecycle: Lifecycle) -> None:
        provider = setup_telemetry("storage")

        async def flush_telemetry() -> None:
            shutdown_telemetry(provider)

        lifecycle.on_shutdown("telemetry", flush_telemetry)
        app = await create_storage(config, token)
        lifecycle.on_shutdown("storage", app.stop)
        await app.start()
        log.info("serving on %s:%d (advertised as %s, node %s, store %s)", config.listen.rpartition(":")[0],
                 app.port, app.address, config.node_name, config.data_dir)

    try:
        asyncio.run(serve_until_stopped(start))
    except ClowderError as exc:
        log.error("storage failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
