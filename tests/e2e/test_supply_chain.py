"""Supply-chain signing against a real signer: DSSE statements that stock verifiers accept,
cosign payloads that openssl verifies, the statement policy, the admission webhook over
real HTTPS with signatures filed by the CLI, signatures attached to a real local OCI registry
(images pushed with skopeo), revocation, and runtime attestation with a baseline."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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
from signer.dev.cluster import DevCluster
from signer.dev.registry import LocalRegistry, minimal_image
from signer.errors import SignetError
from signer.payloads.dsse import Envelope, pae
from signer.payloads.intoto import Statement
from signer.registry import CosignRegistry
from signer.signature_store import SignatureStore
from signer.supplychain_client import SupplyChainClient
from signer.trust import GrpcTrustTransport, TrustClient
from signer.verification import BundleKeyResolver, ClusterKeyResolver
from tests.fixtures.cluster import RunningCluster
from tests.unit.test_provenance_policy import slsa_statement

pytestmark = pytest.mark.e2e

KEY = "sc-release"
REGISTRY = "registry.example.com"
DIGEST_HEX = "5c" * 32
IMAGE = f"{REGISTRY}/app@sha256:{DIGEST_HEX}"


FILE_HEX = "ab" * 32
VERIFICATION_POLICY = {"version": 1, "trusted_keys": [KEY, "sc-doomed"],
                       "builder_ids": ["https://ci.example.com/builders/*"],
                       "source_repositories": ["https://git.example.com/acme/*"]}


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on a free loopback port with its own storage; stopped after."""
    registry = LocalRegistry.start(tmp_path_factory.mktemp("registry"))
    try:
        yield registry.address
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, local_registry: str
) -> Iterator[RunningCluster]:
    """A dev cluster whose signer has a runtime-attestation baseline (for image DIGEST_HEX)
    and an audit folder we read, with an ECDSA and an Ed25519 key and a statement policy for
    the pipeline identity that allows REGISTRY and the local registry."""
    directory = tmp_path_factory.mktemp("sc-cluster")
    (directory / "baseline.json").write_text(json.dumps({"version": 1, "images": {
        f"sha256:{DIGEST_HEX}": {"files": {"/app/server": FILE_HEX},
                                 "environment": {"APP_ENV": "production"},
                                 "forbidden_environment": ["LD_PRELOAD"]}}}))
    (directory / "policy.json").write_text(json.dumps(VERIFICATION_POLICY))
    dev = DevCluster(directory / "cluster")
    try:
        running = RunningCluster(dev, dev.up(log=False, signer_settings={
            "attestation": {"baseline": str(directory / "baseline.json"),
                            "policy": str(directory / "policy.json")},
            "audit": {"directory": str(directory / "audit")},
        }))
        running.create_key(KEY, Algorithm.ECDSA_P256_SHA256)
        running.create_key("sc-ed25519", Algorithm.ED25519)
        with running.client("admin") as admin:
            current, _ = admin.get_policy()
            document = current.to_dict()
            for binding in document["bindings"]:
                if binding["identity"].endswith("/pipeline"):
                    binding["statements"] = {
                        "predicate_types": [SLSA_PROVENANCE_V1],
                        "builder_ids": ["https://ci.example.com/builders/*"],
                        "subject_registries": [REGISTRY, local_registry],
                        "require_resolved_dependencies": True,
                    }
        running.ceremony("policy", policy=AccessPolicy.from_dict(document).to_dict())
        time.sleep(0.5)  # the signer applies the policy from its watch
        yield running
    finally:
        dev.down()


def audit_entries(cluster: RunningCluster, kind: str) -> list[dict[str, Any]]:
    folder = cluster.dev.state_dir.parent / "audit"
    return [record for log in folder.iterdir()
            for record in map(json.loads, (log / "entries.jsonl").read_text().splitlines())
            if record["kind"] == kind]


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


def test_attest_without_a_baseline_is_a_failed_precondition(
    dev_cluster: RunningCluster,
) -> None:
    with dev_cluster.client() as client, pytest.raises(SignetError) as refused:
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


SIGNET = [sys.executable, "-m", "signer.cli.main"]


def signet(cluster: RunningCluster | None, *args: str, cwd: Path | None = None
           ) -> subprocess.CompletedProcess[str]:
    common = [] if cluster is None else ["--cluster", str(cluster.cluster.path)]
    return subprocess.run([*SIGNET, *args, *common], capture_output=True, text=True,
                          check=False, cwd=cwd, timeout=120)


def skopeo_push(tmp_path: Path, registry: str, repository: str, content: bytes) -> str:
    """Push a one-layer image with skopeo from an OCI layout; returns the manifest digest
    as the registry reports it."""
    image = minimal_image({"app/server": content})
    layout = tmp_path / f"layout-{hashlib.sha256(content).hexdigest()[:8]}"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for blob in (image.manifest, image.config, image.layer):
        (layout / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + hashlib.sha256(image.manifest).hexdigest(),
        "size": len(image.manifest),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    destination = f"docker://{registry}/{repository}:v1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
                    destination], check=True, capture_output=True, timeout=60)
    raw = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", destination],
                         check=True, capture_output=True, timeout=60).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def skopeo_raw(reference: str) -> dict[str, Any]:
    done = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                           f"docker://{reference}"], check=True, capture_output=True,
                          timeout=60)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def provenance_for(cluster: RunningCluster, tmp_path: Path, image: str, name: str) -> Path:
    lock = tmp_path / "requirements.txt"
    lock.write_text("flask==3.0.3 --hash=sha256:" + "34" * 32 + "\nrequests==2.32.3\n")
    out = tmp_path / f"{name}.json"
    done = signet(None, "provenance", "create", "--subject", image,
                  "--builder-id", "https://ci.example.com/builders/e2e",
                  "--source-repo", "https://git.example.com/acme/app", "--commit", "c0" * 20,
                  "--ref", "refs/heads/main", "--lock-file", str(lock), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_signatures_and_provenance_attached_to_a_local_registry_verify(
    cluster: RunningCluster, local_registry: str, tmp_path: Path
) -> None:
    digest = skopeo_push(tmp_path, local_registry, "acme/app", b"#!/bin/sh\necho signed\n")
    image = f"{local_registry}/acme/app@{digest}"
    provenance = provenance_for(cluster, tmp_path, image, "provenance")
    statement = json.loads(provenance.read_text())
    dependencies = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {"uri": "pkg:pypi/flask@3.0.3", "name": "flask",
            "digest": {"sha256": "34" * 32}} in dependencies
    assert {"uri": "pkg:pypi/requests@2.32.3", "name": "requests"} in dependencies

    signed = signet(cluster, "sign-image", image, "--key", KEY, "--attach",
                    "--out", str(tmp_path / "signed.json"))
    assert signed.returncode == 0, signed.stderr
    assert f"sha256-{digest.removeprefix('sha256:')}.sig" in signed.stderr
    attested = signet(cluster, "sign-statement", str(provenance), "--key", KEY, "--attach",
                      "--out", str(tmp_path / "envelope.json"))
    assert attested.returncode == 0, attested.stderr

    # What is in the registry has cosign's layout, read back with skopeo, not our client.
    tag = f"{local_registry}/acme/app:{digest.replace(':', '-')}"
    sig_manifest = skopeo_raw(f"{tag}.sig")
    [layer] = sig_manifest["layers"]
    record = json.loads((tmp_path / "signed.json").read_text())
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    assert layer["annotations"]["dev.cosignproject.cosign/signature"] == record["signature"]
    assert layer["digest"] == "sha256:" + hashlib.sha256(
        base64.b64decode(record["payload"])).hexdigest()
    [att_layer] = skopeo_raw(f"{tag}.att")["layers"]
    assert att_layer["mediaType"] == "application/vnd.dsse.envelope.v1+json"
    assert att_layer["annotations"]["predicateType"] == SLSA_PROVENANCE_V1

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(VERIFICATION_POLICY))
    verified = signet(cluster, "verify-image", image, "--policy", str(policy))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for rule in ("image-signature", "image-payload", "signature", "subject-digest",
                 "slsa-builder-id", "slsa-source-repository"):
        assert f"[pass] {rule}" in verified.stdout, verified.stdout

    # --signature/--payload: the same signature from files, and a tampered payload fails.
    (tmp_path / "payload.json").write_bytes(base64.b64decode(record["payload"]))
    (tmp_path / "signature.b64").write_text(record["signature"])
    from_files = signet(cluster, "verify-image", image, "--policy", str(policy),
                        "--signature", str(tmp_path / "signature.b64"),
                        "--payload", str(tmp_path / "payload.json"))
    assert from_files.returncode == 0, from_files.stdout + from_files.stderr
    assert "[pass] image-signature" in from_files.stdout
    (tmp_path / "payload.json").write_bytes(
        base64.b64decode(record["payload"]).replace(b"acme/app", b"acme/evil"))
    tampered = signet(cluster, "verify-image", image, "--policy", str(policy),
                      "--signature", str(tmp_path / "signature.b64"),
                      "--payload", str(tmp_path / "payload.json"))
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    assert "[FAIL] image-signature" in tampered.stdout
    half = signet(cluster, "verify-image", image, "--policy", str(policy),
                  "--signature", str(tmp_path / "signature.b64"))
    assert half.returncode == 3, half.stdout + half.stderr

    unsigned_digest = skopeo_push(tmp_path, local_registry, "acme/app", b"unsigned\n")
    unsigned = signet(cluster, "verify-image", f"{local_registry}/acme/app@{unsigned_digest}",
                      "--policy", str(policy))
    assert unsigned.returncode == 1, unsigned.stdout + unsigned.stderr
    assert "[FAIL] image-signature: rule 'image-signature' failed: no signature" in \
        unsigned.stdout
    assert "[FAIL] provenance" in unsigned.stdout


def test_a_revoked_key_fails_verification_admission_and_attestation(
    cluster: RunningCluster, local_registry: str, tmp_path: Path
) -> None:
    cluster.create_key("sc-doomed", Algorithm.ECDSA_P256_SHA256)
    digest = skopeo_push(tmp_path, local_registry, "acme/doomed", b"doomed build\n")
    image = f"{local_registry}/acme/doomed@{digest}"
    provenance = provenance_for(cluster, tmp_path, image, "doomed")
    for argv in (("sign-image", image), ("sign-statement", str(provenance))):
        done = signet(cluster, *argv, "--key", "sc-doomed", "--attach",
                      "--out", str(tmp_path / f"{argv[0]}.json"))
        assert done.returncode == 0, done.stderr
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(VERIFICATION_POLICY))
    before = signet(cluster, "verify-image", image, "--policy", str(policy))
    assert before.returncode == 0, before.stdout + before.stderr

    cluster.lifecycle("revoke", "sc-doomed", 1)

    revoked = "key sc-doomed version 1 is REVOKED"
    after = signet(cluster, "verify-image", image, "--policy", str(policy))
    assert after.returncode == 1, after.stdout + after.stderr
    assert "[FAIL] image-signature" in after.stdout
    assert revoked in after.stdout
    envelope = tmp_path / "sign-statement.json"
    attestation = signet(cluster, "verify-attestation", str(envelope), "--policy", str(policy),
                         "--image", image)
    assert attestation.returncode == 1, attestation.stdout + attestation.stderr
    assert "[FAIL] signature: rule 'signature' failed" in attestation.stdout
    assert revoked in attestation.stdout

    with cluster.client() as client:
        controller = AdmissionController(
            CosignRegistry(), ClusterKeyResolver(client, [KEY, "sc-doomed"]),
            VerificationPolicy.from_dict(VERIFICATION_POLICY), time.time)
        answer = controller.review(_review(image))["response"]
        assert answer["allowed"] is False
        assert image in answer["status"]["message"]
        assert revoked in answer["status"]["message"]

        denied = SupplyChainClient(client).attest(
            digest, {}, {}, provenance_envelope=envelope.read_bytes())
    assert not denied.allowed
    assert any("provenance rejected" in d and revoked in d for d in denied.discrepancies), \
        denied.discrepancies


def test_runtime_attestation_allows_a_match_and_audits_a_mismatch(
    cluster: RunningCluster,
) -> None:
    request_id = f"e2e-attest-{time.time_ns()}"
    with cluster.client() as client:
        supply = SupplyChainClient(client)
        signed = supply.sign_statement(KEY, statement_json(), request_id=request_id)
        allowed = supply.attest(
            f"sha256:{DIGEST_HEX}", {"/app/server": FILE_HEX},
            {"APP_ENV": "production", "HOME": "/srv"}, signed.envelope_json)
        assert allowed.allowed, allowed.discrepancies
        assert allowed.discrepancies == ()
        denied = supply.attest(
            f"sha256:{DIGEST_HEX}", {"/app/server": "cd" * 32},
            {"APP_ENV": "production", "LD_PRELOAD": "/opt/s3cr3t.so"}, signed.envelope_json)
    assert not denied.allowed
    assert any("/app/server: sha256" in d for d in denied.discrepancies)
    assert any("LD_PRELOAD: forbidden" in d for d in denied.discrepancies)
    # The signer records the statement signature under the caller's request id, and the
    # mismatch as a security event (without the environment value).
    assert request_id in [e["request_id"] for e in audit_entries(cluster, "sign")]
    events = [e for e in audit_entries(cluster, "security")
              if e["discrepancies"] == list(denied.discrepancies)]
    assert len(events) == 1
    assert events[0]["event"] == "runtime_attestation_denied"
    assert events[0]["image_digest"] == f"sha256:{DIGEST_HEX}"
    assert "s3cr3t" not in json.dumps(events)


def test_provenance_create_collects_git_source_and_pip_freeze(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=e2e", "-c", "user.email=e2e@example.com"]
    for argv in (["init", "-q", "-b", "main"],
                 ["remote", "add", "origin", "https://git.example.com/acme/app.git"],
                 ["commit", "-q", "--allow-empty", "-m", "build me"]):
        subprocess.run([*git, *argv], check=True, capture_output=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    out = tmp_path / "provenance.json"
    done = signet(None, "provenance", "create", "--subject", IMAGE, "--builder-id",
                  "https://ci.example.com/builders/e2e", "--pip-freeze",
                  "--base-image", f"{REGISTRY}/base/python@sha256:{'9a' * 32}",
                  "--out", str(out), cwd=repo)
    assert done.returncode == 0, done.stderr
    statement = Statement.from_json(out.read_bytes())
    assert statement.subject_digests() == {f"sha256:{DIGEST_HEX}"}
    predicate = statement.to_dict()["predicate"]
    source = predicate["buildDefinition"]["externalParameters"]["source"]
    assert source == {"repository": "https://git.example.com/acme/app.git", "commit": commit,
                      "ref": "refs/heads/main"}
    resolved = predicate["buildDefinition"]["resolvedDependencies"]
    assert resolved[0] == {"uri": "git+https://git.example.com/acme/app.git@refs/heads/main",
                           "digest": {"gitCommit": commit}}
    assert resolved[1]["annotations"] == {"role": "base-image"}
    uris = {d.get("uri", "") for d in resolved}
    assert any(u.startswith("pkg:pypi/grpcio@") for u in uris), sorted(uris)

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    refused = signet(None, "provenance", "create", "--subject", IMAGE, "--builder-id", "x",
                     "--out", str(tmp_path / "x.json"), cwd=outside)
    assert refused.returncode == 3
    assert "pass --source-repo and --commit" in refused.stderr


def test_verification_against_the_trust_bundle_fails_once_the_version_is_revoked(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    """verify-image, verify-attestation and the admission controller resolve keys through the
    verified trust bundle; a revocation reaches them with the next bundle."""
    cluster.create_key("sc-bundle", Algorithm.ECDSA_P256_SHA256)
    store, envelope = tmp_path / "store", tmp_path / "envelope.json"
    (tmp_path / "statement.json").write_bytes(statement_json())
    for argv in (("sign-image", IMAGE, "--store", str(store)),
                 ("sign-statement", str(tmp_path / "statement.json"), "--store", str(store),
                  "--out", str(envelope))):
        done = signet(cluster, *argv, "--key", "sc-bundle")
        assert done.returncode == 0, done.stderr
    document = dict(VERIFICATION_POLICY, trusted_keys=["sc-bundle"])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(document))
    state = tmp_path / "trust-state"
    bundle_options = ("--keys-from", "bundle", "--trust-state", str(state))

    def verify() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        return (signet(cluster, "verify-image", IMAGE, "--store", str(store), "--policy",
                       str(policy), *bundle_options),
                signet(cluster, "verify-attestation", str(envelope), "--policy", str(policy),
                       "--image", IMAGE, *bundle_options))

    for before in verify():
        assert before.returncode == 0, before.stdout + before.stderr
    assert (state / "trust-state.json").exists()
    # Without --keys-from, a cluster.json with a tuf_root means the bundle.
    default = signet(cluster, "verify-image", IMAGE, "--store", str(store), "--policy",
                     str(policy), "--trust-state", str(state))
    assert default.returncode == 0, default.stdout + default.stderr

    root = cluster.dev.state_dir / str(cluster.cluster.extra["tuf_root"])
    transport = GrpcTrustTransport.from_cluster(cluster.cluster, "local")
    try:
        resolver = BundleKeyResolver(TrustClient(root, tmp_path / "webhook", "local", transport),
                                     refresh_seconds=0.2)
        controller = AdmissionController(SignatureStore(store), resolver,
                                         VerificationPolicy.from_dict(document), time.time)
        assert controller.review(_review(IMAGE))["response"]["allowed"] is True

        cluster.lifecycle("revoke", "sc-bundle", 1)
        revoked_at = time.monotonic()
        while True:
            fetched = signet(cluster, "bundle", "fetch", "--state-dir", str(state), "-o", "json")
            assert fetched.returncode == 0, fetched.stderr
            if any(v["key"] == "sc-bundle" and v["revoked"]
                   for v in json.loads(fetched.stdout)["versions"]):
                break
            assert time.monotonic() - revoked_at < 10, "the revocation never reached the bundle"

        revoked = "key sc-bundle version 1 is REVOKED in the trust bundle"
        image_check, attestation_check = verify()
        assert image_check.returncode == 1, image_check.stdout + image_check.stderr
        assert "[FAIL] image-signature" in image_check.stdout
        assert revoked in image_check.stdout
        assert attestation_check.returncode == 1, attestation_check.stdout
        assert "[FAIL] signature: rule 'signature' failed" in attestation_check.stdout
        assert revoked in attestation_check.stdout

        time.sleep(0.3)  # past the webhook resolver's refresh interval
        answer = controller.review(_review(IMAGE))["response"]
        assert answer["allowed"] is False
        assert revoked in answer["status"]["message"]
    finally:
        transport.close()
