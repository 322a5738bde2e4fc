"""Signed checkpoints of an audit log: (log id, tree size, root hash, time) under an ECDSA key.

The signature covers exactly these bytes (UTF-8, each line ending in ``\\n``), in the style of
a signed note (C2SP tlog-checkpoint)::

    signet-audit-checkpoint/v1
    <log_id>
    <tree_size in decimal>
    <root hash, standard base64>
    <time, RFC 3339 UTC with microseconds>

The algorithm is ``ecdsa-p256-sha256``: an ECDSA P-256 signature (DER) over SHA-256 of those
bytes. ``key_id`` is the hex SHA-256 of the signer's DER SubjectPublicKeyInfo, as for key
versions. Each stored checkpoint also carries the signer's public key (PEM) so a copy of the
log can be checked without a trusted key; only a *trusted* key makes that check mean
"nobody rewrote it".
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kms.audit.errors import AuditVerificationError
from kms.domain.keys import Algorithm, key_id_for
from kms.ports import Hsm

CHECKPOINT_FORMAT = "signet-audit-checkpoint/v1"
CHECKPOINT_ALGORITHM = Algorithm.ECDSA_P256_SHA256.value
_TIME_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_FIELDS = frozenset(
    {"log_id", "tree_size", "root_hash", "time", "key_id", "algorithm", "signature", "public_key"}
)


def format_time(seconds: float) -> str:
    """Epoch seconds as fixed-width RFC 3339 UTC (``2024-05-01T12:00:00.000000Z``), so that
    string order is time order."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_time(text: object) -> str:
    """Return ``text`` if it is a time in ``format_time``'s form; raise ``ValueError``."""
    if not isinstance(text, str) or not _TIME_PATTERN.match(text):
        raise ValueError(f"time must look like 2024-05-01T12:00:00.000000Z, got {text!r}")
    datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")  # rejects month 13 and such
    return text


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """The one byte form of a JSON object used on disk: sorted keys, no spaces, UTF-8, no
    NaN or infinities. Raises ``TypeError``/``ValueError`` for values JSON cannot hold."""
    return _CANONICAL.encode(document).encode("utf-8")


# One encoder for every line: json.dumps would build a new one per call (audit hot path).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def checkpoint_message(log_id: str, tree_size: int, root_hash: bytes, time: str) -> bytes:
    """The exact bytes a checkpoint signature covers (see the module docstring)."""
    root = base64.b64encode(root_hash).decode("ascii")
    return f"{CHECKPOINT_FORMAT}\n{log_id}\n{tree_size}\n{root}\n{time}\n".encode()


def validate_log_id(log_id: str) -> str:
    """A log id is ``<region>/<signer-id>``: printable, no whitespace, at most 200 characters.
    Returns it; raises ``ValueError``."""
    if not re.fullmatch(r"[A-Za-z0-9._:@-]+/[A-Za-z0-9._:@-]+", log_id) or len(log_id) > 200:
        raise ValueError(f"log id must look like '<region>/<signer-id>', got {log_id!r}")
    return log_id


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that the log ``log_id`` had ``tree_size`` entries with root
    ``root_hash`` (hex) at ``time``. The constructor checks the form, not the signature:
    call ``verify`` for that."""

    log_id: str
    tree_size: int
    root_hash: str
    time: str
    key_id: str
    algorithm: str
    signature: str  # base64 of the DER ECDSA signature
    public_key: str  # PEM of the signer's public key (untrusted; see module docstring)

    def __post_init__(self) -> None:
        validate_log_id(self.log_id)
        if isinstance(self.tree_size, bool) or not isinstance(self.tree_size, int) or (
            self.tree_size < 0
        ):
            raise ValueError(f"tree_size must be a non-negative integer, got {self.tree_size!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.root_hash):
            raise ValueError("root_hash must be 64 lowercase hex digits")
        check_time(self.time)
        if not re.fullmatch(r"[0-9a-f]{64}", self.key_id):
            raise ValueError("key_id must be 64 lowercase hex digits")
        try:
            base64.b64decode(self.signature, validate=True)
        except ValueError as error:
            raise ValueError("signature must be standard base64") from error

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hash)

    def message(self) -> bytes:
        """The bytes the signature covers."""
        return checkpoint_message(self.log_id, self.tree_size, self.root, self.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "time": self.time,
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "signature": self.signature,
            "public_key": self.public_key,
        }

    def to_line(self) -> bytes:
        """The canonical JSON line stored in ``checkpoints.jsonl`` (without the newline)."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Parse a stored checkpoint; raises ``ValueError`` or ``TypeError`` saying which field
        is wrong."""
        missing = sorted(_FIELDS - set(data))
        if missing:
            raise ValueError(f"checkpoint is missing {', '.join(missing)}")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ValueError(f"checkpoint has unknown fields {', '.join(unknown)}")
        for name in ("log_id", "root_hash", "time", "key_id", "algorithm", "signature",
                     "public_key"):
            if not isinstance(data[name], str):
                raise TypeError(f"checkpoint field {name} must be a string")
        return cls(**{name: data[name] for name in _FIELDS})

    @classmethod
    def from_line(cls, line: bytes) -> Checkpoint:
        """Parse one stored line (without newline); it must be canonical JSON. Raises
        ``ValueError`` or ``TypeError`` saying what is wrong."""
        document = json.loads(line)
        if not isinstance(document, dict):
            raise TypeError("a checkpoint must be a JSON object")
        checkpoint = cls.from_dict(document)
        if checkpoint.to_line() != line:
            raise ValueError("checkpoint is not in canonical form (sorted keys, no spaces)")
        return checkpoint

    def verify(self, trusted_public_key_pem: str | bytes | None = None) -> None:
        """Check the signature. With ``trusted_public_key_pem``, the checkpoint must be signed
        by exactly that key; without it, by the key it carries (which proves only that it was
        not damaged). Returns nothing; raises ``AuditVerificationError``."""
        where = f"checkpoint of {self.log_id} at tree size {self.tree_size}"
        if self.algorithm != CHECKPOINT_ALGORITHM:
            raise AuditVerificationError(
                where, f"unsupported algorithm {self.algorithm!r}; expected {CHECKPOINT_ALGORITHM}"
            )
        pem = self.public_key if trusted_public_key_pem is None else trusted_public_key_pem
        public = _load_p256_public_key(pem, where)
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if key_id_for(der) != self.key_id:
            trusted = "the trusted key" if trusted_public_key_pem is not None else "its own key"
            raise AuditVerificationError(
                where, f"signed by key {self.key_id[:16]}…, not {trusted} {key_id_for(der)[:16]}…"
            )
        try:
            public.verify(
                base64.b64decode(self.signature),
                hashlib.sha256(self.message()).digest(),
                ec.ECDSA(Prehashed(hashes.SHA256())),
            )
        except InvalidSignature:
            raise AuditVerificationError(where, "the signature does not verify") from None


def _load_p256_public_key(pem: str | bytes, where: str) -> ec.EllipticCurvePublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as error:
        raise AuditVerificationError(where, f"the public key is not PEM: {error}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise AuditVerificationError(where, "the public key is not an ECDSA P-256 key")
    return public


class CheckpointSigner(Protocol):
    """Signs checkpoint messages with an ECDSA P-256 key (``ecdsa-p256-sha256``)."""

    @property
    def key_id(self) -> str: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def public_key_pem(self) -> str: ...

    async def sign(self, message: bytes) -> bytes:
        """A DER ECDSA signature over SHA-256(``message``). Raises ``Unavailable`` (or a
        subclass) when the key cannot be reached."""
        ...


def _pem_from_der(public_key_der: bytes) -> str:
    public = serialization.load_der_public_key(public_key_der)
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


class HsmCheckpointSigner:
    """Signs checkpoints with an ECDSA P-256 key pair held in the HSM (the digest is computed
    here because SoftHSM has no ``CKM_ECDSA_SHA256``)."""

    def __init__(
        self, hsm: Hsm, hsm_id: bytes, algorithm: Algorithm, public_key_der: bytes
    ) -> None:
        if algorithm is not Algorithm.ECDSA_P256_SHA256:
            raise ValueError(
                f"checkpoint keys must be {CHECKPOINT_ALGORITHM}, not {algorithm.value}"
            )
        self._hsm = hsm
        self._hsm_id = hsm_id
        self._public_key_pem = _pem_from_der(public_key_der)
        self._key_id = key_id_for(public_key_der)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> str:
        return CHECKPOINT_ALGORITHM

    @property
    def public_key_pem(self) -> str:
        return self._public_key_pem

    async def sign(self, message: bytes) -> bytes:
        """DER ECDSA over SHA-256(``message``), made in the HSM. Raises ``HsmError`` or
        ``NotFound`` as ``Hsm.sign_digest`` does."""
        digest = hashlib.sha256(message).digest()
        return await self._hsm.sign_digest(self._hsm_id, Algorithm.ECDSA_P256_SHA256, digest)


class SoftwareCheckpointSigner:
    """A checkpoint signer whose private key lives in process memory.

    For tests and local experiments only: a production log signs with ``HsmCheckpointSigner``
    so that whoever can write the log directory cannot also forge its checkpoints."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise TypeError("checkpoint keys must be ECDSA P-256")
        self._private_key = private_key
        der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._public_key_pem = _pem_from_der(der)
        self._key_id = key_id_for(der)

    @classmethod
    def generate(cls) -> SoftwareCheckpointSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> str:
        return CHECKPOINT_ALGORITHM

    @property
    def public_key_pem(self) -> str:
        return self._public_key_pem

    async def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message, ec.ECDSA(hashes.SHA256()))


async def sign_checkpoint(
    signer: CheckpointSigner, log_id: str, tree_size: int, root_hash: bytes, time: str
) -> Checkpoint:
    """Sign (log_id, tree_size, root_hash, time) and return the checkpoint, after checking the
    signature against the signer's own public key so a wrong key or a broken HSM never
    publishes an unverifiable checkpoint. Raises what ``signer.sign`` raises, or
    ``AuditVerificationError``."""
    message = checkpoint_message(log_id, tree_size, root_hash, time)
    signature = await signer.sign(message)
    checkpoint = Checkpoint(
        log_id=log_id,
        tree_size=tree_size,
        root_hash=root_hash.hex(),
        time=time,
        key_id=signer.key_id,
        algorithm=signer.algorithm,
        signature=base64.b64encode(signature).decode("ascii"),
        public_key=signer.public_key_pem,
    )
    checkpoint.verify()
    return checkpoint
