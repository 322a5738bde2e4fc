"""The key model: names, digests, algorithms and which version may sign."""

from dataclasses import replace

import pytest

from kms.domain.keys import (
    Algorithm,
    Digest,
    DigestAlgorithm,
    Key,
    Replication,
    VersionState,
    key_id_for,
)
from kms.errors import FailedPrecondition, InvalidArgument, NotFound

SHA256 = Digest(DigestAlgorithm.SHA256, bytes(32))


def make_key(algorithm: Algorithm = Algorithm.ECDSA_P256_SHA256) -> Key:
    return Key.new(
        name="release", algorithm=algorithm, replication=Replication.REGIONAL,
        public_key_der=b"spki", hsm_id=b"\x01" * 16, now=1000.0,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ecdsa-p256", Algorithm.ECDSA_P256_SHA256),
        ("ecdsa-p256-sha256", Algorithm.ECDSA_P256_SHA256),
        ("ED25519", Algorithm.ED25519),
        ("rsa-pss-3072", Algorithm.RSA_PSS_3072_SHA256),
    ],
)
def test_algorithm_names_parse(text: str, expected: Algorithm) -> None:
    assert Algorithm.parse(text) is expected


def test_unknown_algorithm_lists_the_choices() -> None:
    with pytest.raises(InvalidArgument, match="ecdsa-p256, ed25519, rsa-pss-3072"):
        Algorithm.parse("dsa")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "must look like sha256:<hex>"),
        ("md5:" + "00" * 16, "unknown digest algorithm"),
        ("sha256:zz", "not hexadecimal"),
        ("sha256:" + "00" * 31, "32 bytes, got 31"),
        ("sha512:" + "00" * 32, "64 bytes, got 32"),
    ],
)
def test_bad_digests_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Digest.parse(text)


def test_digest_round_trips_through_text() -> None:
    text = "sha384:" + "ab" * 48
    assert str(Digest.parse(text)) == text


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 129])
def test_bad_key_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        replace(make_key(), name=name)


def test_new_key_has_an_active_primary_version_one() -> None:
    key = make_key()
    assert key.primary_version == 1
    assert key.primary.state is VersionState.ACTIVE
    assert key.primary.key_id == key_id_for(b"spki")


def test_ed25519_cannot_be_multi_region() -> None:
    with pytest.raises(InvalidArgument, match="regional"):
        Key.new(name="k", algorithm=Algorithm.ED25519, replication=Replication.MULTI_REGION,
                public_key_der=b"p", hsm_id=b"h", now=0.0)


def test_primary_signs_by_default_and_explicit_version_must_exist() -> None:
    key = make_key()
    assert key.signing_version(None, SHA256).number == 1
    assert key.signing_version(1, SHA256).number == 1
    with pytest.raises(NotFound, match="no version 2"):
        key.signing_version(2, SHA256)


@pytest.mark.parametrize(
    "state",
    [s for s in VersionState if s is not VersionState.ACTIVE],
)
def test_only_active_versions_sign(state: VersionState) -> None:
    key = make_key()
    stopped = key.with_versions((replace(key.primary, state=state),))
    with pytest.raises(FailedPrecondition, match=state.value):
        stopped.signing_version(None, SHA256)


def test_versions_below_min_sign_version_are_refused() -> None:
    key = make_key()
    second = replace(key.primary, number=2)
    key = key.with_versions((key.primary, second), primary_version=2, min_sign_version=2)
    with pytest.raises(FailedPrecondition, match="minimum signing version 2"):
        key.signing_version(1, SHA256)


def test_ecdsa_and_rsa_sign_only_sha256_but_ed25519_signs_any_digest() -> None:
    sha512 = Digest(DigestAlgorithm.SHA512, bytes(64))
    with pytest.raises(InvalidArgument, match="signs sha256 digests"):
        make_key(Algorithm.ECDSA_P256_SHA256).signing_version(None, sha512)
    with pytest.raises(InvalidArgument):
        make_key(Algorithm.RSA_PSS_3072_SHA256).signing_version(None, sha512)
    assert make_key(Algorithm.ED25519).signing_version(None, sha512).number == 1


def test_key_record_round_trips() -> None:
    key = make_key()
    assert Key.from_dict(key.to_dict()) == key


def test_unknown_record_schema_is_refused() -> None:
    record = make_key().to_dict() | {"schema": 99}
    with pytest.raises(ValueError, match="schema"):
        Key.from_dict(record)
