"""``SignetClient.sign_many`` against an in-process fake Signing server on loopback: results in
the order given however the concurrent batches complete, batches of the asked size, request ids
per batch, errors in place."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kms.domain.keys import Digest, DigestAlgorithm
from kms.signing import Signature
from signer._pb.signet.v1 import common_pb2, signing_pb2, signing_pb2_grpc
from signer.client import SignetClient
from signer.errors import SignetError
from tests.unit.fake_signing import serving


class FakeSigning(signing_pb2_grpc.SigningServicer):
    """"Signs" by echoing the digest; sleeps a random while so batches finish out of order."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.peers: list[str] = []  # the client's address:port of each batch's connection
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_request_suffix: str | None = None
        self._lock = threading.Lock()

    def SignBatch(self, request: signing_pb2.SignBatchRequest,
                  context: grpc.ServicerContext) -> signing_pb2.SignBatchResponse:
        with self._lock:
            self.batches.append((request.request_id, len(request.digests)))
            self.peers.append(context.peer())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(random.uniform(0.0, 0.03))
            if self.fail_request_suffix and request.request_id.endswith(self.fail_request_suffix):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "not this batch")
            results = []
            for d in request.digests:
                if d.value == b"\xff" * 32:  # an item the server refuses alone
                    results.append(signing_pb2.SignBatchResult(error=signing_pb2.ItemError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad item")))
                    continue
                results.append(signing_pb2.SignBatchResult(signature=signing_pb2.SignDigestResponse(
                    signature=d.value, key=request.key, key_version=1, key_id="00" * 32,
                    algorithm=common_pb2.ECDSA_P256_SHA256, revision=7, region="r1")))
            return signing_pb2.SignBatchResponse(results=results)
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture
def fake() -> Iterator[tuple[FakeSigning, str]]:
    servicer = FakeSigning()
    with serving(servicer) as endpoint:
        yield servicer, endpoint


def digests(count: int) -> list[Digest]:
    return [Digest(DigestAlgorithm.SHA256, n.to_bytes(32, "big")) for n in range(count)]


def test_results_come_back_in_order_from_concurrent_batches(fake: Any) -> None:
    servicer, endpoint = fake
    wanted = digests(1000)
    with SignetClient([endpoint], insecure=True) as client:
        results = client.sign_many("release", wanted, batch_size=64, concurrency=4,
                                   request_id="job")
    assert [r.signature for r in results if isinstance(r, Signature)] == \
        [d.value for d in wanted]
    assert sorted(size for _, size in servicer.batches) == sorted([64] * 15 + [40])
    assert sorted(rid for rid, _ in servicer.batches) == sorted(f"job/{n}" for n in range(16))
    assert 1 < servicer.most_in_flight <= 4


def test_concurrent_batches_use_a_connection_each_and_keep_them(fake: Any) -> None:
    """Worker processes share the signer's port (SO_REUSEPORT) and the kernel spreads
    connections, not calls: sign_many's batches in flight need connections of their own."""
    servicer, endpoint = fake
    with SignetClient([endpoint], insecure=True) as client:
        client.sign_many("release", digests(2000), batch_size=50, concurrency=4)
        first = set(servicer.peers)
        servicer.peers.clear()
        client.sign_many("release", digests(2000), batch_size=50, concurrency=4)
        again = set(servicer.peers)
    assert len(first) == 4
    assert again == first  # the lanes stay open between calls


def test_item_errors_stay_in_place(fake: Any) -> None:
    _, endpoint = fake
    wanted = digests(300)
    wanted[5] = wanted[299] = Digest(DigestAlgorithm.SHA256, b"\xff" * 32)
    with SignetClient([endpoint], insecure=True) as client:
        results = client.sign_many("release", wanted, batch_size=100)
    assert len(results) == 300
    failed = [i for i, r in enumerate(results) if isinstance(r, SignetError)]
    assert failed == [5, 299]
    assert all(r.signature == wanted[i].value for i, r in enumerate(results)
               if isinstance(r, Signature))


def test_a_refused_batch_raises(fake: Any) -> None:
    servicer, endpoint = fake
    servicer.fail_request_suffix = "/2"
    with SignetClient([endpoint], insecure=True) as client, \
            pytest.raises(SignetError) as raised:
        client.sign_many("release", digests(500), batch_size=50, concurrency=2)
    assert raised.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_small_input_is_one_call_and_empty_input_none(fake: Any) -> None:
    servicer, endpoint = fake
    with SignetClient([endpoint], insecure=True) as client:
        assert len(client.sign_many("release", digests(3))) == 3
        assert client.sign_many("release", []) == []
    assert len(servicer.batches) == 1


@pytest.mark.parametrize(("batch_size", "concurrency"), [(0, 1), (1025, 1), (10, 0)])
def test_bad_arguments_are_refused(batch_size: int, concurrency: int) -> None:
    with SignetClient(["127.0.0.1:1"], insecure=True) as client, \
            pytest.raises(ValueError, match="must be"):
        client.sign_many("release", digests(1), batch_size=batch_size, concurrency=concurrency)
