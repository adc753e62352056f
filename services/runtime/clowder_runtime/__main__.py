"""`python -m clowder_runtime`: serve one GGUF model until SIGTERM, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Sequence

from clowder.controller.v1 import resources_pb2
from google.protobuf import json_format

from clowder_common.config import load_config
from clowder_common.errors import ClowderError
from clowder_common.lifecycle import Lifecycle, die_with_parent, serve_until_stopped
from clowder_common.logs import setup_logging
from clowder_common.telemetry import setup_telemetry, shutdown_telemetry
from clowder_runtime.app import create_runtime
from clowder_runtime.config import RuntimeConfig

log = logging.getLogger("clowder_runtime")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clowder_runtime",
        description="Serve one GGUF model over gRPC (clowder.runtime.v1.RuntimeService). With the cluster's service "
        "credential in CLOWDER_SERVICE_TOKEN (or the file in CLOWDER_SERVICE_TOKEN_FILE), only callers presenting it "
        "are served; CLOWDER_TLS_CERT_FILE/KEY_FILE/CA_FILE turn on TLS.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    parser.add_argument("--listen", help="gRPC address host:port (default 127.0.0.1:0)")
    parser.add_argument("--advertise-host", help="host written into the registered endpoint")
    parser.add_argument("--deployment", help="deployment served; also the model name in GetStats")
    parser.add_argument("--replica-id", help="replica id within the deployment")
    parser.add_argument("--node", help="node name recorded in the endpoint (default local)")
    parser.add_argument("--model-path", metavar="PATH", help="GGUF file to load")
    parser.add_argument("--digest", metavar="sha256:HEX", help="model layer digest, resolved through --storage")
    parser.add_argument("--storage", dest="storage_address", metavar="HOST:PORT",
                        help="StorageService that resolves --digest (token from CLOWDER_ADMIN_TOKEN)")
    parser.add_argument("--image-config", metavar="JSON",
                        help="clowder.controller.v1.ImageConfiguration as protobuf JSON")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: the image's, else every CPU)")
    parser.add_argument("--node-cpus", type=int, metavar="N",
                        help="share N CPUs with the runtimes registered on this node: threads follow their number "
                             "(--threads is then the start value; not with an image that sets threads)")
    parser.add_argument("--context-size", type=int, help="context per slot in tokens (default: the image's, else 2048)")
    parser.add_argument("--max-waiting", type=int, help="queued requests allowed (default 64)")
    parser.add_argument("--slots", type=int, help="sequences batched together (default: the image's, else 8)")
    parser.add_argument("--prefill-chunk", type=int,
                        help="prompt tokens evaluated per step at most (default: the image's batch_size, else 256)")
    parser.add_argument("--idle-cache-tokens", type=int,
                        help="KV tokens idle slots keep for prefix reuse, all together (default 8192)")
    parser.add_argument("--burst-gap-ms", type=float,
                        help="a request finding the replica idle waits for more arriving at most this far apart, so"
                             " a burst starts in one decode step (default 3; 0: no wait)")
    parser.add_argument("--burst-wait-max-ms", type=float, help="that wait at most, in all (default 20)")
    parser.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=PATH",
                        help="LoRA adapter GGUF to load; repeat for more (requests select one by name)")
    parser.add_argument("--max-adapters", type=int, metavar="N",
                        help="adapters loaded at once at most, at start and since (AdapterService); default 0: no bound")
    parser.add_argument("--adapter-unload-grace", dest="adapter_unload_grace_s", type=float, metavar="SECONDS",
                        help="an unloading adapter is still served this long after it is unlisted (default 2)")
    parser.add_argument("--chat-template-file", metavar="FILE",
                        help="Jinja chat template to use instead of the model's own (e.g. one that supports tools)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here (default: off)")
    parser.add_argument("--lease-ttl", dest="lease_ttl_s", type=int, metavar="SECONDS",
                        help="TTL of the endpoint lease (default 5)")
    parser.add_argument("--drain-grace", dest="drain_grace_s", type=float, metavar="SECONDS",
                        help="time running generations get after SIGTERM (default 10)")
    parser.add_argument("--port-file", metavar="FILE", help="write the bound port here once serving")
    parser.add_argument("--etcd-endpoints", metavar="HOST:PORT,...",
                        help="register in this etcd (default: none, do not register)")
    parser.add_argument("--etcd-prefix", help="key prefix in etcd (default /clowder/)")
    return parser


_CONFIG_FLAGS = (
    "listen", "advertise_host", "deployment", "replica_id", "node", "model_path", "digest", "storage_address",
    "threads", "node_cpus", "context_size", "max_waiting", "slots", "prefill_chunk", "idle_cache_tokens",
    "burst_gap_ms", "burst_wait_max_ms", "adapters",
    "max_adapters", "adapter_unload_grace_s",
    "chat_template_file", "metrics_listen", "lease_ttl_s", "drain_grace_s", "port_file", "etcd_endpoints",
    "etcd_prefix",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("runtime")
    die_with_parent()
    image_config = resources_pb2.ImageConfiguration()
    if args.image_config:
        try:
            json_format.Parse(args.image_config, image_config)
        except json_format.ParseError as exc:
            parser.error(f"--image-config: {exc}")
    try:
        config = load_config(
            RuntimeConfig, args.config, overrides={
                name: tuple(v) if isinstance(v := getattr(args, name), list) else v for name in _CONFIG_FLAGS
            }
        )
    except (ClowderError, OSError) as exc:
        parser.error(str(exc))

    async def start(lifecycle: Lifecycle) -> None:
        app = await create_runtime(config, image_config)
        lifecycle.on_shutdown("runtime", app.stop)
        await app.start()
        log.info("serving on %s", app.address)

    provider = setup_telemetry("runtime")
    try:
        asyncio.run(serve_until_stopped(start))
    except ClowderError as exc:
        log.error("runtime cannot start: %s", exc)
        return 1
    finally:
        shutdown_telemetry(provider)
    return 0


if __name__ == "__main__":
    sys.exit(main())
