"""``signet serve`` with two worker processes on one port (docs/adr/0008): both serve, a
killed worker comes back, revocation fences every worker, SIGTERM stops them all."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from signer.ceremony_client import CeremonyClient
from signer.client import SignetClient
from signer.dev.ca import DevCa
from signer.dev.cluster import DevCluster
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e


def worker_pids(cluster: RunningCluster) -> list[int]:
    """The signer's worker processes: the children of the supervisor."""
    pid = cluster.signer.pid
    assert pid is not None
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def admin_action(cluster: RunningCluster, action: str, **parameters: Any) -> Any:
    """An administrative change: a direct call where allowed, else a 2-of-3 ceremony with the
    development custodian keys."""
    with cluster.client("admin", timeout=30.0) as admin:
        direct = {"create-key": lambda: admin.create_key(
                      parameters["name"], Algorithm.parse(parameters["algorithm"])),
                  "revoke": lambda: admin.revoke_version(parameters["name"],
                                                         parameters["version"])}[action]
        try:
            return direct()
        except SignetError as error:
            if error.code is not grpc.StatusCode.PERMISSION_DENIED or \
                    "ceremony" not in error.message:
                raise
        ceremony = CeremonyClient(admin)
        proposal = ceremony.propose(action, parameters)
        for n in (1, 2):
            approval = ceremony.approve(
                proposal.id, cluster.dev.state_dir / "custodians" / f"custodian-{n}.pem")
            if approval.executed:
                return approval
        raise AssertionError(f"ceremony {action} did not execute")


def digest(n: int) -> Digest:
    return Digest(DigestAlgorithm.SHA256, n.to_bytes(32, "big"))


def sign_on_fresh_connections(cluster: RunningCluster, key: str, count: int) -> list[int]:
    """Sign ``count`` digests, each on a new client (a new TCP connection, which the kernel
    may hand to either worker); returns the signed versions."""
    versions = []
    for n in range(count):
        # Patient: a connection the kernel queued on a worker that was just killed is reset,
        # and the client library retries UNAVAILABLE with backoff.
        with cluster.client("pipeline", attempts_per_endpoint=6) as client:
            versions.append(client.sign_digest(key, digest(n)).version)
    return versions


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def audit_logs_with_signatures(cluster: RunningCluster) -> set[str]:
    audit = cluster.signer.directory / "audit"
    return {entries.parent.name for entries in audit.glob("*/entries.jsonl")
            if '"kind":"sign"' in entries.read_text()}


# Generous for what the other tests here do (about 100 calls per identity), tight for the probe.
LIMITS = {"per_identity_rps": 50, "per_identity_burst": 150}
PROBE_URI = "spiffe://signet.dev/limits-probe"


@pytest.fixture(scope="module")
def workers_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    dev = DevCluster(tmp_path_factory.mktemp("workers"))
    try:
        cluster = dev.up(log=False, signer_settings={"workers": 2, "limits": LIMITS})
        running = RunningCluster(dev, cluster)
        wait_for(lambda: len(worker_pids(running)) == 2 and running.signer.log_path.read_text()
                 .count(") is ready") >= 2, 30, "two ready workers")
        admin_action(running, "create-key", name="shared", algorithm="ecdsa-p256")
        yield running
    finally:
        dev.down()


def test_two_workers_serve_one_port_and_both_sign(workers_cluster: RunningCluster) -> None:
    c = workers_cluster
    assert len(c.cluster.endpoints()) == 1
    assert len(worker_pids(c)) == 2
    time.sleep(0.5)  # both workers have the new key from their watch
    assert set(sign_on_fresh_connections(c, "shared", 30)) == {1}
    # Each worker keeps its own audit log; 30 connections all landing on one worker would
    # happen with probability 2**-29.
    assert len(audit_logs_with_signatures(c)) == 2
    # Worker 0 starts alone first, so no sibling races it for the region's keys.
    assert "trust distribution is off" not in c.signer.log_path.read_text()


def test_an_identity_is_limited_by_the_signer_not_by_each_worker(
    workers_cluster: RunningCluster,
) -> None:
    """The rate limit is one bucket per identity for the whole signer: spread over both
    workers on 20 connections, 240 calls get the burst and the refill, not twice that."""
    c = workers_cluster
    ca = c.ca_dir
    DevCa.load_or_create(ca).issue("limits-probe", uri=PROBE_URI, client=True)
    outcomes: list[str] = []
    started = time.monotonic()
    for _ in range(20):
        with SignetClient(c.cluster.endpoints(), ca=c.cluster.ca, cert=ca / "limits-probe.pem",
                          key=ca / "limits-probe-key.pem", attempts_per_endpoint=1) as probe:
            for _ in range(12):
                try:
                    probe.public_key("shared")
                    outcomes.append("OK")
                except SignetError as error:
                    outcomes.append(error.code.name)
    elapsed = time.monotonic() - started
    allowed = LIMITS["per_identity_burst"] + LIMITS["per_identity_rps"] * elapsed
    print(f"\n{outcomes.count('OK')} of {len(outcomes)} calls admitted in {elapsed:.1f} s "
          f"(burst {LIMITS['per_identity_burst']}, then {LIMITS['per_identity_rps']}/s)")
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED"}
    assert outcomes.count("OK") <= allowed + 1
    # Other identities keep their own bucket.
    assert set(sign_on_fresh_connections(c, "shared", 3)) == {1}


def test_a_killed_worker_is_restarted_and_signing_continues(
    workers_cluster: RunningCluster,
) -> None:
    c = workers_cluster
    before = worker_pids(c)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not _alive(victim), 10, "the killed worker to exit")
    # The surviving worker keeps signing (a client retries UNAVAILABLE from the lost one).
    assert set(sign_on_fresh_connections(c, "shared", 5)) == {1}
    wait_for(lambda: len(worker_pids(c)) == 2 and victim not in worker_pids(c), 15,
             "the supervisor to restart the killed worker")
    replacement = (set(worker_pids(c)) - set(before)).pop()
    wait_for(lambda: f"(pid {replacement}) is ready" in c.signer.log_path.read_text(), 30,
             "the new worker to be ready")
    assert "killed by SIGKILL" in c.signer.log_path.read_text()
    before_logs = audit_logs_with_signatures(c)
    assert set(sign_on_fresh_connections(c, "shared", 30)) == {1}
    assert len(audit_logs_with_signatures(c) - before_logs) == 1  # the new worker signed


def test_revocation_fences_every_worker(workers_cluster: RunningCluster) -> None:
    c = workers_cluster
    admin_action(c, "create-key", name="fenced", algorithm="ecdsa-p256")
    time.sleep(0.5)
    assert set(sign_on_fresh_connections(c, "fenced", 6)) == {1}
    result = admin_action(c, "revoke", name="fenced", version=1)
    acknowledged = [s for s in result.signers_acknowledged if s.startswith("local/")]
    # Every worker is a fenced signer of its own: both acknowledged the revocation.
    pids = {str(p) for p in worker_pids(c)}
    assert {s.split("-")[-2] for s in acknowledged} >= pids
    for n in range(10):
        with c.client("pipeline") as client, pytest.raises(SignetError) as refused:
            client.sign_digest("fenced", digest(n))
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION


def test_sigterm_to_the_supervisor_stops_every_worker(
    workers_cluster: RunningCluster,
) -> None:
    c = workers_cluster
    supervisor, workers = c.signer.pid, worker_pids(c)
    assert supervisor is not None
    assert len(workers) == 2
    c.signer.stop()  # SIGTERM to the supervisor, as 'signet dev down' does
    assert not alive(supervisor)
    wait_for(lambda: not any(alive(p) for p in workers), 5, "the workers to exit")
    log = c.signer.log_path.read_text()
    assert "received SIGTERM: stopping 2 workers" in log
    assert log.count(") stopped (exit status 0)") >= 2, "the workers drained and exited cleanly"
