"""The admission controller's decisions on AdmissionReviews, with software keys and an
in-memory signature source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.domain.provenance import VerificationPolicy
from signer.admission import AdmissionController, DecisionLog, MalformedReview
from signer.payloads.dsse import INTOTO_PAYLOAD_TYPE, Envelope, EnvelopeSignature, pae
from signer.payloads.intoto import Statement
from signer.payloads.simplesigning import ImageReference, SimpleSigningPayload
from signer.signature_store import StoredSignature
from signer.verification import ResolvedKey, StaticKeyResolver
from tests.unit.test_provenance_policy import FINISHED, slsa_statement

POLICY = VerificationPolicy.from_dict({
    "version": 1, "trusted_keys": ["release"],
    "builder_ids": ["https://ci.example.com/builders/*"],
    "source_repositories": ["https://git.example.com/acme/*"],
    "max_age_seconds": 86400,
})


class SoftwareKey:
    def __init__(self, name: str, state: str = "ACTIVE") -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.resolved = ResolvedKey(hashlib.sha256(der).hexdigest(), name, 1, state, pem)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message, ec.ECDSA(hashes.SHA256()))


class MemorySource:
    def __init__(self) -> None:
        self.signatures: dict[str, StoredSignature] = {}
        self.envelopes: dict[str, list[bytes]] = {}

    def signatures_for(self, image: ImageReference) -> list[StoredSignature]:
        stored = self.signatures.get(image.digest_hex)
        return [] if stored is None else [stored]

    def attestations_for(self, image: ImageReference) -> list[bytes]:
        return self.envelopes.get(image.digest_hex, [])

    def publish(self, image: str, key: SoftwareKey,
                statement: dict[str, Any] | None = None) -> None:
        reference = ImageReference.parse(image, require_digest=True)
        payload = SimpleSigningPayload.for_image(reference).to_json()
        self.signatures[reference.digest_hex] = StoredSignature(
            image, payload, key.sign(payload), key.resolved.key_name, 1, key.resolved.key_id)
        body = Statement.from_dict(
            statement or slsa_statement(reference.digest_hex, reference.name)).to_json()
        signature = EnvelopeSignature(key.resolved.key_id,
                                      key.sign(pae(INTOTO_PAYLOAD_TYPE, body)))
        envelope = Envelope(body, INTOTO_PAYLOAD_TYPE, (signature,))
        self.envelopes.setdefault(reference.digest_hex, []).append(envelope.to_json())


def image(n: int, repo: str = "app") -> str:
    return f"registry.example.com/{repo}@sha256:{bytes([n]).hex() * 32}"


def review(*images: str, init: tuple[str, ...] = ()) -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "object": {"kind": "Pod", "spec": {
                "containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)],
                "initContainers": [{"name": f"i{i}", "image": im} for i, im in enumerate(init)],
            }},
        },
    }).encode()


@pytest.fixture
def setup() -> tuple[MemorySource, SoftwareKey, SoftwareKey, AdmissionController]:
    source = MemorySource()
    release, revoked = SoftwareKey("release"), SoftwareKey("release", state="REVOKED")
    resolver = StaticKeyResolver([release.resolved, revoked.resolved])
    controller = AdmissionController(source, resolver, POLICY,
                                     clock=lambda: FINISHED.timestamp() + 60)
    return source, release, revoked, controller


def answer(controller: AdmissionController, body: bytes) -> dict[str, Any]:
    response = controller.review(body)["response"]
    assert response["uid"] == "u-1"
    return response  # type: ignore[no-any-return]


def test_a_pod_whose_images_are_signed_with_good_provenance_is_allowed(setup: Any) -> None:
    source, release, _, controller = setup
    source.publish(image(1), release)
    source.publish(image(2, "init"), release)
    response = answer(controller, review(image(1), init=(image(2, "init"),)))
    assert response["allowed"] is True


def test_an_unsigned_image_is_denied_by_name(setup: Any) -> None:
    source, release, _, controller = setup
    source.publish(image(1), release)
    response = answer(controller, review(image(1), image(3)))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert image(3) in message
    assert "rule 'image-signature' failed" in message
    assert image(1) not in message


def test_a_tag_without_digest_is_denied(setup: Any) -> None:
    _, _, _, controller = setup
    response = answer(controller, review("registry.example.com/app:latest"))
    assert response["allowed"] is False
    assert "rule 'image-pinned-by-digest' failed" in response["status"]["message"]
    assert "registry.example.com/app:latest" in response["status"]["message"]


def test_an_image_signed_by_a_revoked_key_is_denied(setup: Any) -> None:
    source, _, revoked, controller = setup
    source.publish(image(4), revoked)
    response = answer(controller, review(image(4)))
    assert response["allowed"] is False
    assert "rule 'image-signature' failed" in response["status"]["message"]
    assert "REVOKED" in response["status"]["message"]


def test_provenance_violating_the_policy_is_denied_naming_the_rule(setup: Any) -> None:
    source, release, _, controller = setup
    reference = ImageReference.parse(image(5))
    statement = slsa_statement(reference.digest_hex, reference.name)
    statement["predicate"]["runDetails"]["builder"]["id"] = "https://laptop.example.com/"
    source.publish(image(5), release, statement)
    response = answer(controller, review(image(5)))
    assert response["allowed"] is False
    assert "rule 'slsa-builder-id' failed" in response["status"]["message"]


def test_provenance_for_another_image_does_not_count(setup: Any) -> None:
    source, release, _, controller = setup
    source.publish(image(6), release, slsa_statement("ff" * 32))
    response = answer(controller, review(image(6)))
    assert response["allowed"] is False
    assert "rule 'subject-digest' failed" in response["status"]["message"]


def test_an_untrusted_key_is_denied(setup: Any) -> None:
    source, _, _, controller = setup
    stranger = SoftwareKey("someone-else")
    controller._resolver = StaticKeyResolver([stranger.resolved])
    source.publish(image(7), stranger)
    response = answer(controller, review(image(7)))
    assert response["allowed"] is False
    assert "not trusted by the policy" in response["status"]["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not an AdmissionReview"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                     "request": {"uid": "u"}}).encode(), "apiVersion"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
         "no request"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"uid": "u", "kind": {"kind": "Pod"}, "object": {}}}).encode(),
         "not a Pod"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"uid": "u", "kind": {"kind": "Pod"},
                                 "object": {"spec": {"containers": [{"name": "x"}]}}}}).encode(),
         r"spec.containers\[0\].image"),
    ],
)
def test_malformed_reviews_are_refused(setup: Any, body: bytes, message: str) -> None:
    _, _, _, controller = setup
    with pytest.raises(MalformedReview, match=message):
        controller.review(body)


def test_decisions_are_appended_to_the_decision_log(setup: Any, tmp_path: Path) -> None:
    source, release, revoked, _ = setup
    log_path = tmp_path / "decisions.jsonl"
    controller = AdmissionController(
        source, StaticKeyResolver([release.resolved, revoked.resolved]), POLICY,
        clock=lambda: FINISHED.timestamp() + 60, decisions=DecisionLog(log_path))
    source.publish(image(1), release)
    answer(controller, review(image(1)))
    answer(controller, review(image(3)))
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(d["uid"], d["allowed"], d["images"]) for d in lines] == [
        ("u-1", True, [image(1)]), ("u-1", False, [image(3)])]
    assert "rule 'image-signature' failed" in lines[1]["message"]
