"""The audit log behind a real signer: every returned signature is recorded first, and a full
audit disk makes signing fail closed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from signer.dev.cluster import DevCluster
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster
from tests.fixtures.filesystems import resize

pytestmark = pytest.mark.e2e


def digest(n: int) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(str(n).encode()).digest())


@pytest.fixture
def audited_cluster(tmp_path: Path, tiny_filesystem: Path) -> Iterator[RunningCluster]:
    """A cluster whose signer writes its audit log to a 64 KiB filesystem."""
    dev = DevCluster(tmp_path / "cluster")
    try:
        cluster = dev.up(log=False, signer_settings={
            "audit": {"directory": str(tiny_filesystem), "checkpoint_every_entries": 50}})
        yield RunningCluster(dev, cluster)
    finally:
        dev.down()


def entries(audit_dir: Path, kind: str) -> list[dict[str, object]]:
    found = []
    for log in audit_dir.iterdir():
        for line in (log / "entries.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == kind:
                found.append(record)
    return found


def test_a_full_audit_disk_fails_closed_and_every_returned_signature_is_recorded(
    audited_cluster: RunningCluster, tiny_filesystem: Path,
) -> None:
    audited_cluster.create_key("audited", Algorithm.ECDSA_P256_SHA256)
    returned: list[str] = []
    refusals: list[SignetError] = []
    with audited_cluster.client(attempts_per_endpoint=1) as client:
        for n in range(320):  # far more than 64 KiB of entries can hold (about 180)
            try:
                client.sign_digest("audited", digest(n), request_id=f"r{n}")
            except SignetError as error:
                refusals.append(error)
                continue
            returned.append(f"r{n}")
        print(f"\nfull audit disk: {len(returned)} signatures returned, "
              f"{len(refusals)} refused")
        assert refusals, "the tiny audit filesystem never filled up"
        assert {e.code for e in refusals} == {grpc.StatusCode.UNAVAILABLE}
        assert all("audit" in e.message for e in refusals)
        recorded = [e["request_id"] for e in entries(tiny_filesystem, "sign")]
        assert sorted(recorded) == sorted(returned)  # nothing returned unrecorded, no extras

        # Space comes back (an operator grows the volume): signing resumes by itself.
        resize(tiny_filesystem, "4m")
        sig = client.sign_digest("audited", digest(10_000), request_id="after")
        assert sig.version == 1
    assert "after" in [e["request_id"] for e in entries(tiny_filesystem, "sign")]
    # The key came from a custodian ceremony: every step of it is recorded.
    assert [e["event"] for e in entries(tiny_filesystem, "ceremony")] == [
        "proposed", "approved", "approved", "executed"]


def audit_public_key(cluster: RunningCluster) -> str:
    """The region's audit checkpoint key, as recorded in etcd (PEM)."""
    etcd_identity = cluster.cluster.identity("etcd")

    async def read() -> dict[str, object] | None:
        store = EtcdKeyStateStore(EtcdConfig(
            endpoints=cluster.cluster.etcd_endpoints, ca_file=cluster.cluster.ca,
            cert_file=etcd_identity.cert, key_file=etcd_identity.key))
        try:
            return await store.get_record(store.layout.region_key("audit", "local"))
        finally:
            await store.close()

    record = asyncio.run(read())
    assert record is not None
    der = base64.b64decode(str(record["public_key_der"]))
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_the_audit_log_of_a_stopped_signer_verifies_offline(fresh_cluster: RunningCluster,
                                                           tmp_path: Path) -> None:
    fresh_cluster.create_key("logged", Algorithm.ED25519)
    with fresh_cluster.client() as client:
        for n in range(20):
            client.sign_digest("logged", digest(n), request_id=f"req-{n}")
    public_key = tmp_path / "audit-key.pem"
    public_key.write_text(audit_public_key(fresh_cluster))
    audit_root = fresh_cluster.signer.directory / "audit"
    fresh_cluster.dev.down()  # the signer writes a final signed checkpoint as it stops

    logs = sorted(audit_root.iterdir())
    assert len(logs) == 1
    signet = [sys.executable, "-m", "signer.cli.main", "audit", "verify",
              "--public-key", str(public_key), "--require-signed"]
    result = subprocess.run([*signet, str(logs[0]), "--output", "json"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    # four ceremony entries (proposed, approved twice, executed), twenty signatures
    assert json.loads(result.stdout)["entries"] == 24

    copy = tmp_path / "copy"
    shutil.copytree(logs[0], copy)
    lines = (copy / "entries.jsonl").read_text().splitlines()
    assert '"request_id":"req-1"' in lines[5]  # after the four ceremony entries
    lines[5] = lines[5].replace('"request_id":"req-1"', '"request_id":"req-X"')
    (copy / "entries.jsonl").write_text("\n".join(lines) + "\n")
    tampered = subprocess.run([*signet, str(copy)], capture_output=True, text=True, check=False)
    assert tampered.returncode == 8
    assert tampered.stderr.startswith("signet: error: audit log invalid:")
