"""OpenTelemetry setup: spans are recorded always, exported only when configured."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger(__name__)


def setup_telemetry(service: str, exporter: str | None = None) -> TracerProvider:
    """Install a tracer provider for `service`.

    `exporter` (or CLOWDER_OTEL_EXPORTER): "" for none, "console", or "otlp"
    (needs opentelemetry-exporter-otlp and OTEL_EXPORTER_OTLP_ENDPOINT).
    """
    exporter = (exporter if exporter is not None else os.environ.get("CLOWDER_OTEL_EXPORTER", "")).lower()
    provider = TracerProvider(resource=Resource.create({"service.name": f"clowder-{service}"}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("CLOWDER_OTEL_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter:
        log.warning("unknown CLOWDER_OTEL_EXPORTER %r; spans are not exported", exporter)
    trace.set_tracer_provider(provider)
    return provider


def shutdown_telemetry(provider: TracerProvider | None) -> None:
    if provider is not None:
        provider.shutdown()
