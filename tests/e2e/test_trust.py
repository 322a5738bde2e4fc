"""Trust distribution on a real dev cluster: unmodified python-tuf ngclient against /tuf/,
GetTrustBundle with nonce freshness, and the CLI's bundle fetch and verify."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from tuf.ngclient import Updater

from kms.domain.keys import Digest, DigestAlgorithm
from signer._pb.signet.v1 import trust_pb2, trust_pb2_grpc
from signer.trust import GrpcTrustTransport, TrustClient, TrustError, TrustResponse
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e


def signet(cluster: RunningCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer.cli.main", *args, "--cluster", str(cluster.cluster.path)],
        capture_output=True, text=True, check=False, timeout=120,
    )


def tuf_bundle(cluster: RunningCluster, workdir: Path) -> dict[str, object]:
    """Download trust-bundle.json with a fresh, unmodified ngclient Updater."""
    url = str(cluster.cluster.extra["tuf_url"])
    root = cluster.dev.state_dir / str(cluster.cluster.extra["tuf_root"])
    workdir.mkdir(parents=True, exist_ok=True)
    updater = Updater(str(workdir), url, str(workdir), url + "targets/",
                      bootstrap=root.read_bytes())
    updater.refresh()
    info = updater.get_targetinfo("trust-bundle.json")
    assert info is not None
    path = updater.download_target(info)
    return dict(json.loads(Path(path).read_bytes()))


def versions_of(bundle: dict[str, object], name: str) -> dict[int, tuple[str, bool]]:
    keys = {k["name"]: k for k in bundle["keys"]}  # type: ignore[attr-defined]
    if name not in keys:
        return {}
    return {v["number"]: (v["state"], v["revoked"]) for v in keys[name]["versions"]}


def test_ngclient_verifies_the_bundle_and_sees_a_rotation(
    dev_cluster: RunningCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dev CA signs the signer's HTTPS certificate; ngclient's urllib3 trusts it this way.
    monkeypatch.setenv("SSL_CERT_FILE", str(dev_cluster.cluster.ca))
    dev_cluster.create_key("tuf-rot")
    deadline = time.monotonic() + 10
    while versions_of(tuf_bundle(dev_cluster, tmp_path / "a"), "tuf-rot") != {
            1: ("ACTIVE", False)}:
        assert time.monotonic() < deadline, "the created key never appeared"
    dev_cluster.rotate_key("tuf-rot")
    rotated_at = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        # A new Updater each time: ngclient refreshes once per instance; the cached metadata
        # in the same folder gives it rollback protection across refreshes.
        seen = versions_of(tuf_bundle(dev_cluster, tmp_path / "a"), "tuf-rot")
        if seen == {1: ("RETIRED", False), 2: ("ACTIVE", False)}:
            break
        assert time.monotonic() - rotated_at < 5, f"rotation not published: {seen}"
        time.sleep(0.1)


def test_bundle_fetch_and_verify_pass_then_fail_after_revoke(
    dev_cluster: RunningCluster, tmp_path: Path
) -> None:
    dev_cluster.create_key("tuf-rev")
    sha = hashlib.sha256(b"image manifest").hexdigest()
    sig = tmp_path / "sig.der"
    signed = signet(dev_cluster, "sign", "--key", "tuf-rev", "--digest", f"sha256:{sha}",
                    "--signature-out", str(sig))
    assert signed.returncode == 0, signed.stderr
    state = tmp_path / "state"
    ok = signet(dev_cluster, "verify", "--digest", f"sha256:{sha}", "--signature", str(sig),
                "--key", "tuf-rev", "--state-dir", str(state))
    assert ok.returncode == 0, ok.stderr
    assert "valid: signed by key tuf-rev version 1" in ok.stdout

    dev_cluster.lifecycle("revoke", "tuf-rev", 1)
    returned = time.monotonic()
    while True:
        fetched = signet(dev_cluster, "bundle", "fetch", "--state-dir", str(state),
                         "--output", "json")
        assert fetched.returncode == 0, fetched.stderr
        entry = [v for v in json.loads(fetched.stdout)["versions"] if v["key"] == "tuf-rev"]
        if entry and entry[0]["revoked"]:
            break
        assert time.monotonic() - returned < 5, "revocation not in the bundle within 5 s"
    refused = signet(dev_cluster, "verify", "--digest", f"sha256:{sha}", "--signature", str(sig),
                     "--state-dir", str(state))
    assert refused.returncode == 9
    assert "REVOKED" in refused.stderr
    offline = signet(dev_cluster, "verify", "--digest", f"sha256:{sha}", "--signature",
                     str(sig), "--state-dir", str(state), "--offline")
    assert offline.returncode == 9


class _AskOtherRegion:
    """Forwards to the server but asks for the server's own region, whatever the client
    wanted: the server then honestly vouches for region 'local'."""

    def __init__(self, inner: GrpcTrustTransport) -> None:
        self.inner = inner

    def fetch(self, nonce: bytes, region: str, known_root_version: int) -> TrustResponse:
        return self.inner.fetch(nonce, "", known_root_version)


def test_a_statement_for_another_region_is_refused(dev_cluster: RunningCluster,
                                                   tmp_path: Path) -> None:
    transport = GrpcTrustTransport.from_cluster(dev_cluster.cluster, "local")
    try:
        root = dev_cluster.dev.state_dir / str(dev_cluster.cluster.extra["tuf_root"])
        wants_eu = TrustClient(root, tmp_path / "eu", "eu", _AskOtherRegion(transport))
        with pytest.raises(TrustError) as refused:
            wants_eu.refresh()
        assert refused.value.check == "region"
        assert not (tmp_path / "eu" / "trust-state.json").exists()
        # Asked honestly, the server names the region that can answer.
        with pytest.raises(Exception, match="FAILED_PRECONDITION") as precondition:
            transport.fetch(b"r" * 32, "eu", 1)
        assert "'eu'" in str(precondition.value)
        local = TrustClient(root, tmp_path / "local", "local", transport)
        assert local.refresh().region == "local"
    finally:
        transport.close()


@pytest.mark.parametrize("nonce", [b"", b"short", b"x" * 15, b"x" * 257])
def test_get_trust_bundle_refuses_a_bad_nonce(dev_cluster: RunningCluster, nonce: bytes) -> None:
    cluster = dev_cluster.cluster
    who = cluster.identity("pipeline")
    assert cluster.ca is not None
    credentials = grpc.ssl_channel_credentials(cluster.ca.read_bytes(), who.key.read_bytes(),
                                               who.cert.read_bytes())
    with grpc.secure_channel(cluster.endpoints()[0], credentials) as channel:
        stub = trust_pb2_grpc.TrustStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTrustBundle(trust_pb2.GetTrustBundleRequest(nonce=nonce), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "16 to 256" in (refused.value.details() or "")


def test_a_signature_digest_mismatch_is_untrusted(dev_cluster: RunningCluster,
                                                  tmp_path: Path) -> None:
    root = dev_cluster.dev.state_dir / str(dev_cluster.cluster.extra["tuf_root"])
    transport = GrpcTrustTransport.from_cluster(dev_cluster.cluster, "local")
    try:
        client = TrustClient(root, tmp_path, "local", transport)
        client.refresh()
        digest = Digest(DigestAlgorithm.SHA256, hashlib.sha256(b"other").digest())
        with pytest.raises(TrustError) as refused:
            client.verify_signature(digest, b"\x30\x06\x02\x01\x01\x02\x01\x01")
        assert refused.value.check == "unknown-key"
    finally:
        transport.close()
