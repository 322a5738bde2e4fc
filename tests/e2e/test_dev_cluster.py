"""`signet dev` and `make demo` as a new user runs them, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from kms.domain.keys import Digest, DigestAlgorithm
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e

SIGNET = [sys.executable, "-m", "signer.cli.main"]


def signet(*args: str, cluster: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cluster is not None:
        env["SIGNET_CLUSTER"] = str(cluster)
    return subprocess.run([*SIGNET, *args], capture_output=True, text=True, env=env,
                          check=False, timeout=120)


def ceremony(cluster: Path, *propose: str) -> subprocess.CompletedProcess[str]:
    """Propose through the CLI and approve with two of the dev custodians' key files (the
    threshold); returns the executing approval's result."""
    proposed = signet("ceremony", "propose", *propose, "--output", "json", cluster=cluster)
    assert proposed.returncode == 0, proposed.stderr
    proposal_id = json.loads(proposed.stdout)["id"]
    keys = sorted((cluster.parent / "custodians").glob("custodian-*.pem"))
    for key in keys[:2]:
        approved = signet("ceremony", "approve", proposal_id, "--key", str(key), cluster=cluster)
        assert approved.returncode == 0, approved.stderr
    return approved


def test_make_demo_journey_prints_a_verified_signature(tmp_path: Path) -> None:
    env = dict(os.environ, SIGNET_DEMO_STATE_DIR=str(tmp_path / "demo"))
    result = subprocess.run([sys.executable, "-m", "signer.dev.demo"], capture_output=True,
                            text=True, env=env, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "dev up --regions 3" in result.stdout
    assert "EXECUTED" in result.stdout  # the key was created by a custodian ceremony
    # Signed in two regions other than the key's home, both verified with one public key.
    assert '"region": "us-east"' in result.stdout
    assert '"region": "ap-south"' in result.stdout
    assert result.stdout.count("Signature Verified Successfully") == 2
    assert "verified: signature by key demo-" in result.stdout
    assert "admission signed-pod: ALLOWED" in result.stdout
    # The closing failover drill printed its summary and passed.
    assert "failover drill: region ap-south kill under 4 clients" in result.stdout
    assert "RESULT: PASS (RPO 0, no duplicates)" in result.stdout
    assert "stopped: signer" in result.stdout  # the cluster was taken down again


def test_up_down_status_and_up_again_reuses_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cluster = state / "cluster.json"
    try:
        up = signet("dev", "up", "--state-dir", str(state))
        assert up.returncode == 0, up.stdout + up.stderr
        ceremony(cluster, "create-key", "kept")
        status = signet("dev", "status", "--state-dir", str(state))
        assert status.returncode == 0
        assert "SERVING" in status.stdout
        down = signet("dev", "down", "--state-dir", str(state))
        assert "signer" in down.stdout
        assert "etcd" in down.stdout
        stopped = signet("dev", "status", "--state-dir", str(state))
        assert stopped.returncode == 7
        assert "UNREACHABLE" in stopped.stdout

        again = signet("dev", "up", "--state-dir", str(state))
        assert again.returncode == 0, again.stdout + again.stderr
        listed = signet("key", "list", "--output", "json", cluster=cluster)
        assert '"name": "kept"' in listed.stdout
        digest = hashlib.sha256(b"after restart").hexdigest()
        signed = signet("sign", "--key", "kept", "--digest", f"sha256:{digest}", cluster=cluster)
        assert signed.returncode == 0, signed.stderr
    finally:
        signet("dev", "down", "--state-dir", str(state))


def test_policy_apply_changes_who_may_sign(fresh_cluster: RunningCluster, tmp_path: Path) -> None:
    cluster = fresh_cluster.cluster.path
    fresh_cluster.create_key("prod")
    digest = f"sha256:{hashlib.sha256(b'x').hexdigest()}"
    assert signet("sign", "--key", "prod", "--digest", digest, cluster=cluster).returncode == 0

    narrow = tmp_path / "policy.yaml"
    narrow.write_text(
        "version: 1\n"
        "bindings:\n"
        "  - identity: spiffe://signet.dev/pipeline\n"
        "    sign: [staging-*]\n"
        "  - identity: spiffe://signet.dev/admin\n"
        "    admin: true\n"
    )
    direct = signet("policy", "apply", str(narrow), cluster=cluster)
    assert direct.returncode == 5
    assert "signet ceremony propose policy FILE" in direct.stderr
    ceremony(cluster, "policy", str(narrow))
    # The signer applies the policy from its watch; allow it a moment.
    for _ in range(50):
        denied = signet("sign", "--key", "prod", "--digest", digest, cluster=cluster)
        if denied.returncode != 0:
            break
    assert denied.returncode == 5
    assert "may not sign with key 'prod'" in denied.stderr
    shown = signet("policy", "show", "--output", "json", cluster=cluster)
    assert "staging-*" in shown.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nbindings:\n  - identity: x\n    sign: yes-please\n")
    rejected = signet("ceremony", "propose", "policy", str(broken), cluster=cluster)
    assert rejected.returncode == 3
    assert "bindings[0].sign" in rejected.stderr
    # The bad file changed nothing.
    assert "staging-*" in signet("policy", "show", cluster=cluster).stdout


def test_health_and_reflection_answer_standard_clients(dev_cluster: RunningCluster) -> None:
    cluster = dev_cluster.cluster
    admin = cluster.identity("admin")
    assert cluster.ca is not None
    creds = grpc.ssl_channel_credentials(cluster.ca.read_bytes(), admin.key.read_bytes(),
                                         admin.cert.read_bytes())
    with grpc.secure_channel(cluster.endpoints()[0], creds) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"signet.v1.Signing", "signet.v1.KeyAdmin", "grpc.health.v1.Health"} <= services


def test_prometheus_endpoint_serves_the_signer_metrics(dev_cluster: RunningCluster) -> None:
    with dev_cluster.client() as client, pytest.raises(SignetError) as refused:
        client.sign_digest("no-such-key", Digest(DigestAlgorithm.SHA256, bytes(32)))
    assert refused.value.code is grpc.StatusCode.NOT_FOUND  # refusals are counted too
    endpoint = (dev_cluster.signer.directory / "metrics-endpoint").read_text().strip()
    deadline = time.monotonic() + 5
    while True:  # gauges refresh once a second
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as response:
            text = response.read().decode()
        if "signet_lease_current 1.0" in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name in ("signet_rpc_duration_seconds_bucket", "signet_sign_duration_seconds_bucket",
                 "signet_signatures_total", "signet_hsm_errors_total",
                 "signet_lease_current", "signet_revocation_fence_seconds_bucket",
                 "signet_etcd_request_duration_seconds_bucket", "signet_key_state_revision",
                 "signet_audit_entries", "signet_audit_checkpoint_age_seconds",
                 "signet_trust_bundle_version", "signet_security_events_total"):
        assert name in text, f"{name} missing from /metrics"
    assert 'signet_signatures_total{key="no-such-key",outcome="NOT_FOUND"}' in text
    assert "signet_lease_current 1.0" in text
