"""DSSE: the PAE known answers from the spec, envelope round trips, verification raises."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms.errors import InvalidArgument
from signer.payloads import VerificationError
from signer.payloads.dsse import Envelope, EnvelopeSignature, pae, verify_envelope


@pytest.mark.parametrize(
    ("payload_type", "body", "expected"),
    [
        # The example from the DSSE protocol specification.
        ("http://example.com/HelloWorld", b"hello world",
         b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"),
        ("", b"", b"DSSEv1 0  0 "),
        # Lengths count bytes, not characters.
        ("t", "é".encode(), b"DSSEv1 1 t 2 \xc3\xa9"),
    ],
)
def test_pae_known_answers(payload_type: str, body: bytes, expected: bytes) -> None:
    assert pae(payload_type, body) == expected


def test_envelope_round_trips_and_accepts_url_safe_base64() -> None:
    envelope = Envelope(b"\xfb\xff payload", "application/x", (EnvelopeSignature("k1", b"\xfa"),))
    assert Envelope.from_json(envelope.to_json()) == envelope
    wire = envelope.to_dict()
    wire["payload"] = base64.urlsafe_b64encode(envelope.payload).decode()
    assert Envelope.from_dict(wire).payload == envelope.payload


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"payloadType": "x", "signatures": [{"sig": "AA=="}]}, "payload"),
        ({"payload": "AA==", "signatures": [{"sig": "AA=="}]}, "payloadType"),
        ({"payload": "AA==", "payloadType": "x", "signatures": []}, "signatures"),
        ({"payload": "!!", "payloadType": "x", "signatures": [{"sig": "AA=="}]}, "payload"),
        ({"payload": "AA==", "payloadType": "x", "signatures": [{"sig": 3}]}, "signatures[0].sig"),
    ],
)
def test_malformed_envelopes_name_the_field(document: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        Envelope.from_json(json.dumps(document))


def test_verification_covers_the_pae_and_raises_on_tampering() -> None:
    private = ec.generate_private_key(ec.SECP256R1())

    def verifier(keyid: str, message: bytes, sig: bytes) -> str:
        try:
            private.public_key().verify(sig, message, ec.ECDSA(hashes.SHA256()))
        except Exception as error:
            raise VerificationError("bad signature") from error
        return keyid

    payload, payload_type = b'{"a":1}', "application/vnd.in-toto+json"
    sig = private.sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
    good = Envelope(payload, payload_type, (EnvelopeSignature("k", sig),))
    assert verify_envelope(good, verifier) == ["k"]
    for tampered in (
        Envelope(b'{"a":2}', payload_type, good.signatures),
        Envelope(payload, "application/json", good.signatures),  # same bytes, other type
    ):
        with pytest.raises(VerificationError, match="keyid k: bad signature"):
            verify_envelope(tampered, verifier)
