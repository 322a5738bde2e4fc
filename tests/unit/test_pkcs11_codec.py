"""Pure helpers of the PKCS#11 adapter: signature and point encodings, PIN loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from kms.domain.keys import Algorithm
from kms.errors import HsmError, InvalidArgument
from kms.hsm.pkcs11 import (
    EC_PARAMS_ED25519,
    EC_PARAMS_P256,
    check_digest,
    ec_point_bytes,
    ecdsa_raw_to_der,
    load_pin,
    spki_from_ed25519_point,
    spki_from_p256_point,
    spki_from_rsa,
    unwrap_der_octet_string,
)


def test_raw_ecdsa_signature_becomes_der_that_verifies() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(b"image").digest()
    r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")

    der = ecdsa_raw_to_der(raw)

    assert decode_dss_signature(der) == (r, s)
    key.public_key().verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_raw_ecdsa_with_leading_zero_bytes_keeps_its_integers() -> None:
    raw = bytes(31) + b"\x01" + bytes(31) + b"\x02"
    assert decode_dss_signature(ecdsa_raw_to_der(raw)) == (1, 2)


@pytest.mark.parametrize("raw", [
    bytes(64), b"\x80" * 64, bytes(31) + b"\x80" + bytes(31) + b"\x7f",
    b"\x7f" + bytes(31) + b"\xff" * 32, bytes(range(64)), bytes(range(255, 191, -1)),
    b"\xff" * 120,  # halves padded to 61 bytes: a 126-byte body, short-form length
    b"\xff" * 122,  # halves padded to 62 bytes: a 128-byte body, long-form length
    b"\x01" * 128,
], ids=["zeros", "high-bits", "padded-high", "mixed", "ascending", "descending",
        "short-form-limit", "long-form", "long"])
def test_raw_ecdsa_to_der_matches_the_general_encoder(raw: bytes) -> None:
    half = len(raw) // 2
    assert ecdsa_raw_to_der(raw) == encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


@pytest.mark.parametrize("raw", [b"", b"\x01" * 63])
def test_malformed_raw_ecdsa_is_an_hsm_error(raw: bytes) -> None:
    with pytest.raises(HsmError):
        ecdsa_raw_to_der(raw)


def test_octet_string_short_and_long_forms() -> None:
    assert unwrap_der_octet_string(b"\x04\x02ab") == b"ab"
    long_content = bytes(range(200))
    assert unwrap_der_octet_string(b"\x04\x81\xc8" + long_content) == long_content


@pytest.mark.parametrize(
    "data", [b"", b"\x04", b"\x03\x01a", b"\x04\x03ab", b"\x04\x01ab", b"\x04\x80", b"\x04\x81"]
)
def test_malformed_octet_strings_are_rejected(data: bytes) -> None:
    with pytest.raises(ValueError, match="DER"):
        unwrap_der_octet_string(data)


def test_ed25519_point_is_unwrapped_from_der() -> None:
    point = bytes(range(32))
    assert ec_point_bytes(b"\x04\x20" + point, 32) == point
    assert ec_point_bytes(point, 32) == point  # modules that return it bare


def test_p256_point_wrapped_or_bare() -> None:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    assert ec_point_bytes(b"\x04\x41" + point, 65) == point
    assert ec_point_bytes(point, 65) == point


@pytest.mark.parametrize("value", [b"\x04\x1f" + bytes(31), bytes(33), b"\x05\x20" + bytes(32)])
def test_ed25519_point_of_wrong_form_is_an_hsm_error(value: bytes) -> None:
    with pytest.raises(HsmError, match="EC point"):
        ec_point_bytes(value, 32)


def test_spki_builders_round_trip_through_cryptography() -> None:
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key()
    ed_public = ed25519.Ed25519PrivateKey.generate().public_key()
    rsa_public = rsa.generate_private_key(65537, 2048).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER

    ec_point = ec_public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert spki_from_p256_point(ec_point) == ec_public.public_bytes(der, spki)
    assert spki_from_ed25519_point(ed_public.public_bytes_raw()) == ed_public.public_bytes(
        der, spki
    )
    numbers = rsa_public.public_numbers()
    rebuilt = spki_from_rsa(numbers.n.to_bytes(256, "big"), numbers.e.to_bytes(3, "big"))
    assert rebuilt == rsa_public.public_bytes(der, spki)


def test_curve_parameters_are_the_named_curve_oids() -> None:
    # DER OBJECT IDENTIFIER 1.2.840.10045.3.1.7 and 1.3.101.112
    assert EC_PARAMS_P256 == b"\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"
    assert EC_PARAMS_ED25519 == b"\x06\x03\x2b\x65\x70"


@pytest.mark.parametrize(
    ("algorithm", "size", "accepted"),
    [
        (Algorithm.ECDSA_P256_SHA256, 32, True),
        (Algorithm.ECDSA_P256_SHA256, 48, False),
        (Algorithm.RSA_PSS_3072_SHA256, 32, True),
        (Algorithm.RSA_PSS_3072_SHA256, 20, False),
        (Algorithm.ED25519, 32, True),
        (Algorithm.ED25519, 64, True),
        (Algorithm.ED25519, 31, False),
    ],
)
def test_digest_sizes(algorithm: Algorithm, size: int, accepted: bool) -> None:
    if accepted:
        check_digest(algorithm, bytes(size))
    else:
        with pytest.raises(InvalidArgument, match=f"got {size} bytes"):
            check_digest(algorithm, bytes(size))


def test_pin_from_file_loses_only_the_trailing_newline(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(" 12 34\r\n", encoding="utf-8")
    assert load_pin(str(pin_file), None) == " 12 34"


def test_pin_file_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("from-file\n", encoding="utf-8")
    monkeypatch.setenv("SIGNET_TEST_PIN", "from-env")
    assert load_pin(str(pin_file), "SIGNET_TEST_PIN") == "from-file"


def test_pin_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNET_TEST_PIN", "s3cret-pin")
    assert load_pin(None, "SIGNET_TEST_PIN") == "s3cret-pin"


def test_missing_pin_sources_are_invalid_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIGNET_TEST_PIN", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="no HSM PIN given"):
        load_pin(None, None)
    with pytest.raises(InvalidArgument, match="SIGNET_TEST_PIN"):
        load_pin(None, "SIGNET_TEST_PIN")
    with pytest.raises(InvalidArgument, match="is empty"):
        load_pin(str(empty), None)
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_pin(str(tmp_path / "absent"), None)
