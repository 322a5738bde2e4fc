"""Telemetry of a real signer (in this process, on real etcd and SoftHSM): one signature is
one connected trace, RPC → authorisation → HSM → audit; metrics count it; JSON logs carry ids."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from signer._pb.signet.v1 import common_pb2, keys_pb2, keys_pb2_grpc, signing_pb2, signing_pb2_grpc
from signer.config import ServerConfig
from signer.dev.etcd import EtcdCluster
from signer.server import start
from signer.telemetry import JsonLogFormatter, metrics, setup_tracing
from tests.fixtures.softhsm import SoftHsmTestToken

pytestmark = pytest.mark.integration


def test_one_signature_is_one_connected_span_tree(
    etcd_cluster: EtcdCluster, softhsm_token: SoftHsmTestToken, softhsm_pin_file: Path,
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    setup_tracing(service_name="signet-test", region="test", signer_id="test/1",
                  exporters=[exporter])
    config = ServerConfig.from_dict({
        "region": "test", "listen": "127.0.0.1:0", "insecure": True,
        "etcd": {"endpoints": list(etcd_cluster.endpoints)},
        "hsm": {"module": softhsm_token.module_path, "token_label": softhsm_token.label,
                "pin_file": str(softhsm_pin_file)},
        "audit": {"directory": str(tmp_path / "audit")},
        "trust": {"http_listen": ""},
        "ceremonies": {"required": False},
    }, base=tmp_path)
    digest = hashlib.sha256(b"traced").digest()

    async def scenario() -> None:
        running = await start(config)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                await keys_pb2_grpc.KeyAdminStub(channel).CreateKey(keys_pb2.CreateKeyRequest(
                    name="traced", algorithm=common_pb2.ECDSA_P256_SHA256))
                exporter.clear()
                await signing_pb2_grpc.SigningStub(channel).SignDigest(
                    signing_pb2.SignDigestRequest(
                        key="traced", request_id="trace-me",
                        digest=common_pb2.Digest(algorithm=common_pb2.SHA256, value=digest)))
        finally:
            await running.stop()

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "signet.v1.Signing/SignDigest"]
    assert len(roots) == 1
    root = roots[0]
    assert root.parent is None
    assert root.attributes is not None
    assert root.attributes["signet.key"] == "traced"
    assert root.attributes["signet.outcome"] == "OK"
    assert root.attributes["signet.identity"] == "insecure://anonymous"
    tree = [s for s in spans if s.context.trace_id == root.context.trace_id]
    by_id = {s.context.span_id: s for s in tree}
    names = {s.name for s in tree}
    assert {"authorize", "hsm.sign", "audit.append"} <= names
    for span in tree:  # every span hangs off the RPC span
        node = span
        while node.parent is not None:
            node = by_id[node.parent.span_id]
        assert node is root
    hsm_span = next(s for s in tree if s.name == "hsm.sign")
    assert hsm_span.attributes is not None
    assert hsm_span.attributes["signet.algorithm"] == "ecdsa-p256-sha256"
    recorded = metrics()
    ok = recorded.registry.get_sample_value(
        "signet_signatures_total", {"key": "traced", "outcome": "ok"})
    assert ok is not None
    assert ok >= 1


def test_json_logs_carry_the_trace_and_span_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("signet.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    tracer = TracerProvider().get_tracer("signet.test")
    with tracer.start_as_current_span("work") as span:
        logger.warning("signed %s", "something")
    logger.warning("outside any span")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "signed something"
    assert inside["level"] == "WARNING"
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert inside["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert "trace_id" not in outside
