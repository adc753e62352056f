"""How a replica runs llama.cpp (slots, threads, context, batch): defaults, bounds, and which setting wins.

Defaults, for the machines Clowder targets (CPUs, small to mid models):

- slots 8: on CPU one decode step for N sequences costs little more than for one (the weights are read
  once per step), so throughput grows with concurrent streams: bench-runtime measured 1.74x batch 1 at
  batch 8 on 2 threads, and llama.cpp's own server is run with -np 8 for the same reason. With 4 slots
  (the old default) an 8-stream load queued half its requests. More slots cost KV memory linearly
  (slots x context_size tokens; SmolLM2-135M: 23 KiB a token, so 8 x 2048 is 0.35 GiB) and gain less
  per step past 8 on 2 cores, so 8 it is; a deployment wanting 16 streams at once says slots: 16.
- context_size 2048 per slot: what chat and completion requests in practice need; bigger only where the
  model was trained for it (checked against GGUF <arch>.context_length).
- batch_size 256: prompt tokens evaluated per step; big enough that prefill runs at llama.cpp's batched
  speed, small enough that a long prompt stalls running streams for one short step only.
- threads: the node's CPUs shared among the runtimes on it, followed as their number changes (the runtime
  watches the endpoints registered on its node; a runtime started by hand takes every CPU): llama.cpp
  threads beyond the cores stall each other. Only an explicit setting fixes them.
"""

from __future__ import annotations

import dataclasses

DEFAULT_SLOTS = 8
DEFAULT_CONTEXT_SIZE = 2048
DEFAULT_BATCH_SIZE = 256
# llama.cpp's limits: LLAMA_MAX_SEQ sequences in one context, GGML_MAX_N_THREADS threads.
MAX_SLOTS = 256
MAX_THREADS = 512
# Smaller contexts cannot hold a chat template and an answer.
MIN_CONTEXT_SIZE = 16
MAX_CONTEXT_SIZE = 1 << 20

FIELDS = ("slots", "threads", "context_size", "batch_size")


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """0 means "not set here": the next source decides (see `resolve`)."""

    slots: int = 0
    threads: int = 0
    context_size: int = 0
    batch_size: int = 0

    def over(self, fallback: RuntimeSettings) -> RuntimeSettings:
        """These settings, with fallback's value wherever this one has none."""
        return RuntimeSettings(**{name: getattr(self, name) or getattr(fallback, name) for name in FIELDS})


def of_message(message) -> RuntimeSettings:
    """The settings a Deployment or ImageConfiguration carries (proto3 optional fields: present or 0)."""
    values = {}
    for name in FIELDS:
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue
        # ImageConfiguration.context_size predates presence tracking: there 0 already meant unset.
        if field.has_presence and not message.HasField(name):
            continue
        values[name] = getattr(message, name)
    return RuntimeSettings(**values)


def resolve(deployment, image_config, cluster: RuntimeSettings = RuntimeSettings()) -> RuntimeSettings:
    """What a replica runs with: the deployment's values, else the aimage's, else the cluster's; 0 left for
    the runtime's own default (threads: the controller's per-node share)."""
    return of_message(deployment).over(of_message(image_config)).over(cluster)


def with_defaults(settings: RuntimeSettings) -> RuntimeSettings:
    """Every figure filled in as the runtime would (threads stays 0: it depends on the node)."""
    return settings.over(RuntimeSettings(slots=DEFAULT_SLOTS, context_size=DEFAULT_CONTEXT_SIZE,
                                         batch_size=DEFAULT_BATCH_SIZE))
