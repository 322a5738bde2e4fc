"""Proposal expiry and retention on a real dev cluster, through the CLI: an expired proposal
refuses approvals (FAILED_PRECONDITION naming the expiry), and the elected maintenance loop
deletes closed proposals once ``ceremonies.retention_seconds`` have passed since they closed,
while the audit log keeps them. docs/adr/0009-custodian-ceremonies.md."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from signer.dev.cluster import DevCluster
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e

RETENTION = 15.0
LIFETIME = 8  # seconds; the cluster below lowers the 60 s minimum for this test


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RunningCluster]:
    dev = DevCluster(tmp_path / "cluster")
    try:
        yield RunningCluster(dev, dev.up(log=False, signer_settings={
            "ceremonies": {"retention_seconds": RETENTION, "min_lifetime_seconds": 1},
            "lifecycle": {"maintenance_interval_seconds": 0.25},
        }))
    finally:
        dev.down()


def signet(cluster: RunningCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer.cli.main", *args, "--cluster", str(cluster.cluster.path)],
        capture_output=True, text=True, check=False, timeout=120,
    )


def propose(cluster: RunningCluster, name: str, *extra: str) -> str:
    done = signet(cluster, "ceremony", "propose", "create-key", name, *extra, "-o", "json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["id"])


def ceremony_events(cluster: RunningCluster, proposal_id: str) -> list[dict[str, Any]]:
    return [entry for log in cluster.dev.state_dir.glob("signer-*/audit/*/entries.jsonl")
            for entry in map(json.loads, log.read_text().splitlines())
            if entry.get("kind") == "ceremony" and entry.get("proposal") == proposal_id]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_expired_proposals_refuse_approvals_and_closed_ones_are_deleted_after_retention(
    cluster: RunningCluster,
) -> None:
    custodian_1, custodian_2 = (str(p) for p in cluster.custodian_keys()[:2])
    expiring = propose(cluster, "expiring", "--lifetime", str(LIFETIME))
    proposed_at = time.time()
    cancelled = propose(cluster, "cancelled")
    staying = propose(cluster, "staying")  # open, default lifetime: never deleted
    first = signet(cluster, "ceremony", "approve", expiring, "--key", custodian_1)
    assert first.returncode == 0, first.stderr  # open: below the threshold, waits
    done = signet(cluster, "ceremony", "cancel", cancelled)
    assert done.returncode == 0, done.stderr
    cancelled_at = time.time()

    # Past its expiry the proposal refuses the approval that would have executed it.
    time.sleep(max(0.0, proposed_at + LIFETIME + 1 - time.time()))
    refused = signet(cluster, "ceremony", "approve", expiring, "--key", custodian_2)
    assert refused.returncode == 6, refused.stderr  # FAILED_PRECONDITION
    assert "FAILED_PRECONDITION" in refused.stderr
    assert "expired" in refused.stderr
    listed = signet(cluster, "ceremony", "list", "--all", "-o", "json")
    statuses = {p["id"]: p["status"] for p in json.loads(listed.stdout)}
    assert statuses[expiring] == "expired"
    assert statuses[staying] == "open"
    with cluster.client("admin") as admin:
        assert "expiring" not in {k.name for k in admin.list_keys()}

    # The cancelled proposal goes once its retention period has passed, not before.
    shown = signet(cluster, "ceremony", "show", cancelled)
    assert shown.returncode == 0, shown.stderr
    wait_for(lambda: signet(cluster, "ceremony", "show", cancelled).returncode == 4,
             RETENTION + 20, "the cancelled proposal to be deleted")
    assert time.time() - cancelled_at >= RETENTION - 1

    # …and is deleted RETENTION seconds after it expired; the open one stays.
    wait_for(lambda: signet(cluster, "ceremony", "show", expiring).returncode == 4,
             RETENTION + 20, "the expired proposal to be deleted")
    assert signet(cluster, "ceremony", "show", staying).returncode == 0

    # The audit log is the permanent record: every step, and the deletion.
    for proposal_id, steps in ((cancelled, ["proposed", "cancelled", "purged"]),
                               (expiring, ["proposed", "approved", "approval-refused",
                                           "purged"])):
        events = ceremony_events(cluster, proposal_id)
        assert [e["event"] for e in events] == steps
        purged = events[-1]
        assert purged["status"] in {"cancelled", "expired"}
    assert [e["event"] for e in ceremony_events(cluster, staying)] == ["proposed"]
