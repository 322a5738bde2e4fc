"""DSSE (Dead Simple Signing Envelope) v1: the pre-authentication encoding and the envelope.

Spec: https://github.com/secure-systems-lab/dsse/blob/master/protocol.md. The signature covers
``PAE(payloadType, payload)``, never the payload alone, so a payload cannot be reinterpreted
under another type.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kms.errors import InvalidArgument
from signer.payloads import VerificationError

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding:
    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with lengths as ASCII decimals of
    the byte lengths."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


@dataclass(frozen=True)
class EnvelopeSignature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope. ``payload`` is the raw bytes (base64 only on the wire)."""

    payload: bytes
    payload_type: str
    signatures: tuple[EnvelopeSignature, ...]

    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def to_dict(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()}
                for s in self.signatures
            ],
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Any) -> Envelope:
        """Raises ``InvalidArgument`` naming the malformed field."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("a DSSE envelope must be a JSON object")
        payload_type = data.get("payloadType")
        if not isinstance(payload_type, str) or not payload_type:
            raise InvalidArgument("DSSE envelope field 'payloadType' must be a non-empty string")
        payload = _b64(data.get("payload"), "payload")
        raw_signatures = data.get("signatures")
        if not isinstance(raw_signatures, list) or not raw_signatures:
            raise InvalidArgument("DSSE envelope field 'signatures' must be a non-empty list")
        signatures = []
        for index, raw in enumerate(raw_signatures):
            where = f"signatures[{index}]"
            if not isinstance(raw, Mapping):
                raise InvalidArgument(f"DSSE envelope field '{where}' must be an object")
            keyid = raw.get("keyid", "")
            if not isinstance(keyid, str):
                raise InvalidArgument(f"DSSE envelope field '{where}.keyid' must be a string")
            signatures.append(EnvelopeSignature(keyid, _b64(raw.get("sig"), f"{where}.sig")))
        return cls(payload, payload_type, tuple(signatures))

    @classmethod
    def from_json(cls, text: bytes | str) -> Envelope:
        """Raises ``InvalidArgument`` for invalid JSON or a malformed envelope."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"the DSSE envelope is not valid JSON: {error}") from None
        return cls.from_dict(data)


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"DSSE envelope field '{field}' must be a base64 string")
    try:
        # DSSE allows standard or URL-safe base64; normalise to standard first.
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"DSSE envelope field '{field}' is not valid base64") from None


Verifier = Callable[[str, bytes, bytes], Any]
"""``verifier(keyid, message, signature)``: returns anything on success (e.g. the resolved key)
and raises ``VerificationError`` when the signature is not valid or the key is not trusted."""


def verify_envelope(envelope: Envelope, verifier: Verifier) -> list[Any]:
    """Verify every signature over the PAE; return what ``verifier`` returned for the valid
    ones. Raises ``VerificationError`` listing each failure when none verifies."""
    message = envelope.pae()
    accepted: list[Any] = []
    failures: list[str] = []
    for signature in envelope.signatures:
        try:
            accepted.append(verifier(signature.keyid, message, signature.sig))
        except VerificationError as error:
            failures.append(f"keyid {signature.keyid or '(none)'}: {error.diagnostics()}")
    if not accepted:
        raise VerificationError(
            "no signature on the DSSE envelope verifies with a trusted key: " + "; ".join(failures)
        )
    return accepted
