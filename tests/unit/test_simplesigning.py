"""Image references and cosign simple-signing payloads."""

from __future__ import annotations

import json

import pytest

from kms.errors import InvalidArgument
from signer.payloads import VerificationError
from signer.payloads.simplesigning import (
    COSIGN_SIGNATURE_TYPE,
    ImageReference,
    SimpleSigningPayload,
)

HEX = "0f" * 32
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        (f"registry.example.com/team/app@{DIGEST}", "registry.example.com", "team/app", None,
         DIGEST),
        (f"localhost:5000/app:1.2@{DIGEST}", "localhost:5000", "app", "1.2", DIGEST),
        ("127.0.0.1:5000/a/b/c:latest", "127.0.0.1:5000", "a/b/c", "latest", None),
        ("localhost/app", "localhost", "app", None, None),
        (f"busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST),
        ("org/app:v1", "docker.io", "org/app", "v1", None),
    ],
)
def test_references_parse(text: str, registry: str, repository: str, tag: str | None,
                          digest: str | None) -> None:
    parsed = ImageReference.parse(text)
    assert (parsed.registry, parsed.repository, parsed.tag, parsed.digest) == (
        registry, repository, tag, digest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("Registry.example.com/App", "lowercase"),
        ("registry.example.com/app@sha256:abc", "64 lowercase hex"),
        ("registry.example.com/app@md5:" + "0" * 32, "sha256"),
        ("registry.example.com/app:bad tag", "spaces|bad tag"),
        ("registry.example.com/", "repository"),
    ],
)
def test_bad_references_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ImageReference.parse(text)


def test_a_tag_without_digest_is_refused_where_a_digest_is_required() -> None:
    with pytest.raises(InvalidArgument, match="not pinned by digest"):
        ImageReference.parse("registry.example.com/app:latest", require_digest=True)
    with pytest.raises(InvalidArgument, match="not pinned by digest"):
        SimpleSigningPayload.for_image(ImageReference.parse("registry.example.com/app:1"))


def test_payload_has_cosign_shape_and_round_trips() -> None:
    image = ImageReference.parse(f"localhost:5000/app:1@{DIGEST}")
    payload = SimpleSigningPayload.for_image(image, {"build": "42"})
    document = json.loads(payload.to_json())
    assert document == {
        "critical": {
            "identity": {"docker-reference": "localhost:5000/app"},
            "image": {"docker-manifest-digest": DIGEST},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        "optional": {"build": "42"},
    }
    assert SimpleSigningPayload.from_json(payload.to_json()) == payload
    assert json.loads(SimpleSigningPayload.for_image(image).to_json())["optional"] is None
    payload.check_matches(image)


def test_payload_for_another_image_or_digest_does_not_match() -> None:
    payload = SimpleSigningPayload.for_image(ImageReference.parse(f"localhost:5000/app@{DIGEST}"))
    with pytest.raises(VerificationError, match="for digest"):
        payload.check_matches(ImageReference.parse(f"localhost:5000/app@sha256:{'1f' * 32}"))
    with pytest.raises(VerificationError, match="for repository"):
        payload.check_matches(ImageReference.parse(f"localhost:5000/other@{DIGEST}"))


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({}, "'critical'"),
        ({"critical": {"type": "other"}}, "critical.type"),
        ({"critical": {"type": COSIGN_SIGNATURE_TYPE, "image": {}}}, "docker-reference"),
        ({"critical": {"type": COSIGN_SIGNATURE_TYPE, "identity": {"docker-reference": "a"}}},
         "docker-manifest-digest"),
    ],
)
def test_malformed_payloads_name_the_field(document: object, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        SimpleSigningPayload.from_json(json.dumps(document))
