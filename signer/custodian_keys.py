"""Custodian keys in a custodian's own PKCS#11 token, named by an RFC 7512 URI.

``pkcs11:token=<label>;object=<label>?module-path=<path>&pin-source=file:<path>`` (``id=``
with percent-encoded bytes may replace or narrow ``object=``). Only what a custodian needs is
parsed: path attributes ``token``, ``object``, ``id``; query attributes ``module-path`` (default:
``$SIGNET_PKCS11_MODULE`` or the installed SoftHSM) and ``pin-source`` (``file:`` only).
``pin-value`` is refused: PINs never appear on command lines or in shell history.

Only ECDSA P-256 token keys are accepted. ``Pkcs11Hsm`` signs *digests*; for ECDSA, a DER
signature over SHA-256(message) made from the digest is exactly the securesystemslib
``ecdsa-sha2-nistp256`` signature the server verifies over the DSSE PAE (and over a TUF root's
canonical bytes). The adapter's Ed25519 would sign the digest bytes as the message, which no
Ed25519 verifier accepts for the PAE, so Ed25519 token keys are refused with that reason
(Ed25519 custodian keys work as PEM files). The server never sees the token or its PIN; the
approval envelope has the same format as with a key file (docs/adr/0009).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass
from securesystemslib.signer import SSlibKey

from kms.domain.keys import Algorithm
from kms.errors import InvalidArgument
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
from kms.tuf.repository import tuf_key

SCHEME = "pkcs11:"
_PATH_ATTRIBUTES = {"token", "object", "id", "type", "manufacturer", "model", "serial",
                    "library-description", "library-manufacturer", "library-version",
                    "slot-description", "slot-id", "slot-manufacturer"}


def is_pkcs11_uri(text: str) -> bool:
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class Pkcs11KeyUri:
    """The parts of an RFC 7512 URI that locate a custodian's private key."""

    token: str
    object_label: str | None
    object_id: bytes | None
    module_path: str | None
    pin_file: Path

    @classmethod
    def parse(cls, uri: str) -> Pkcs11KeyUri:
        """Raises ``InvalidArgument`` naming what is missing or refused (never a PIN)."""
        if not is_pkcs11_uri(uri):
            raise InvalidArgument("a PKCS#11 key URI starts with 'pkcs11:'")
        path_part, _, query_part = uri[len(SCHEME):].partition("?")
        path: dict[str, str] = {}
        for item in filter(None, path_part.split(";")):
            name, sep, value = item.partition("=")
            if not sep or name in path:
                raise InvalidArgument(f"PKCS#11 URI path attribute {name!r} is malformed or "
                                      "repeated")
            if name == "pin-value" or name not in _PATH_ATTRIBUTES:
                raise InvalidArgument(f"PKCS#11 URI path attribute {name!r} is not supported "
                                      "(token, object and id locate a custodian key)")
            path[name] = value
        query: dict[str, str] = {}
        for item in filter(None, query_part.split("&")):
            name, sep, value = item.partition("=")
            if name == "pin-value":
                raise InvalidArgument(
                    "pin-value is refused: a PIN never goes on a command line; put it in a "
                    "file readable only by you and use pin-source=file:/path/to/pin")
            if not sep or name in query or name not in {"module-path", "pin-source"}:
                raise InvalidArgument(f"PKCS#11 URI query attribute {name!r} is malformed, "
                                      "repeated or not supported (module-path, pin-source)")
            query[name] = value
        if "type" in path and unquote(path["type"]) != "private":
            raise InvalidArgument("a custodian key URI names the private key (type=private)")
        token = unquote(path.get("token", ""))
        if not token:
            raise InvalidArgument("the PKCS#11 URI needs token=<token label>")
        object_label = unquote(path["object"]) if "object" in path else None
        object_id = unquote_to_bytes(path["id"]) if "id" in path else None
        if not object_label and not object_id:
            raise InvalidArgument("the PKCS#11 URI needs object=<key label> or id=<key id>")
        pin_source = unquote(query.get("pin-source", ""))
        if not pin_source:
            raise InvalidArgument("the PKCS#11 URI needs pin-source=file:/path/to/pin (the "
                                  "token's user PIN, in a file only you can read)")
        pin_path = pin_source.removeprefix("file:")
        if pin_path.startswith("//"):  # file:///abs/path
            pin_path = pin_path[2:]
        module = unquote(query["module-path"]) if "module-path" in query else None
        return cls(token, object_label, object_id, module, Path(pin_path))

    def describe(self) -> str:
        """The URI without anything secret, for messages."""
        what = f"object={self.object_label}" if self.object_label else \
            f"id={(self.object_id or b'').hex()}"
        return f"pkcs11:token={self.token};{what}"


async def _find_key_id(hsm: Pkcs11Hsm, uri: Pkcs11KeyUri) -> list[bytes]:
    def find(session: Any) -> list[bytes]:
        attributes: dict[Attribute, object] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if uri.object_label:
            attributes[Attribute.LABEL] = uri.object_label
        if uri.object_id:
            attributes[Attribute.ID] = uri.object_id
        return [bytes(o[Attribute.ID]) for o in session.get_objects(attributes)]

    return await hsm.run_with_session(find)


async def _sign_async(uri: Pkcs11KeyUri, messages: Sequence[bytes]
                      ) -> tuple[SSlibKey, list[bytes]]:
    from signer.dev.softhsm import find_softhsm_module

    module = uri.module_path or find_softhsm_module()
    pin = load_pin(str(uri.pin_file), None)
    hsm = await Pkcs11Hsm.open(module, uri.token, pin)
    try:
        found = await _find_key_id(hsm, uri)
        if len(found) != 1:
            raise InvalidArgument(f"{uri.describe()} matches {len(found)} private keys in the "
                                  "token; name exactly one (object= and/or id=)")
        hsm_id = found[0]
        der = await hsm.public_key(hsm_id)
        public = serialization.load_der_public_key(der)
        if not (isinstance(public, ec.EllipticCurvePublicKey)
                and isinstance(public.curve, ec.SECP256R1)):
            raise InvalidArgument(
                f"{uri.describe()} is not an ECDSA P-256 key: PKCS#11 custodian keys must be "
                "P-256, because the HSM adapter signs digests and an Ed25519 signature over a "
                "digest does not verify over the approval itself; use an ECDSA P-256 token "
                "key, or an Ed25519 key file")
        signatures = [await hsm.sign_digest(hsm_id, Algorithm.ECDSA_P256_SHA256,
                                            hashlib.sha256(m).digest()) for m in messages]
        return tuf_key(der), signatures
    finally:
        await hsm.close()


def pkcs11_sign(uri: str, messages: Sequence[bytes]) -> tuple[SSlibKey, list[bytes]]:
    """The custodian's public key and a DER ECDSA P-256 signature over SHA-256 of each
    message, made in the token ``uri`` names (no event loop may be running). Raises
    ``InvalidArgument`` (URI, key type) or ``HsmError`` (module, token, PIN, key)."""
    return asyncio.run(_sign_async(Pkcs11KeyUri.parse(uri), messages))


def pkcs11_public_key(uri: str) -> tuple[str, SSlibKey]:
    """The PEM public key (for the custodian set) and the TUF key of the token key ``uri``.
    Raises like :func:`pkcs11_sign`."""
    key, _ = pkcs11_sign(uri, ())
    return str(key.keyval["public"]), key
