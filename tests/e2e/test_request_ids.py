"""Request-id idempotency beyond SignDigest, on a one-region cluster with two signers:
a retried SignBatch, SignStatement or SignImage — sent to the other signer, as after a
failover — returns the results the first attempt stored (the same signature bytes: ECDSA
signatures are randomised, so equal bytes prove nothing was signed again), and one audit entry
exists per item. docs/adr/0010-multi-region.md, "Request ids"."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from kms.domain.policy import AccessPolicy
from kms.signing import Signature
from signer import convert
from signer._pb.signet.v1 import signing_pb2, signing_pb2_grpc
from signer.client import SignetClient
from signer.dev.cluster import DevCluster
from signer.errors import SignetError
from signer.supplychain_client import SupplyChainClient
from tests.fixtures.cluster import RunningCluster
from tests.unit.test_provenance_policy import slsa_statement

pytestmark = pytest.mark.e2e

KEY = "idempotent"
REGISTRY = "registry.example.com"
IMAGE = f"{REGISTRY}/app@sha256:{'5c' * 32}"


@pytest.fixture(scope="module")
def two_signers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    """Two signers on one etcd member; lifecycle RPCs direct (ceremonies have their own
    tests); the pipeline identity may sign statements for REGISTRY."""
    directory = tmp_path_factory.mktemp("request-ids")
    dev = DevCluster(directory / "cluster")
    try:
        running = RunningCluster(dev, dev.up(signers=2, log=False, signer_settings={
            "ceremonies": {"required": False},
            "audit": {"directory": str(directory / "audit")},
        }))
        with running.client("admin") as admin:
            admin.create_key(KEY, Algorithm.ECDSA_P256_SHA256)
            current, revision = admin.get_policy()
            document = current.to_dict()
            for binding in document["bindings"]:
                if binding["identity"].endswith("/pipeline"):
                    binding["statements"] = {
                        "predicate_types": ["https://slsa.dev/provenance/v1"],
                        "builder_ids": ["https://ci.example.com/builders/*"],
                        "subject_registries": [REGISTRY],
                        "require_resolved_dependencies": True,
                    }
            admin.set_policy(AccessPolicy.from_dict(document), expected_revision=revision)
        time.sleep(0.5)  # both signers apply the policy from their watch
        yield running
    finally:
        dev.down()


def on_signer(cluster: RunningCluster, index: int) -> SignetClient:
    """A client bound to signer ``index`` only (no failover to the other)."""
    who = cluster.cluster.identity("pipeline")
    return SignetClient([cluster.signers[index].endpoint], ca=cluster.cluster.ca,
                        cert=who.cert, key=who.key, attempts_per_endpoint=1)


def audited(cluster: RunningCluster, request_id: str) -> list[dict[str, Any]]:
    folder = cluster.dev.state_dir.parent / "audit"
    return [e for path in folder.glob("**/entries.jsonl")
            for e in map(json.loads, path.read_text().splitlines())
            if str(e.get("request_id", "")).split("#")[0] == request_id]


def digest(text: str) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(text.encode()).digest())


def test_the_two_signers_are_separate_processes(two_signers: RunningCluster) -> None:
    endpoints = {s.endpoint for s in two_signers.signers}
    assert len(endpoints) == 2


def test_a_retried_batch_returns_the_stored_results(two_signers: RunningCluster) -> None:
    request_id = f"batch-{time.time_ns()}"
    digests = [digest(f"item-{n}") for n in range(5)]
    with on_signer(two_signers, 0) as first, on_signer(two_signers, 1) as second:
        original = first.sign_batch(KEY, digests, request_id=request_id)
        assert all(isinstance(r, Signature) for r in original)
        retried = second.sign_batch(KEY, digests, request_id=request_id)
        again = first.sign_batch(KEY, digests, request_id=request_id)
        fresh = first.sign_batch(KEY, digests)  # no shared id: signed anew
        with pytest.raises(SignetError) as caught:  # same id, another batch
            second.sign_batch(KEY, digests[:4], request_id=request_id)
    sigs = [r.signature for r in original if isinstance(r, Signature)]
    assert [r.signature for r in retried if isinstance(r, Signature)] == sigs
    assert [r.signature for r in again if isinstance(r, Signature)] == sigs
    assert [r.signature for r in fresh if isinstance(r, Signature)] != sigs
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "different request" in caught.value.message
    entries = audited(two_signers, request_id)
    assert sorted(e["request_id"] for e in entries) == [f"{request_id}#{n}" for n in range(5)]


def test_an_id_wrongly_sent_as_new_is_signed_again_but_answered_with_the_first(
    two_signers: RunningCluster,
) -> None:
    """``new_request_id`` lets a signer skip its lookup; a client that sets it on a retry gets
    the stored signature all the same, and the signature made meanwhile is only audited."""
    request_id = f"new-{time.time_ns()}"
    request = signing_pb2.SignDigestRequest(
        key=KEY, digest=convert.digest_to_pb(digest("new")), request_id=request_id,
        new_request_id=True)
    with on_signer(two_signers, 0) as first, on_signer(two_signers, 1) as second:
        original, retried = (
            client._call(lambda ch: signing_pb2_grpc.SigningStub(ch).SignDigest(
                request, timeout=10))
            for client in (first, second))
        looked_up = first.sign_digest(KEY, digest("new"), request_id=request_id)
    assert retried.signature == original.signature == looked_up.signature
    assert len(audited(two_signers, request_id)) == 2  # not looked up: signed, then dropped


def test_a_retried_statement_returns_the_stored_envelope(two_signers: RunningCluster) -> None:
    request_id = f"statement-{time.time_ns()}"
    statement = json.dumps(slsa_statement("5c" * 32, f"{REGISTRY}/app")).encode()
    other = json.dumps(slsa_statement("6d" * 32, f"{REGISTRY}/app")).encode()
    with on_signer(two_signers, 0) as first, on_signer(two_signers, 1) as second:
        original = SupplyChainClient(first).sign_statement(KEY, statement,
                                                           request_id=request_id)
        retried = SupplyChainClient(second).sign_statement(KEY, statement,
                                                           request_id=request_id)
        fresh = SupplyChainClient(second).sign_statement(KEY, statement)
        with pytest.raises(SignetError) as caught:
            SupplyChainClient(second).sign_statement(KEY, other, request_id=request_id)
    assert retried.envelope_json == original.envelope_json
    assert fresh.envelope_json != original.envelope_json
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(audited(two_signers, request_id)) == 1


def test_a_retried_image_signature_returns_the_stored_signature(
    two_signers: RunningCluster,
) -> None:
    request_id = f"image-{time.time_ns()}"
    with on_signer(two_signers, 1) as first, on_signer(two_signers, 0) as second:
        original = SupplyChainClient(first).sign_image(KEY, IMAGE, annotations={"run": "1"},
                                                       request_id=request_id)
        retried = SupplyChainClient(second).sign_image(KEY, IMAGE, annotations={"run": "1"},
                                                       request_id=request_id)
        with pytest.raises(SignetError) as caught:  # other annotations: another payload
            SupplyChainClient(second).sign_image(KEY, IMAGE, annotations={"run": "2"},
                                                 request_id=request_id)
    assert retried.signature == original.signature
    assert retried.payload == original.payload
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(audited(two_signers, request_id)) == 1


def test_a_stored_batch_is_refused_once_its_version_is_revoked(
    two_signers: RunningCluster,
) -> None:
    with two_signers.client("admin") as admin:
        admin.create_key("short-lived", Algorithm.ECDSA_P256_SHA256)
    request_id = f"revoked-{time.time_ns()}"
    with on_signer(two_signers, 0) as first, on_signer(two_signers, 1) as second:
        first.sign_batch("short-lived", [digest("a")], request_id=request_id)
        with two_signers.client("admin") as admin:
            admin.revoke_version("short-lived", 1)
        with pytest.raises(SignetError) as caught:
            second.sign_batch("short-lived", [digest("a")], request_id=request_id)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
