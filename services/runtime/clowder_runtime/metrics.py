"""Prometheus /metrics over HTTP, named as the Gateway API Inference Extension model-server protocol expects."""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from clowder_runtime.generation import EngineStats

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector(Collector):
    """Reads the engine's figures at scrape time, so nothing is updated on the token path."""

    def __init__(self, stats: Callable[[], EngineStats], model: str) -> None:
        self._stats = stats
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self._stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            metric = GaugeMetricFamily(name, doc, labels=labels)
            metric.add_metric([self._model], value)
            return metric

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            metric = CounterMetricFamily(name, doc, labels=labels)
            metric.add_metric([self._model], value)
            return metric

        yield gauge("num_requests_running", "Requests in a batch slot (prefilling or decoding).", s.running)
        yield gauge("num_requests_waiting", "Requests queued for a free slot.", s.waiting)
        yield gauge("kv_cache_usage_perc", "Fraction (0..1) of KV cache cells held by running requests.",
                    s.kv_cache_usage)
        yield gauge("clowder_runtime_slots", "Sequence slots of the batch.", s.slots)
        yield gauge("clowder_runtime_threads", "llama.cpp threads decode steps run on.", s.threads)
        yield gauge("clowder_runtime_cached_prefix_blocks",
                    "Distinct prefix blocks held in the KV cache (GetStats lists their hashes).",
                    len(s.prefix_block_hashes))
        yield counter("clowder_runtime_requests", "Requests admitted.", s.requests_total)
        yield counter("clowder_runtime_prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens_total)
        yield counter("clowder_runtime_cached_prompt_tokens", "Prompt tokens served from the KV cache.",
                      s.cached_prompt_tokens_total)
        yield counter("clowder_runtime_generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("clowder_runtime_preemptions",
                      "Batch sequences preempted for an interactive request (resumed later by recomputing).",
                      s.preemptions_total)
        yield counter("clowder_runtime_aborted_steps",
                      "Decode steps of batch work cut short (and redone) for an arriving interactive request.",
                      s.aborted_steps_total)
        for name, doc, figures in (
            ("clowder_runtime_step_tokens", "Tokens each completed decode step held (prompt and generated): how"
             " full the batch runs.", s.step_tokens),
            ("clowder_runtime_step_seconds", "How long llama_decode took in each completed step (sampling aside).",
             s.step_seconds),
        ):
            if figures is not None:
                histogram = HistogramMetricFamily(name, doc, labels=labels)
                buckets = [(floatToGoString(bound), count) for bound, count in figures.cumulative()]
                histogram.add_metric([self._model], buckets, figures.total)
                yield histogram
        # The protocol's LoRA signal: one sample whose labels list adapters by state.
        lora = GaugeMetricFamily(
            "lora_requests_info", "Loaded, running and waiting LoRA adapters.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        lora.add_metric(
            [str(len(s.adapters)), ",".join(a for a in s.running_adapters if a),
             ",".join(a for a in s.waiting_adapters if a)],
            1.0,
        )
        yield lora


class MetricsServer:
    def __init__(self, listen: str, stats: Callable[[], EngineStats], model: str) -> None:
        self._listen = listen
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(EngineCollector(stats, model))
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        host, _, port = self._listen.rpartition(":")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port))
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the asyncio server
        assert server is not None
        # aiohttp types it as an AbstractServer; it is the asyncio.Server that bound the socket.
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", self.port)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE})

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
