"""Custodian ceremonies on a real dev cluster with three signer processes: exactly-once
execution under concurrent approvals, refusal of direct lifecycle calls, the audit trail, and
a TUF root rotation that an unmodified ngclient follows."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from kms.domain.keys import Algorithm
from kms.domain.policy import AccessPolicy
from kms.tuf.signing import generate_custodian_key
from signer.ceremony_client import ApprovalInfo, sign_approval
from signer.dev.cluster import DevCluster
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster, key_record

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    dev = DevCluster(tmp_path_factory.mktemp("ceremonies"))
    try:
        yield RunningCluster(dev, dev.up(signers=3, log=False))
    finally:
        dev.down()


def ceremony_events(cluster: RunningCluster, proposal_id: str) -> list[dict[str, object]]:
    """Every ``ceremony`` audit entry about the proposal, from every signer process's log."""
    found = []
    for log in sorted(cluster.dev.state_dir.glob("signer-*/audit/*/entries.jsonl")):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("kind") == "ceremony" and entry.get("proposal") == proposal_id:
                found.append(entry)
    return found


def approve_at_once(cluster: RunningCluster, proposal_id: str, custodians: list[int]
                    ) -> list[ApprovalInfo | SignetError]:
    """Approve with each custodian through a different signer process, all at the same
    moment."""
    endpoints = cluster.cluster.endpoints()
    barrier = threading.Barrier(len(custodians))

    def approve(index: int) -> ApprovalInfo | SignetError:
        barrier.wait()
        try:
            return cluster.approve(proposal_id, custodians[index],
                                   endpoints[index % len(endpoints)])
        except SignetError as error:
            return error

    with ThreadPoolExecutor(len(custodians)) as pool:
        return list(pool.map(approve, range(len(custodians))))


def test_concurrent_approvals_through_three_signers_execute_exactly_once(
    cluster: RunningCluster,
) -> None:
    assert len(cluster.cluster.endpoints()) == 3
    cluster.create_key("raced-ceremony")
    for _ in range(3):
        proposal = cluster.propose("rotate", name="raced-ceremony")
        results = approve_at_once(cluster, proposal.id, [0, 1, 2])
        executed = [r for r in results if isinstance(r, ApprovalInfo) and r.executed]
        assert len(executed) == 1, results
        # The others were either counted before the threshold or refused as too late.
        for result in results:
            if isinstance(result, SignetError):
                assert result.code is grpc.StatusCode.FAILED_PRECONDITION, result
                assert "is executed" in result.message
        events = ceremony_events(cluster, proposal.id)
        assert [e["event"] for e in events].count("executed") == 1
        assert [e["event"] for e in events].count("proposed") == 1
    # Three rotations on top of version 1: exactly three new versions, nothing lost or doubled.
    record = key_record(cluster, "raced-ceremony")
    assert [v.number for v in record.versions] == [1, 2, 3, 4]
    assert record.primary_version == 4


def test_direct_lifecycle_rpcs_are_refused_and_name_the_ceremony(
    cluster: RunningCluster,
) -> None:
    cluster.create_key("direct")
    policy = AccessPolicy.from_dict({"version": 1, "bindings": []})
    calls = {
        "create": lambda a: a.create_key("direct-2", Algorithm.ED25519),
        "rotate": lambda a: a.rotate_key("direct"),
        "disable": lambda a: a.disable_version("direct", 1),
        "enable": lambda a: a.enable_version("direct", 1),
        "revoke": lambda a: a.revoke_version("direct", 1),
        "schedule-destroy": lambda a: a.schedule_destroy("direct", 1, waiting_seconds=90_000),
        "cancel-destroy": lambda a: a.cancel_destroy("direct", 1),
        "set-min-version": lambda a: a.set_min_sign_version("direct", 1),
        "policy": lambda a: a.set_policy(policy),
    }
    with cluster.client("admin") as admin:
        for verb, call in calls.items():
            with pytest.raises(SignetError) as refused:
                call(admin)
            assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED, verb
            assert "this needs a custodian ceremony: signet ceremony propose" in \
                refused.value.message, verb
    record = key_record(cluster, "direct")
    assert [v.state.value for v in record.versions] == ["ACTIVE"]  # nothing changed


def test_every_step_is_audited_and_refusals_are_precise(
    cluster: RunningCluster, tmp_path: Path,
) -> None:
    cluster.create_key("audited-ceremony")
    proposal = cluster.propose("disable", name="audited-ceremony", version=1)
    cluster.approve(proposal.id, 0)
    with pytest.raises(SignetError) as twice:
        cluster.approve(proposal.id, 0)
    assert twice.value.code is grpc.StatusCode.ALREADY_EXISTS
    stranger = tmp_path / "stranger.pem"
    generate_custodian_key(stranger)
    with cluster.ceremonies() as ceremonies, pytest.raises(SignetError) as outsider:
        ceremonies.approve(proposal.id, stranger)
    assert outsider.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "not a custodian key" in outsider.value.message
    done = cluster.approve(proposal.id, 1)
    assert done.executed
    assert done.key is not None
    assert done.key.versions[0].state == "DISABLED"
    events = [e["event"] for e in ceremony_events(cluster, proposal.id)]
    assert events == ["proposed", "approved", "approval-refused", "approval-refused",
                      "approved", "executed"]

    cancelled = cluster.propose("enable", name="audited-ceremony", version=1)
    with cluster.ceremonies() as ceremonies:
        ceremonies.cancel(cancelled.id)
    with pytest.raises(SignetError) as late:
        cluster.approve(cancelled.id, 0)
    assert late.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "is cancelled" in late.value.message
    assert [e["event"] for e in ceremony_events(cluster, cancelled.id)] == [
        "proposed", "cancelled", "approval-refused"]
    # An approval for one proposal never counts for another.
    other = cluster.propose("enable", name="audited-ceremony", version=1)
    with cluster.ceremonies() as ceremonies:
        foreign = sign_approval(ceremonies.get(cancelled.id), cluster.custodian_keys()[0])
        with pytest.raises(SignetError) as replayed:
            ceremonies.approve_envelope(other.id, foreign)
    assert replayed.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "never counts for another" in replayed.value.message


def test_root_rotation_by_ceremony_is_followed_by_an_unmodified_ngclient(
    fresh_cluster: RunningCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One signer: in a region of three started at once, only the signer whose online key
    # won serves /tuf/ today (the others log "online TUF key … not in this signer's HSM
    # token"), and cluster.json names the first signer's URL.
    cluster = fresh_cluster
    monkeypatch.setenv("SSL_CERT_FILE", str(cluster.cluster.ca))
    root_1 = cluster.dev.state_dir / str(cluster.cluster.extra["tuf_root"])
    proposal = cluster.propose("rotate-root")
    assert proposal.body.parameters["version"] == 2
    result = cluster.approve(proposal.id, 0)
    assert not result.executed
    result = cluster.approve(proposal.id, 2)
    assert result.executed
    # 2.root.json as served: signed by the old root's threshold and by its own.
    url = str(cluster.cluster.extra["tuf_url"])
    with urllib.request.urlopen(url + "2.root.json", timeout=10) as response:  # noqa: S310
        new_root = Metadata[Root].from_bytes(response.read())
    old_root = Metadata[Root].from_bytes(root_1.read_bytes())
    old_root.verify_delegate(Root.type, new_root)
    new_root.verify_delegate(Root.type, new_root)
    assert len(new_root.signatures) == 2
    # A stock client bootstrapped with root v1 walks to v2 and still gets the bundle.
    workdir = tmp_path / "ngclient"
    workdir.mkdir()
    updater = Updater(str(workdir), url, str(workdir), url + "targets/",
                      bootstrap=root_1.read_bytes())
    updater.refresh()
    trusted = json.loads((workdir / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 2
    assert updater.get_targetinfo("trust-bundle.json") is not None
    events = [e["event"] for e in ceremony_events(cluster, proposal.id)]
    assert events == ["proposed", "approved", "approved", "executed"]
