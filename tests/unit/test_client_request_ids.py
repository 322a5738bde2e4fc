"""The client library marks a request id *new* only on the first send of an id it generated
(signing.proto ``new_request_id``): a retry, or an id the caller chose, may already have a
stored result, which the signer must look up. Against an in-process fake Signing server on
loopback that refuses the first call of each id with UNAVAILABLE, so the client retries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kms.domain.keys import Digest, DigestAlgorithm
from signer._pb.signet.v1 import common_pb2, signing_pb2, signing_pb2_grpc
from signer.client import SignetClient
from signer.supplychain_client import SupplyChainClient
from tests.unit.fake_signing import serving

DIGEST = Digest(DigestAlgorithm.SHA256, b"\x01" * 32)


class FlakySigning(signing_pb2_grpc.SigningServicer):
    """Records (request id, new) per call; the first call of each request id fails
    UNAVAILABLE when ``flaky`` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.flaky = True
        self._lock = threading.Lock()

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        with self._lock:
            first = all(rid != request.request_id for rid, _ in self.sent)
            self.sent.append((request.request_id, request.new_request_id))
        if self.flaky and first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    @staticmethod
    def _signature(key: str) -> signing_pb2.SignDigestResponse:
        return signing_pb2.SignDigestResponse(
            signature=b"sig", key=key, key_version=1, key_id="00" * 32,
            algorithm=common_pb2.ECDSA_P256_SHA256, revision=7, region="r1")

    def SignDigest(self, request: signing_pb2.SignDigestRequest,
                   context: grpc.ServicerContext) -> signing_pb2.SignDigestResponse:
        self._record(request, context)
        return self._signature(request.key)

    def SignBatch(self, request: signing_pb2.SignBatchRequest,
                  context: grpc.ServicerContext) -> signing_pb2.SignBatchResponse:
        self._record(request, context)
        return signing_pb2.SignBatchResponse(results=[
            signing_pb2.SignBatchResult(signature=self._signature(request.key))
            for _ in request.digests])

    def SignStatement(self, request: signing_pb2.SignStatementRequest,
                      context: grpc.ServicerContext) -> signing_pb2.SignStatementResponse:
        self._record(request, context)
        return signing_pb2.SignStatementResponse(envelope_json=b"{}", key=request.key)

    def SignImage(self, request: signing_pb2.SignImageRequest,
                  context: grpc.ServicerContext) -> signing_pb2.SignImageResponse:
        self._record(request, context)
        return signing_pb2.SignImageResponse(payload=b"{}", signature=b"sig", key=request.key)


@pytest.fixture
def fake() -> Iterator[tuple[FlakySigning, SignetClient]]:
    servicer = FlakySigning()
    with serving(servicer) as endpoint, SignetClient([endpoint], insecure=True) as client:
        yield servicer, client


def test_a_generated_id_is_new_on_its_first_send_only(fake: Any) -> None:
    servicer, client = fake
    client.sign_digest("release", DIGEST)
    client.sign_batch("release", [DIGEST, DIGEST])
    ((digest_id, first), (again_id, retry)), batch = servicer.sent[:2], servicer.sent[2:]
    assert digest_id == again_id
    assert (first, retry) == (True, False)
    assert [new for _, new in batch] == [True, False]
    assert batch[0][0] == batch[1][0] != digest_id


def test_an_id_the_caller_chose_is_never_sent_as_new(fake: Any) -> None:
    servicer, client = fake
    client.sign_digest("release", DIGEST, request_id="job-1")
    client.sign_batch("release", [DIGEST], request_id="job-2")
    assert servicer.sent == [("job-1", False), ("job-1", False),
                             ("job-2", False), ("job-2", False)]


def test_sign_many_marks_its_batches_new_only_under_a_generated_base(fake: Any) -> None:
    servicer, client = fake
    servicer.flaky = False
    client.sign_many("release", [DIGEST] * 5, batch_size=2, concurrency=2)
    generated = list(servicer.sent)
    servicer.sent.clear()
    client.sign_many("release", [DIGEST] * 5, batch_size=2, concurrency=2, request_id="job")
    assert len(generated) == 3
    assert all(new for _, new in generated)
    assert sorted(servicer.sent) == [("job/0", False), ("job/1", False), ("job/2", False)]


def test_statements_and_images_follow_the_same_rule(fake: Any) -> None:
    servicer, client = fake
    supply = SupplyChainClient(client)
    supply.sign_statement("release", b"{}")
    supply.sign_image("release", "registry.example.com/app", manifest_digest="sha256:" + "5c" * 32)
    supply.sign_statement("release", b"{}", request_id="mine")
    assert [new for _, new in servicer.sent] == [True, False, True, False, False, False]
