"""`signet dev` and `make demo` as a new user runs them, through the real CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e

SIGNET = [sys.executable, "-m", "signer.cli.main"]


def signet(*args: str, cluster: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cluster is not None:
        env["SIGNET_CLUSTER"] = str(cluster)
    return subprocess.run([*SIGNET, *args], capture_output=True, text=True, env=env,
                          check=False, timeout=120)


def test_make_demo_journey_prints_a_verified_signature(tmp_path: Path) -> None:
    env = dict(os.environ, SIGNET_DEMO_STATE_DIR=str(tmp_path / "demo"))
    result = subprocess.run([sys.executable, "-m", "signer.dev.demo"], capture_output=True,
                            text=True, env=env, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Signature Verified Successfully" in result.stdout
    assert "verified: signature by key demo-" in result.stdout
    assert "stopped: signer" in result.stdout  # the cluster was taken down again


def test_up_down_status_and_up_again_reuses_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cluster = state / "cluster.json"
    try:
        up = signet("dev", "up", "--state-dir", str(state))
        assert up.returncode == 0, up.stdout + up.stderr
        assert signet("key", "create", "kept", cluster=cluster).returncode == 0
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
    assert signet("key", "create", "prod", cluster=cluster).returncode == 0
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
    applied = signet("policy", "apply", str(narrow), cluster=cluster)
    assert applied.returncode == 0, applied.stderr
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
    rejected = signet("policy", "apply", str(broken), cluster=cluster)
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
