"""Command line: `python -m clowder_balancer --http-listen HOST:PORT --grpc-listen HOST:PORT --etcd-endpoints ...`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os

from clowder_common.auth import TOKEN_ENV
from clowder_common.config import load_config
from clowder_common.errors import ClowderError
from clowder_common.lifecycle import Lifecycle, die_with_parent, serve_until_stopped
from clowder_common.logs import setup_logging
from clowder_common.telemetry import setup_telemetry, shutdown_telemetry

from clowder_balancer import logcontext
from clowder_balancer.app import create_balancer
from clowder_balancer.config import BalancerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clowder_balancer",
        description="Clowder balancer: the OpenAI-compatible front door that routes requests to runtimes.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file (flags and CLOWDER_* env override it)")
    parser.add_argument("--http-listen", metavar="HOST:PORT", help="OpenAI HTTP API address (default 127.0.0.1:3090)")
    parser.add_argument("--grpc-listen", metavar="HOST:PORT", help="gRPC InferenceService address (default 127.0.0.1:3091)")
    parser.add_argument("--etcd-endpoints", metavar="HOST:PORT[,...]", help="etcd client endpoints")
    parser.add_argument("--etcd-prefix", metavar="PREFIX", help="key prefix of the cluster state (default /clowder/)")
    parser.add_argument("--ready-timeout-s", type=float, metavar="S",
                        help="how long a request waits for a ready replica before a 503 (default 60)")
    parser.add_argument("--request-timeout-s", type=float, metavar="S", help="deadline of one runtime call (default 600)")
    parser.add_argument("--first-token-timeout-s", type=float, metavar="S",
                        help="how long to wait for a runtime's first token (default 60)")
    parser.add_argument("--drain-grace-s", type=float, metavar="S",
                        help="how long shutdown lets in-flight streams finish (default 10)")
    parser.add_argument("--controller-address", metavar="HOST:PORT",
                        help="controller gRPC address the REST bridge under /api/v1 forwards to (default 127.0.0.1:3092)")
    parser.add_argument("--name", help="name of this balancer in logs and its load report (default balancer)")
    parser.add_argument("--routing-profile", metavar="NAME",
                        help="default, least-load, round-robin, random, least-in-flight, or one from the file")
    parser.add_argument("--routing-profiles-file", metavar="FILE", help="YAML file of extra routing profiles")
    parser.add_argument("--require-api-keys", action="store_true", default=None,
                        help="refuse /v1/* and InferenceService calls without a valid user API key")
    parser.add_argument("--stats-interval-s", type=float, metavar="S",
                        help="how often runtimes' GetStats is polled (default 0.5; 0 turns it off)")
    return parser


EXPORTER_ENV = "CLOWDER_OTEL_EXPORTER"


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    parser = build_parser()
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(BalancerConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    try:
        config = load_config(BalancerConfig, args.config, overrides=overrides)
    except (ClowderError, OSError) as exc:
        parser.error(str(exc))
    setup_logging(config.name)
    logcontext.install()

    async def start(lifecycle: Lifecycle) -> None:
        # The admin token guards ApiKeyService only; user keys are for inference.
        app = await create_balancer(config, admin_token=os.environ.get(TOKEN_ENV, "").strip() or None)
        lifecycle.on_shutdown("balancer", app.stop)
        await app.start()

    # Spans nobody exports are pure cost on every request (and make each runtime call carry a trace
    # context for the runtime to record too): trace only when an exporter is configured.
    provider = setup_telemetry("balancer") if os.environ.get(EXPORTER_ENV, "").strip() else None
    try:
        asyncio.run(serve_until_stopped(start))
    finally:
        shutdown_telemetry(provider)


if __name__ == "__main__":
    main()
