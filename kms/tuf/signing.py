"""Signing TUF metadata: online roles with a key in the HSM, root with custodian key files.

``HsmMetadataSigner`` plays securesystemslib's ``Signer`` role for the online key, but
``Signer.sign`` is synchronous and the HSM port is async (it runs on the signer's event loop),
so it offers ``async sign(payload) -> Signature`` instead, and ``sign_metadata`` attaches the
signature. Key type and scheme are ``ecdsa`` / ``ecdsa-sha2-nistp256`` with a PEM public key;
the signature is the DER ECDSA signature in hex, which python-tuf verifies as is.

Custodian keys are PEM private key files held by custodians (``generate_custodian_key``
writes one for development); ``init_root`` and ``rotate_root`` sign root metadata with them
offline. The signer process never reads them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from kms.domain.keys import Algorithm
from kms.errors import InvalidArgument
from kms.ports import Hsm
from kms.tuf.repository import OnlineKey, build_root, tuf_key


class HsmMetadataSigner:
    """Signs TUF payloads with a region's online ECDSA P-256 key in the HSM."""

    def __init__(self, hsm: Hsm, online_key: OnlineKey) -> None:
        self._hsm = hsm
        self._online_key = online_key
        self.public_key: SSlibKey = online_key.tuf_key()

    async def sign(self, payload: bytes) -> Signature:
        """DER ECDSA over SHA-256(``payload``) made in the HSM (SoftHSM has no
        CKM_ECDSA_SHA256, so the digest is computed here). Raises what ``Hsm.sign_digest``
        raises."""
        digest = hashlib.sha256(payload).digest()
        der = await self._hsm.sign_digest(
            self._online_key.hsm_id, Algorithm.ECDSA_P256_SHA256, digest
        )
        return Signature(self.public_key.keyid, der.hex())

    async def sign_metadata(self, metadata: Metadata[Any]) -> bytes:
        """Replace ``metadata``'s signatures with ours, check it verifies with our public key
        (a broken HSM never publishes an unverifiable file) and return its bytes."""
        signature = await self.sign(metadata.signed_bytes)
        metadata.signatures.clear()
        metadata.signatures[signature.keyid] = signature
        self.public_key.verify_signature(signature, metadata.signed_bytes)
        return metadata.to_bytes()


# -- custodian keys --------------------------------------------------------------------------


def generate_custodian_key(path: Path, algorithm: str = "ed25519") -> SSlibKey:
    """Write a new custodian private key to ``path`` (PEM PKCS#8, mode 0600, unencrypted: for
    development) and its public key to ``path`` + ``.pub``. Returns the public TUF key.
    Raises ``InvalidArgument`` for an unknown algorithm and ``FileExistsError`` if ``path``
    exists."""
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm in ("ecdsa", "ecdsa-p256"):
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise InvalidArgument(f"custodian keys are ed25519 or ecdsa-p256, not {algorithm!r}")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(f"{path}.pub").write_bytes(public_pem)
    return _public_tuf_key(private.public_key())


def _public_tuf_key(public: Any) -> SSlibKey:
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return tuf_key(der)


def load_custodian_signer(path: Path) -> CryptoSigner:
    """A signer for the custodian private key in ``path`` (PEM). Raises ``InvalidArgument``
    naming the file, never its content."""
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(
            f"cannot load custodian key {path}: {type(error).__name__} (an unencrypted PEM "
            "private key is expected)"
        ) from None
    if not isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise InvalidArgument(f"custodian key {path} must be Ed25519 or ECDSA P-256")
    try:
        public = _public_tuf_key(private.public_key())
    except ValueError as error:
        raise InvalidArgument(f"custodian key {path}: {error}") from None
    return CryptoSigner(private, public)


def load_public_key(path: Path) -> SSlibKey:
    """The TUF key for a PEM public key file. Raises ``InvalidArgument``."""
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
        return _public_tuf_key(public)
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"cannot load public key {path}: {error}") from None


# -- root ceremonies -------------------------------------------------------------------------


def _sign_with(metadata: Metadata[Root], signers: Sequence[CryptoSigner]) -> None:
    seen: set[str] = set()
    for signer in signers:
        if signer.public_key.keyid in seen:
            continue
        seen.add(signer.public_key.keyid)
        metadata.sign(signer, append=True)


def init_root(
    custodians: Sequence[CryptoSigner],
    threshold: int,
    online_keys: Sequence[SSlibKey],
    *,
    expires: float,
    extra_custodian_keys: Sequence[SSlibKey] = (),
) -> Metadata[Root]:
    """Root version 1, signed by every custodian in ``custodians``.

    ``extra_custodian_keys`` are custodians who are listed but do not sign now. Raises
    ``InvalidArgument`` when fewer than ``threshold`` custodians sign or the root is invalid.
    """
    keys = [s.public_key for s in custodians] + list(extra_custodian_keys)
    try:
        root = build_root(custodian_keys=keys, threshold=threshold, online_keys=online_keys,
                          version=1, expires=expires)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None
    _sign_with(root, custodians)
    try:
        root.verify_delegate(Root.type, root)
    except UnsignedMetadataError as error:
        raise InvalidArgument(f"root version 1 is not signed by its threshold: {error}") from None
    return root


def rotate_root(
    current: Metadata[Root],
    old_custodians: Sequence[CryptoSigner],
    new_custodians: Sequence[CryptoSigner],
    new_threshold: int,
    online_keys: Sequence[SSlibKey],
    *,
    expires: float,
) -> Metadata[Root]:
    """Root version N+1 with ``new_custodians`` (threshold ``new_threshold``) and
    ``online_keys``, signed by the old custodians given and the new ones, and checked the way
    a TUF client checks it: by the old root's threshold and by its own.

    Raises ``InvalidArgument`` when either threshold is not met.
    """
    try:
        new = build_root(custodian_keys=[s.public_key for s in new_custodians],
                         threshold=new_threshold, online_keys=online_keys,
                         version=current.signed.version + 1, expires=expires)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None
    _sign_with(new, [*old_custodians, *new_custodians])
    for name, delegator in (("the current root's", current), ("the new root's", new)):
        try:
            delegator.verify_delegate(Root.type, new)
        except UnsignedMetadataError as error:
            raise InvalidArgument(
                f"root version {new.signed.version} does not meet {name} threshold: {error}"
            ) from None
    return new
