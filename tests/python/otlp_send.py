"""Sends one small trace to an OTLP/gRPC endpoint with the real OpenTelemetry Python SDK.

Usage: otlp_send.py <host:port>
Prints the trace id (hex) on stdout so the caller can look the spans up.
"""
import sys

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode


def main() -> int:
    endpoint = sys.argv[1]
    resource = Resource.create(
        {"service.name": "sdk-checkout", "service.version": "1.2.3", "deployment.environment": "test"}
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=f"http://{endpoint}", insecure=True, timeout=10)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("lumen-conformance", "0.1")

    with tracer.start_as_current_span("checkout", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("http.request.method", "POST")
        parent.set_attribute("url.path", "/checkout")
        parent.set_attribute("http.response.status_code", 200)
        parent.set_attribute("cart.items", 3)
        parent.set_attribute("cart.total", 12.5)
        parent.set_attribute("cart.gift", True)
        parent.set_attribute("cart.tags", ["a", "b"])
        parent.set_attribute("user.note", "ünïcode ✓")
        with tracer.start_as_current_span("charge card", kind=SpanKind.CLIENT) as child:
            child.set_attribute("rpc.system", "grpc")
            child.set_attribute("rpc.service", "payments.Charger")
            child.set_attribute("rpc.method", "Charge")
            child.set_status(Status(StatusCode.ERROR, "card declined"))
        trace_id = format(parent.get_span_context().trace_id, "032x")

    if not provider.force_flush(10_000):
        print("flush failed", file=sys.stderr)
        return 1
    provider.shutdown()
    print(trace_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
