"""Runtime configuration: which model to load, where to listen, and how to register."""

from __future__ import annotations

from dataclasses import dataclass

from clowder_common.config import EtcdConfig
from clowder_common.security import SecurityConfig


@dataclass(frozen=True)
class RuntimeConfig(EtcdConfig, SecurityConfig):
    """One replica of one deployment.

    Unlike the other services, `etcd_endpoints` defaults to empty: a runtime
    started by hand (standalone, benchmarks) serves without registering.
    """

    etcd_endpoints: tuple[str, ...] = ()
    # gRPC address to bind ("host:port"; port 0 picks a free one).
    listen: str = "127.0.0.1:0"
    # Host written into the registered endpoint; empty uses the listen host
    # (or this machine's name when listening on a wildcard address).
    advertise_host: str = ""
    # Deployment this replica serves; also the `model` name GetStats reports.
    deployment: str = ""
    replica_id: str = ""
    node: str = "local"
    # Either a GGUF path, or a digest that the node's StorageService resolves.
    model_path: str = ""
    digest: str = ""
    storage_address: str = ""
    # Settings below that say "0: the image's" take the image configuration's value when 0, else the default in
    # clowder_common.runtime_settings (which says why each default is what it is).
    # llama.cpp threads; 0: the image's, else every CPU.
    threads: int = 0
    # CPUs of this node, shared with the other runtimes registered on it (the controller passes it when no
    # setting fixes the threads): threads, unless the image sets them, then follow node_cpus // the runtimes
    # registered on the node, this one included, and `threads` is only the start value (0: node_cpus).
    # Needs etcd_endpoints. 0: threads stay as they start.
    node_cpus: int = 0
    # Context window per slot in tokens; 0: the image's, else 2048. At most the model's training context.
    context_size: int = 0
    # Requests allowed to queue while every slot is busy; more get RESOURCE_EXHAUSTED.
    max_waiting: int = 64
    # Sequences batched together (continuous batching); each gets context_size tokens of KV cache. 0: the
    # image's, else 8.
    slots: int = 0
    # Prompt tokens prefilled per decode step at most (the image's batch_size): bounds the stall a long prompt
    # causes running streams. 0: the image's, else 256.
    prefill_chunk: int = 0
    # A request that finds the replica idle waits for the rest of its burst while requests keep coming at most
    # burst_gap_ms apart, burst_wait_max_ms in all, so a burst's prompts start in one decode step (each but the
    # first gains a step; a lone request pays burst_gap_ms). 0 turns the wait off; at most 1000 each.
    burst_gap_ms: float = 3.0
    burst_wait_max_ms: float = 20.0
    # KV cache tokens idle slots keep for prefix reuse, all together (least recently used dropped first).
    # With one KV stream per slot, idle entries no longer slow other slots' steps; the bound is for
    # operators who want less kept (0 keeps nothing between requests).
    idle_cache_tokens: int = 8192
    # LoRA adapters to load, as "name=path/to/adapter.gguf"; requests pick one by name.
    adapters: tuple[str, ...] = ()
    # An adapter being unloaded (AdapterService) is still served this long after it stopped being listed,
    # for requests balancers routed before they saw it go (live_adapters.py).
    adapter_unload_grace_s: float = 2.0
    # Adapters loaded at once at most, the ones given at start included (each holds its tensors in memory);
    # a LoadAdapter beyond it gets RESOURCE_EXHAUSTED. 0: no bound.
    max_adapters: int = 0
    # Jinja chat template used instead of the model's own (tokenizer.chat_template), for models whose
    # template is weak (no tool support, wrong turns): inline text, or a file holding it. At most one.
    chat_template: str = ""
    chat_template_file: str = ""
    # Prometheus /metrics over HTTP ("host:port"); empty: off.
    metrics_listen: str = ""
    # TTL of the lease the endpoint hangs on.
    lease_ttl_s: int = 5
    # How long running generations may go on after SIGTERM.
    drain_grace_s: float = 10.0
    # After binding, the port is written here (atomically) for whoever started us.
    port_file: str = ""
