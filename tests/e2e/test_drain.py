"""A signer told to stop (SIGTERM) drains: calls it is already handling run to the end (up to
10 s), new calls get UNAVAILABLE saying it is stopping (nothing was done: retry elsewhere),
and only then does it exit (issue 10). Raw gRPC clients, not the retrying client library."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kms.domain.keys import Algorithm
from signer._pb.signet.v1 import common_pb2, signing_pb2, signing_pb2_grpc
from tests.fixtures.cluster import RunningCluster, cluster_with_keys

pytestmark = pytest.mark.e2e

BATCH = 256  # RSA-PSS-3072 signs 200-500/s in SoftHSM here: three batches are 2-4 s of work


@pytest.fixture
def single(tmp_path: Path) -> Iterator[RunningCluster]:
    with cluster_with_keys(tmp_path / "cluster",
                           {"drain-rsa": Algorithm.RSA_PSS_3072_SHA256,
                            "drain": Algorithm.ECDSA_P256_SHA256},
                           signer_settings={"ceremonies": {"required": False}}) as running:
        yield running


def _stub(cluster: RunningCluster) -> tuple[grpc.Channel, signing_pb2_grpc.SigningStub]:
    ca = cluster.ca_dir
    credentials = grpc.ssl_channel_credentials(
        cluster.cluster.ca.read_bytes(), (ca / "pipeline-key.pem").read_bytes(),
        (ca / "pipeline.pem").read_bytes())
    channel = grpc.secure_channel(cluster.cluster.endpoints()[0], credentials,
                                  options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, signing_pb2_grpc.SigningStub(channel)


def _digest(text: str) -> common_pb2.Digest:
    return common_pb2.Digest(algorithm=common_pb2.SHA256,
                             value=hashlib.sha256(text.encode()).digest())


def test_sigterm_lets_running_calls_finish_and_refuses_new_ones(single: RunningCluster) -> None:
    outcomes: dict[int, object] = {}

    def batch(number: int) -> None:
        channel, stub = _stub(single)
        with channel:
            request = signing_pb2.SignBatchRequest(
                key="drain-rsa", digests=[_digest(f"{number}-{i}") for i in range(BATCH)])
            try:
                response = stub.SignBatch(request, timeout=60)
                outcomes[number] = sum(1 for r in response.results if r.signature.signature)
            except grpc.RpcError as error:
                outcomes[number] = error.code().name

    callers = [threading.Thread(target=batch, args=(n,)) for n in range(3)]
    for caller in callers:
        caller.start()
    time.sleep(0.5)  # the three batches are in the signer, seconds of signing ahead
    pid = single.signer.pid
    assert pid is not None
    began = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)

    channel, stub = _stub(single)
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.SignDigest(signing_pb2.SignDigestRequest(key="drain", digest=_digest("late")),
                        timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "stopping" in str(refused.value.details())

    for caller in callers:
        caller.join(timeout=60)
    drained_after = time.monotonic() - began
    print(f"\nbatches after SIGTERM: {outcomes}; last one done {drained_after:.1f} s after it")
    assert outcomes == {0: BATCH, 1: BATCH, 2: BATCH}
    deadline = time.monotonic() + 20
    while single.signer.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not single.signer.running  # and then it exits by itself
