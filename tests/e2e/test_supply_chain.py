"""Supply-chain signing against a real signer: DSSE statements that stock verifiers accept,
cosign payloads that openssl verifies, the statement policy, and the admission webhook over
real HTTPS with signatures filed by the CLI."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.exceptions import VerificationError as SslibVerificationError
from securesystemslib.signer import SSlibKey

from kms.domain.keys import Algorithm
from kms.domain.policy import AccessPolicy
from kms.domain.provenance import SLSA_PROVENANCE_V1, VerificationPolicy
from signer.admission import AdmissionController, AdmissionServer
from signer.dev.ca import DevCa
from signer.errors import SignetError
from signer.payloads.dsse import Envelope, pae
from signer.payloads.intoto import Statement
from signer.signature_store import SignatureStore
from signer.supplychain_client import SupplyChainClient
from signer.verification import ClusterKeyResolver
from tests.fixtures.cluster import RunningCluster
from tests.unit.test_provenance_policy import slsa_statement

pytestmark = pytest.mark.e2e

KEY = "sc-release"
REGISTRY = "registry.example.com"
DIGEST_HEX = "5c" * 32
IMAGE = f"{REGISTRY}/app@sha256:{DIGEST_HEX}"


@pytest.fixture(scope="module")
def cluster(dev_cluster: RunningCluster) -> RunningCluster:
    """The dev cluster with an ECDSA and an Ed25519 key and a statement policy for the
    pipeline identity."""
    with dev_cluster.client("admin") as admin:
        admin.create_key(KEY, Algorithm.ECDSA_P256_SHA256)
        admin.create_key("sc-ed25519", Algorithm.ED25519)
        current, revision = admin.get_policy()
        document = current.to_dict()
        for binding in document["bindings"]:
            if binding["identity"].endswith("/pipeline"):
                binding["statements"] = {
                    "predicate_types": [SLSA_PROVENANCE_V1],
                    "builder_ids": ["https://ci.example.com/builders/*"],
                    "subject_registries": [REGISTRY],
                    "require_resolved_dependencies": True,
                }
        admin.set_policy(AccessPolicy.from_dict(document), expected_revision=revision)
    time.sleep(0.5)  # the signer applies the policy from its watch
    return dev_cluster


def statement_json(digest_hex: str = DIGEST_HEX) -> bytes:
    return json.dumps(slsa_statement(digest_hex, f"{REGISTRY}/app")).encode()


def openssl_verify(tmp_path: Path, pem: str, message: bytes, signature: bytes) -> int:
    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "message.bin").write_bytes(message)
    (tmp_path / "sig.der").write_bytes(signature)
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature",
         str(tmp_path / "sig.der"), str(tmp_path / "message.bin")],
        capture_output=True, check=False).returncode


def test_sign_statement_envelope_verifies_with_securesystemslib_and_openssl(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    with cluster.client() as client:
        signed = SupplyChainClient(client).sign_statement(KEY, statement_json())
        public = client.public_key(KEY)
    assert (signed.key, signed.key_version, signed.key_id) == (KEY, 1, public.key_id)
    envelope = Envelope.from_json(signed.envelope_json)
    assert envelope.payload_type == "application/vnd.in-toto+json"
    assert [s.keyid for s in envelope.signatures] == [public.key_id]
    assert Statement.from_json(envelope.payload) == Statement.from_json(statement_json())

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = SSlibKey.from_crypto(load_pem_public_key(public.pem.encode()), keyid=public.key_id)
    stock = SslibEnvelope.from_dict(json.loads(signed.envelope_json))
    assert set(stock.verify([key], 1)) == {public.key_id}
    assert openssl_verify(tmp_path, public.pem, envelope.pae(), envelope.signatures[0].sig) == 0

    tampered_payload = envelope.payload.replace(b"ci.example.com", b"ci.evil.example")
    tampered = SslibEnvelope.from_dict(
        {**json.loads(signed.envelope_json),
         "payload": base64.b64encode(tampered_payload).decode()})
    with pytest.raises(SslibVerificationError):
        tampered.verify([key], 1)
    assert openssl_verify(tmp_path, public.pem, pae(envelope.payload_type, tampered_payload),
                          envelope.signatures[0].sig) != 0


def test_sign_image_payload_and_signature_verify_with_openssl(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    with cluster.client() as client:
        signed = SupplyChainClient(client).sign_image(KEY, IMAGE, annotations={"run": "7"})
        public = client.public_key(KEY)
    payload = json.loads(signed.payload)
    assert payload["critical"] == {
        "identity": {"docker-reference": f"{REGISTRY}/app"},
        "image": {"docker-manifest-digest": f"sha256:{DIGEST_HEX}"},
        "type": "cosign container image signature",
    }
    assert payload["optional"] == {"run": "7"}
    assert openssl_verify(tmp_path, public.pem, signed.payload, signed.signature) == 0
    assert openssl_verify(tmp_path, public.pem, signed.payload + b" ", signed.signature) != 0


def test_policy_and_key_violations_are_refused_with_precise_statuses(
    cluster: RunningCluster,
) -> None:
    bad = slsa_statement(DIGEST_HEX, f"{REGISTRY}/app")
    bad["predicate"]["runDetails"]["builder"]["id"] = "https://laptop.example.com/"
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (lambda sc: sc.sign_statement(KEY, json.dumps(bad).encode()),
         grpc.StatusCode.FAILED_PRECONDITION, "rule 'slsa-builder-id' failed"),
        (lambda sc: sc.sign_statement(KEY, statement_json().replace(b"registry.example.com",
                                                                    b"docker.io")),
         grpc.StatusCode.FAILED_PRECONDITION, "rule 'subject-registries' failed"),
        (lambda sc: sc.sign_statement("sc-ed25519", statement_json()),
         grpc.StatusCode.FAILED_PRECONDITION, "ecdsa-p256 or rsa-pss-3072"),
        (lambda sc: sc.sign_statement(KEY, b'{"_type": "x"}'),
         grpc.StatusCode.INVALID_ARGUMENT, "'_type'"),
        (lambda sc: sc.sign_image(KEY, f"docker.io/acme/app@sha256:{DIGEST_HEX}"),
         grpc.StatusCode.FAILED_PRECONDITION, "rule 'subject-registries' failed"),
        (lambda sc: sc.sign_image(KEY, f"{REGISTRY}/app:latest"),
         grpc.StatusCode.INVALID_ARGUMENT, "not pinned by digest"),
        (lambda sc: sc.sign_image("missing", IMAGE), grpc.StatusCode.NOT_FOUND, "missing"),
    ]
    with cluster.client() as client:
        supply = SupplyChainClient(client)
        for call, code, message in cases:
            with pytest.raises(SignetError) as refused:
                call(supply)
            assert refused.value.code is code, refused.value
            assert message in refused.value.message


def test_attest_without_a_baseline_is_a_failed_precondition(cluster: RunningCluster) -> None:
    with cluster.client() as client, pytest.raises(SignetError) as refused:
        SupplyChainClient(client).attest(f"sha256:{DIGEST_HEX}", {}, {})
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "baseline" in refused.value.message


def _post(url: str, body: bytes, context: ssl.SSLContext) -> tuple[int, bytes]:
    request = urllib.request.Request(  # noqa: S310 -- a fixed https URL built by the test
        url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _review(*images: str) -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "e2e", "operation": "CREATE", "kind": {"kind": "Pod"},
                    "object": {"spec": {"containers": [
                        {"name": f"c{i}", "image": im} for i, im in enumerate(images)]}}},
    }).encode()


def test_admission_webhook_over_https_with_signatures_from_the_cli(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    signet = [sys.executable, "-m", "signer.cli.main"]
    common = ["--cluster", str(cluster.cluster.path)]
    (tmp_path / "statement.json").write_bytes(statement_json())
    for argv in (
        [*signet, "sign-image", IMAGE, "--key", KEY, "--store", str(store), *common],
        [*signet, "sign-statement", str(tmp_path / "statement.json"), "--key", KEY,
         "--store", str(store), "--out", str(tmp_path / "envelope.json"), *common],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    policy_document = {"version": 1, "trusted_keys": [KEY],
                       "builder_ids": ["https://ci.example.com/builders/*"],
                       "source_repositories": ["https://git.example.com/acme/*"]}
    (tmp_path / "policy.yaml").write_text(json.dumps(policy_document))
    verified = subprocess.run(
        [*signet, "verify-attestation", str(tmp_path / "envelope.json"), "--policy",
         str(tmp_path / "policy.yaml"), "--image", IMAGE, *common],
        capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "[pass] slsa-builder-id" in verified.stdout

    ca = DevCa.load_or_create(cluster.ca_dir)
    tls = ca.issue("webhook", server_names=("127.0.0.1",), server=True)
    client = cluster.client()
    controller = AdmissionController(
        SignatureStore(store), ClusterKeyResolver(client, [KEY]),
        VerificationPolicy.from_dict(policy_document), time.time)
    server = AdmissionServer(("127.0.0.1", 0), controller, tls.cert_path, tls.key_path)
    server.start()
    try:
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        url = f"https://127.0.0.1:{server.port}/validate"
        status, body = _post(url, _review(IMAGE), context)
        assert status == 200, body
        assert json.loads(body)["response"]["allowed"] is True
        unsigned = f"{REGISTRY}/app@sha256:{'77' * 32}"
        status, body = _post(url, _review(IMAGE, unsigned), context)
        response = json.loads(body)["response"]
        assert (status, response["allowed"]) == (200, False)
        assert unsigned in response["status"]["message"]
        status, body = _post(url, _review(f"{REGISTRY}/app:latest"), context)
        assert "rule 'image-pinned-by-digest' failed" in json.loads(body)["response"][
            "status"]["message"]
        status, body = _post(url, b"{not json", context)
        assert status == 400
        assert b"malformed AdmissionReview" in body
    finally:
        server.stop()
        client.close()
