"""Traces, metrics and structured logs for a signer process.

- **Traces** (OpenTelemetry): every RPC is a span, with child spans for authorisation, etcd
  calls, the HSM and the audit log. Attributes carry the caller identity, key, version and
  outcome — never PINs, key material or payloads. Exported over OTLP when
  ``telemetry.otlp_endpoint`` is set, to the console with ``telemetry.console_traces``.
- **Metrics** (Prometheus): served at ``http://<telemetry.metrics_listen>/metrics``.
- **Logs**: ``--log-format json`` writes one JSON object per line with the trace and span ids.

The ``kms`` package stays free of exporters: it uses only the OpenTelemetry *API*, which is a
no-op until :func:`setup_tracing` installs a provider here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Status, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from kms.domain.keys import Algorithm
from kms.errors import HsmError, KmsError
from kms.ports import AuditRecorder, GeneratedKeyPair, Hsm

tracer = trace.get_tracer("signet.signer")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


SECURITY_EVENT_KINDS = ("runtime_attestation_denied", "denied", "denial_dropped")


class SecurityEventCounter:
    """``signet_security_events_total{kind}``: security events recorded (and audited)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._counter = Counter(
            "signet_security_events_total",
            "Security events recorded in the audit log, by kind", ["kind"], registry=registry)
        for kind in SECURITY_EVENT_KINDS:
            # Export 0 before the first event, so alerts on increase() see a baseline.
            self._counter.labels(kind=kind)

    def __call__(self, kind: str) -> None:
        self._counter.labels(kind=kind).inc()


class Metrics:
    """Every metric a signer exports, in one registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.rpc_seconds = Histogram(
            "signet_rpc_duration_seconds", "RPC latency by method and status code",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=registry)
        self.sign_seconds = Histogram(
            "signet_sign_duration_seconds", "Latency of signing RPCs (SignDigest, SignBatch, "
            "SignStatement, SignImage)", ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.signatures = Counter(
            "signet_signatures_total", "Signatures by key and outcome (ok or a status code)",
            ["key", "outcome"], registry=registry)
        self.hsm_errors = Counter(
            "signet_hsm_errors_total", "HSM operations that failed", ["operation"],
            registry=registry)
        self.lease_current = Gauge(
            "signet_lease_current", "1 while this signer can prove its key state is current",
            registry=registry)
        self.fence_seconds = Histogram(
            "signet_revocation_fence_seconds", "How long Revoke waited for every signer",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry)
        self.etcd_seconds = Histogram(
            "signet_etcd_request_duration_seconds", "etcd operations, retries included",
            ["operation", "outcome"], buckets=LATENCY_BUCKETS, registry=registry)
        self.key_state_revision = Gauge(
            "signet_key_state_revision", "etcd revision of the key state this signer applied",
            registry=registry)
        self.audit_entries = Gauge(
            "signet_audit_entries", "Entries in this signer's audit log", registry=registry)
        self.audit_checkpoint_age = Gauge(
            "signet_audit_checkpoint_age_seconds",
            "Seconds since the last signed audit checkpoint (audit lag)", registry=registry)
        self.bundle_version = Gauge(
            "signet_trust_bundle_version", "Timestamp version of the published trust bundle",
            registry=registry)
        self.bundle_age = Gauge(
            "signet_trust_bundle_age_seconds", "Seconds since the trust bundle was published",
            registry=registry)
        self.security_events = SecurityEventCounter(registry)


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    """The process-wide metrics (created on first use)."""
    global _METRICS  # noqa: PLW0603 - one registry per process is what Prometheus scrapes
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def setup_tracing(
    *, service_name: str, region: str, signer_id: str, otlp_endpoint: str | None = None,
    otlp_insecure: bool = False, console: bool = False,
    exporters: Sequence[SpanExporter] = (),
) -> TracerProvider:
    """Install the process's tracer provider. ``exporters`` are added with a simple (synchronous)
    processor, which is what tests use with an in-memory exporter."""
    provider = TracerProvider(resource=Resource.create({
        "service.name": service_name, "signet.region": region, "signet.signer_id": signer_id,
    }))
    processors: list[SpanProcessor] = [SimpleSpanProcessor(e) for e in exporters]
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=otlp_endpoint, insecure=otlp_insecure)))
    if console:
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


_SIGNING_METHODS = frozenset({"SignDigest", "SignBatch", "SignStatement", "SignImage"})


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """A span and latency metrics around every unary RPC.

    The caller identity is added by the servicers (``annotate_caller``), since only they have
    authenticated it.
    """

    def __init__(self, recorded: Metrics | None = None) -> None:
        self._metrics = recorded or metrics()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        full_method = handler_call_details.method  # "/signet.v1.Signing/SignDigest"
        method = full_method.rsplit("/", 1)[-1]
        inner: Any = handler.unary_unary  # an async function on the aio server
        recorded = self._metrics

        signing = method in _SIGNING_METHODS

        def observe(code: str, elapsed: float, key: object) -> None:
            recorded.rpc_seconds.labels(method, code).observe(elapsed)
            if signing:
                recorded.sign_seconds.labels(method).observe(elapsed)
                if code != "OK" and isinstance(key, str):
                    recorded.signatures.labels(key or "-", code).inc()

        async def measured(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # No tracer provider installed (trace export off): metrics only. An OpenTelemetry
            # no-op span still costs a context attach/detach per call (measured, bench/README).
            started = time.perf_counter()
            code = "OK"
            key = getattr(request, "key", "") or getattr(request, "name", "") if signing else ""
            try:
                response = await inner(request, context)
            except BaseException:
                code = _status_name(context)
                raise
            finally:
                observe(code, time.perf_counter() - started, key)
            if signing:
                _count_signatures(recorded, key, response)
            return response

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = "OK"
            with tracer.start_as_current_span(
                full_method.lstrip("/"), kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method},
            ) as span:
                key = getattr(request, "key", "") or getattr(request, "name", "")
                if isinstance(key, str) and key:
                    span.set_attribute("signet.key", key)
                try:
                    response = await inner(request, context)
                except BaseException:
                    code = _status_name(context)
                    span.set_attribute("signet.outcome", code)
                    span.set_status(Status(StatusCode.ERROR, code))
                    raise
                finally:
                    observe(code, time.perf_counter() - started, key)
                span.set_attribute("signet.outcome", "OK")
                if signing:
                    _count_signatures(recorded, key, response)
                return response

        tracing = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        return grpc.unary_unary_rpc_method_handler(
            traced if tracing else measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _status_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    status = context.code() if hasattr(context, "code") else None
    return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"


def _count_signatures(recorded: Metrics, key: Any, response: Any) -> None:
    name = key if isinstance(key, str) and key else "-"
    results = getattr(response, "results", None)
    if results is None:
        recorded.signatures.labels(name, "ok").inc()
        return
    # One increment per outcome, not per item: a label lookup and a locked add per item cost
    # more than the rest of a batch item's response.
    ok = sum(1 for item in results if item.HasField("signature"))
    if ok:
        recorded.signatures.labels(name, "ok").inc(ok)
    if len(results) - ok:
        recorded.signatures.labels(name, "item_error").inc(len(results) - ok)


def annotate_caller(identity: str) -> None:
    """Put the authenticated caller on the current RPC span."""
    trace.get_current_span().set_attribute("signet.identity", identity)


class TracedHsm:
    """An ``Hsm`` that records a span and HSM error metrics around every operation."""

    def __init__(self, inner: Hsm, recorded: Metrics | None = None) -> None:
        self._inner = inner
        self._metrics = recorded or metrics()

    async def _traced(self, operation: str, call: Awaitable[Any], **attributes: Any) -> Any:
        with tracer.start_as_current_span(f"hsm.{operation}", attributes=attributes) as span:
            try:
                return await call
            except HsmError as error:
                self._metrics.hsm_errors.labels(operation).inc()
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                raise

    async def generate_key_pair(
        self, *, label: str, algorithm: Algorithm, extractable: bool
    ) -> GeneratedKeyPair:
        result: GeneratedKeyPair = await self._traced(
            "generate", self._inner.generate_key_pair(
                label=label, algorithm=algorithm, extractable=extractable),
            **{"signet.algorithm": algorithm.value})
        return result

    async def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        result: bytes = await self._traced(
            "sign", self._inner.sign_digest(hsm_id, algorithm, digest),
            **{"signet.algorithm": algorithm.value})
        return result

    async def sign_digests(
        self, hsm_id: bytes, algorithm: Algorithm, digests: Sequence[bytes]
    ) -> list[bytes | Exception]:
        result: list[bytes | Exception] = await self._traced(
            "sign_many", self._inner.sign_digests(hsm_id, algorithm, digests),
            **{"signet.algorithm": algorithm.value, "signet.batch_size": len(digests)})
        return result

    async def public_key(self, hsm_id: bytes) -> bytes:
        result: bytes = await self._traced("public_key", self._inner.public_key(hsm_id))
        return result

    async def destroy_key_pair(self, hsm_id: bytes) -> None:
        await self._traced("destroy", self._inner.destroy_key_pair(hsm_id))

    async def close(self) -> None:
        await self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # Adapter-specific extras (key_attributes, run_with_session) pass through untraced.
        return getattr(self._inner, name)


class TracedAudit:
    """An ``AuditRecorder`` that records a span around every append."""

    def __init__(self, inner: AuditRecorder) -> None:
        self._inner = inner

    async def record_signature(
        self, *, identity: str, key: str, version: int, key_id: str, digest: str,
        request_id: str, revision: int, region: str,
    ) -> int:
        with tracer.start_as_current_span("audit.append", attributes={"signet.kind": "sign"}):
            return await self._inner.record_signature(
                identity=identity, key=key, version=version, key_id=key_id, digest=digest,
                request_id=request_id, revision=revision, region=region)

    async def record_signatures(
        self, *, identity: str, key: str, version: int, key_id: str, revision: int,
        region: str, digests: Sequence[str], request_ids: Sequence[str],
    ) -> list[int]:
        with tracer.start_as_current_span("audit.append_many", attributes={
                "signet.kind": "sign", "signet.batch_size": len(digests)}):
            return await self._inner.record_signatures(
                identity=identity, key=key, version=version, key_id=key_id, revision=revision,
                region=region, digests=digests, request_ids=request_ids)

    async def record_event(self, kind: str, fields: Any) -> int:
        with tracer.start_as_current_span("audit.append", attributes={"signet.kind": kind}):
            return await self._inner.record_event(kind, fields)


def etcd_observer(recorded: Metrics | None = None) -> Callable[[str, float, bool], None]:
    """A callback for ``EtcdKeyStateStore(observer=…)`` feeding the etcd latency histogram."""
    target = recorded or metrics()

    def observe(operation: str, seconds: float, ok: bool) -> None:
        target.etcd_seconds.labels(operation, "ok" if ok else "error").observe(seconds)

    return observe


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids when there is a span."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = f"{context.trace_id:032x}"
            entry["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
        logging.Formatter.converter = time.gmtime
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


__all__ = [
    "JsonLogFormatter",
    "KmsError",
    "Metrics",
    "SecurityEventCounter",
    "TelemetryInterceptor",
    "TracedAudit",
    "TracedHsm",
    "annotate_caller",
    "configure_logging",
    "etcd_observer",
    "metrics",
    "setup_tracing",
]
