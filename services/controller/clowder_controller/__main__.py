"""`python -m clowder_controller`: run the controller until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from clowder_common.auth import TOKEN_ENV
from clowder_common.config import load_config
from clowder_common.lifecycle import Lifecycle, die_with_parent, serve_until_stopped
from clowder_common.logs import setup_logging
from clowder_common.runtime_settings import MAX_CONTEXT_SIZE, MAX_SLOTS, MAX_THREADS, MIN_CONTEXT_SIZE
from clowder_common.telemetry import setup_telemetry, shutdown_telemetry
from clowder_controller.app import create_controller
from clowder_controller.config import ControllerConfig
from clowder_controller.launcher import check_node_exec, parse_node_exec_entry


def node_exec_entry(text: str) -> tuple[str, str]:
    try:
        return parse_node_exec_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def runtime_settings_problem(config: ControllerConfig) -> str:
    """What is wrong with the runtime defaults (flags, YAML, CLOWDER_RUNTIME_* from Helm); empty: nothing."""
    bounds = {"runtime_threads": MAX_THREADS, "runtime_slots": MAX_SLOTS, "runtime_context_size": MAX_CONTEXT_SIZE,
              "runtime_batch_size": MAX_CONTEXT_SIZE}
    for name, most in bounds.items():
        value = getattr(config, name)
        if not 0 <= value <= most:
            return f"{name} must be between 0 (the runtime's default) and {most}, got {value}"
    if 0 < config.runtime_context_size < MIN_CONTEXT_SIZE:
        return f"runtime_context_size must be 0 or at least {MIN_CONTEXT_SIZE}, got {config.runtime_context_size}"
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clowder_controller", description=__doc__)
    parser.add_argument("--config", help="YAML file with ControllerConfig fields")
    parser.add_argument("--listen", help="gRPC address (host:port)")
    parser.add_argument("--data-dir", help="where runtime logs go")
    parser.add_argument("--etcd-endpoints", help="comma-separated host:port list")
    parser.add_argument("--etcd-prefix", help="key prefix for all cluster state")
    parser.add_argument("--runtime-threads", type=int,
                        help="llama.cpp threads per runtime whose deployment and aimage set none "
                             "(default 0: the node's cores shared among its replicas)")
    parser.add_argument("--runtime-slots", type=int,
                        help="sequences each runtime decodes together, where the deployment and aimage set none "
                             "(default 0: the runtime's, 8)")
    parser.add_argument("--runtime-context-size", type=int,
                        help="context per slot in tokens, where the deployment and aimage set none "
                             "(default 0: the runtime's, 2048)")
    parser.add_argument("--runtime-batch-size", type=int,
                        help="prompt tokens per step, where the deployment and aimage set none "
                             "(default 0: the runtime's, 256)")
    parser.add_argument("--launcher", choices=("local", "kubernetes"), help="how runtimes start (default local)")
    parser.add_argument("--placement", choices=("spread", "binpack"), help="scheduling profile (default spread)")
    parser.add_argument("--leader-ttl-s", type=int, help="leader lease TTL in seconds (default 10)")
    parser.add_argument("--node-lost-grace-s", type=float,
                        help="seconds (counted while etcd answers) a node may be missing before its replicas move "
                             "(default 30)")
    parser.add_argument("--node-exec", action="append", type=node_exec_entry, metavar="NODE=COMMAND",
                        help="start runtimes placed on NODE through COMMAND (e.g. n1='ip netns exec clowder-n1'); "
                             "they listen on that node's storage host; repeatable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("controller")
    die_with_parent()
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(f"{TOKEN_ENV} must be set: the control plane never runs without a token", file=sys.stderr)
        return 2
    config = load_config(ControllerConfig, args.config, overrides={
        "listen": args.listen,
        "data_dir": args.data_dir,
        "etcd_endpoints": args.etcd_endpoints,
        "etcd_prefix": args.etcd_prefix,
        "runtime_threads": args.runtime_threads,
        "runtime_slots": args.runtime_slots,
        "runtime_context_size": args.runtime_context_size,
        "runtime_batch_size": args.runtime_batch_size,
        "launcher": args.launcher,
        "placement": args.placement,
        "leader_ttl_s": args.leader_ttl_s,
        "node_lost_grace_s": args.node_lost_grace_s,
        "node_exec": dict(args.node_exec) if args.node_exec else None,
    })
    bad = runtime_settings_problem(config)
    if bad:
        print(bad, file=sys.stderr)
        return 2
    if config.node_exec and config.launcher != "local":
        print("--node-exec (node_exec) needs the local launcher", file=sys.stderr)
        return 2
    try:
        check_node_exec(config.node_exec)  # also when it came from the YAML file or CLOWDER_NODE_EXEC
    except ValueError as exc:
        print(f"--node-exec: {exc}", file=sys.stderr)
        return 2
    provider = setup_telemetry("controller")

    async def start(lifecycle: Lifecycle) -> None:
        app = await create_controller(config, token)
        lifecycle.on_shutdown("controller", app.stop)
        await app.start()

    try:
        asyncio.run(serve_until_stopped(start))
    finally:
        shutdown_telemetry(provider)
    return 0


if __name__ == "__main__":
    sys.exit(main())
