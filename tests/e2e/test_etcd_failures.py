"""Signing when etcd members fail: keep going on a quorum, refuse (UNAVAILABLE) without one."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from signer.dev.processes import health_status
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e

LEASE_TTL = 5.0  # what `signet dev up` configures


def digest(n: int) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(str(n).encode()).digest())


def sign_for(cluster: RunningCluster, key: str, seconds: float) -> list[tuple[float, str]]:
    """Sign continuously; return (time, outcome) for every attempt."""
    outcomes = []
    with cluster.client(timeout=2.0, attempts_per_endpoint=1) as client:
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                client.sign_digest(key, digest(n))
                outcomes.append((time.monotonic(), "ok"))
            except SignetError as error:
                outcomes.append((time.monotonic(), error.code.name))
                time.sleep(0.05)
    return outcomes


def signer_health(cluster: RunningCluster) -> str:
    admin = cluster.cluster.identity("admin")
    return health_status(cluster.cluster.endpoints()[0], ca=cluster.cluster.ca,
                         cert=admin.cert, key=admin.key)


def test_signing_continues_when_the_connected_etcd_member_dies(
    dev_cluster3: RunningCluster,
) -> None:
    dev_cluster3.create_key("survivor", Algorithm.ECDSA_P256_SHA256)
    before = sign_for(dev_cluster3, "survivor", 1.0)
    assert before
    assert all(outcome == "ok" for _, outcome in before)

    etcd = dev_cluster3.etcd
    # The signer was given the members in this order and connects to the first one.
    killed_at = time.monotonic()
    etcd.member(0).kill()
    after = sign_for(dev_cluster3, "survivor", 2 * LEASE_TTL)
    failures = [(t - killed_at, o) for t, o in after if o != "ok"]
    last_failure = max((t for t, _ in failures), default=0.0)
    print(f"\nafter killing etcd member 0: {len(after)} attempts, {len(failures)} refused "
          f"(last {last_failure:.2f}s after the kill)")
    assert all(o == "UNAVAILABLE" for _, o in failures), failures
    # Service comes back well within one lease TTL and then stays up.
    assert last_failure < LEASE_TTL
    settled = [o for t, o in after if t - killed_at > LEASE_TTL]
    assert settled
    assert set(settled) == {"ok"}


def test_without_etcd_signing_stops_within_a_lease_ttl_and_resumes_by_itself(
    fresh_cluster: RunningCluster,
) -> None:
    fresh_cluster.create_key("fenced", Algorithm.ECDSA_P256_SHA256)
    with fresh_cluster.client() as client:
        client.sign_digest("fenced", digest(0))

    etcd = fresh_cluster.etcd
    paused_at = time.monotonic()
    for member in etcd.members:
        member.pause()
    try:
        during = sign_for(fresh_cluster, "fenced", LEASE_TTL + 2.0)
        health_while_cut = signer_health(fresh_cluster)
    finally:
        for member in etcd.members:
            member.resume()
    assert health_while_cut == "NOT_SERVING"  # probes route around a signer that is cut off
    late = [o for t, o in during if t - paused_at > LEASE_TTL]
    assert late, "no attempts after one lease TTL"
    assert set(late) == {"UNAVAILABLE"}, during
    first_refusal = min(t - paused_at for t, o in during if o != "ok")
    print(f"\nwith etcd paused the signer refused from {first_refusal:.2f}s on")

    # etcd is back: the signer recovers without a restart.
    deadline = time.monotonic() + 3 * LEASE_TTL
    while True:
        try:
            with fresh_cluster.client(timeout=2.0) as client:
                client.sign_digest("fenced", digest(1))
        except SignetError as error:
            refusal = error.code
        else:
            refusal = None
        if refusal is None:
            break
        assert refusal is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() < deadline, "signer did not recover after etcd returned"
        time.sleep(0.2)
    assert fresh_cluster.signer.running
    deadline = time.monotonic() + 5
    while signer_health(fresh_cluster) != "SERVING":
        assert time.monotonic() < deadline, "health did not return to SERVING"
        time.sleep(0.1)
