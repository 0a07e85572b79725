"""Sends one small trace (with an event and a link), two metrics and two log records to
Lumen with the real OpenTelemetry Python SDK, over OTLP/gRPC or OTLP/HTTP (protobuf).

Usage: otlp_send.py grpc|http <host:port> <service.name>
Prints the trace id (hex) on stdout so the caller can look the spans up.
"""
import logging
import sys

from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode


def exporters(protocol: str, endpoint: str):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        url = f"http://{endpoint}"
        return (
            OTLPSpanExporter(endpoint=url, insecure=True, timeout=10),
            OTLPMetricExporter(endpoint=url, insecure=True, timeout=10),
            OTLPLogExporter(endpoint=url, insecure=True, timeout=10),
        )
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = f"http://{endpoint}/v1"
    return (
        OTLPSpanExporter(endpoint=f"{url}/traces", timeout=10),
        OTLPMetricExporter(endpoint=f"{url}/metrics", timeout=10),
        OTLPLogExporter(endpoint=f"{url}/logs", timeout=10),
    )


def main() -> int:
    protocol, endpoint, service = sys.argv[1], sys.argv[2], sys.argv[3]
    resource = Resource.create(
        {"service.name": service, "service.version": "1.2.3", "deployment.environment": "test"}
    )
    span_exporter, metric_exporter, log_exporter = exporters(protocol, endpoint)

    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    tracer = provider.get_tracer("lumen-conformance", "0.1")
    with tracer.start_as_current_span("warm up", kind=SpanKind.INTERNAL) as earlier:
        linked = earlier.get_span_context()
    with tracer.start_as_current_span("checkout", kind=SpanKind.SERVER, links=[Link(linked, {"link.kind": "follows"})]) as parent:
        parent.set_attribute("http.request.method", "POST")
        parent.set_attribute("url.path", "/checkout")
        parent.set_attribute("http.response.status_code", 200)
        parent.set_attribute("cart.items", 3)
        parent.set_attribute("cart.total", 12.5)
        parent.set_attribute("cart.gift", True)
        parent.set_attribute("cart.tags", ["a", "b"])
        parent.set_attribute("user.note", "ünïcode ✓")
        parent.add_event("cart validated", {"cart.items": 3})
        with tracer.start_as_current_span("charge card", kind=SpanKind.CLIENT) as child:
            child.set_attribute("rpc.system", "grpc")
            child.set_attribute("rpc.service", "payments.Charger")
            child.set_attribute("rpc.method", "Charge")
            child.set_status(Status(StatusCode.ERROR, "card declined"))
        trace_id = format(parent.get_span_context().trace_id, "032x")

        logger_provider = LoggerProvider(resource=resource)
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
        logger = logging.getLogger("checkout")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(LoggingHandler(level=logging.INFO, logger_provider=logger_provider))
        logger.info("order placed", extra={"order.id": 42})
        logger.error("card declined")

    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=60_000)
    meters = MeterProvider(resource=resource, metric_readers=[reader])
    meter = meters.get_meter("lumen-conformance", "0.1")
    orders = meter.create_counter("orders", unit="1", description="orders placed")
    orders.add(2, {"payment": "card"})
    latency = meter.create_histogram("checkout.duration", unit="ms")
    for v in (5.0, 12.0, 250.0):
        latency.record(v)

    ok = provider.force_flush(10_000)
    ok = logger_provider.force_flush(10_000) and ok
    ok = meters.force_flush(10_000) and ok
    if not ok:
        print("flush failed", file=sys.stderr)
        return 1
    provider.shutdown()
    logger_provider.shutdown()
    meters.shutdown()
    print(trace_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
