"""What the key-management core needs from the outside world.

Adapters implement these protocols: ``kms.hsm.pkcs11`` (PKCS#11 HSMs), ``kms.state.etcd``
(etcd), and in-memory ones for unit tests. Async methods run on the caller's event loop; an
adapter that wraps blocking calls (PKCS#11) hands them to threads it owns.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kms.domain.keys import Algorithm, Key
from kms.domain.policy import AccessPolicy


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, seconds since the epoch (for records people read)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (for deadlines and lease proofs)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class GeneratedKeyPair:
    """A key pair generated inside the HSM: where it is, and its public half."""

    hsm_id: bytes  # CKA_ID shared by the private and public objects
    public_key_der: bytes  # DER SubjectPublicKeyInfo


class Hsm(Protocol):
    """A PKCS#11 token holding signing keys. Private keys never leave it in plaintext."""

    async def generate_key_pair(
        self, *, label: str, algorithm: Algorithm, extractable: bool
    ) -> GeneratedKeyPair:
        """Generate a key pair in the token. ``extractable`` keys can later be exported only
        wrapped (for multi-region replication); all private keys are sensitive.
        Raises ``HsmError``."""
        ...

    async def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        """Sign a precomputed digest. Returns the signature in its standard encoding: DER for
        ECDSA, 64 raw bytes for Ed25519 (which signs the digest bytes as its message), the
        PSS bytes for RSA-PSS (SHA-256, MGF1-SHA-256, salt length 32).
        Raises ``NotFound`` if no such key is in the token, ``HsmError`` otherwise."""
        ...

    async def sign_digests(
        self, hsm_id: bytes, algorithm: Algorithm, digests: Sequence[bytes]
    ) -> list[bytes | Exception]:
        """Sign many digests with one key in one hand-off; a failed item carries its error."""
        ...

    async def public_key(self, hsm_id: bytes) -> bytes:
        """The DER SubjectPublicKeyInfo of the key pair. Raises ``NotFound``."""
        ...

    async def destroy_key_pair(self, hsm_id: bytes) -> None:
        """Delete the private and public objects. Deleting a missing key is not an error."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class VersionedKey:
    key: Key
    mod_revision: int  # etcd mod_revision of the record: the compare-and-swap token


@dataclass(frozen=True)
class VersionedPolicy:
    policy: AccessPolicy
    mod_revision: int


@dataclass(frozen=True)
class StateSnapshot:
    """Every key and the policy, read at one store revision."""

    revision: int
    keys: dict[str, VersionedKey]
    policy: VersionedPolicy | None


@dataclass(frozen=True)
class StateEvent:
    """One change seen by a watch, at store revision ``revision``."""

    revision: int
    kind: Literal["key-put", "key-deleted", "policy-put", "policy-deleted"]
    name: str = ""  # key name, for key events
    key: VersionedKey | None = None
    policy: VersionedPolicy | None = None


class AuditRecorder(Protocol):
    """The append-only audit log (I3): a returned index means the entry is durable. Raises
    ``Unavailable`` when it cannot record; callers then return nothing (fail closed)."""

    async def record_signature(
        self, *, identity: str, key: str, version: int, key_id: str, digest: str,
        request_id: str, revision: int, region: str,
    ) -> int: ...

    async def record_signatures(
        self, *, identity: str, key: str, version: int, key_id: str, revision: int,
        region: str, digests: Sequence[str], request_ids: Sequence[str],
    ) -> list[int]:
        """One ``sign`` entry per digest (request id at the same position), durable together
        or not at all; returns their indices in order (a batch: one queue operation)."""
        ...

    async def record_event(self, kind: str, fields: Mapping[str, Any]) -> int: ...


@dataclass(frozen=True)
class SignerRegistrations:
    """Every live signer's applied key-state revision, read at store revision ``revision``."""

    revision: int
    applied: dict[str, int]


class FenceRegistry(Protocol):
    """Where signers record, under their lease, the key-state revision they have applied
    (DESIGN.md "Fencing"); a registration vanishes with its lease."""

    async def register_signer(self, signer_id: str, lease_id: int, applied_revision: int) -> None:
        ...

    async def signer_registrations(self) -> SignerRegistrations: ...

    async def try_lead(self, role: str, candidate: str, lease_id: int) -> bool:
        """Become (or stay) the one holder of ``role`` while ``lease_id`` lives. True when
        ``candidate`` holds it after the call."""
        ...


class KeyStateStore(Protocol):
    """Replicated key state with compare-and-swap updates (etcd in production).

    Every failure to reach the store within the retry budget raises ``StateStoreError``.
    """

    async def create_key(self, key: Key) -> VersionedKey:
        """Create the record only if no key has this name; raises ``AlreadyExists``."""
        ...

    async def get_key(self, name: str) -> VersionedKey:
        """Raises ``NotFound``."""
        ...

    async def update_key(self, key: Key, expected_mod_revision: int) -> VersionedKey:
        """Replace the record only if it is still at ``expected_mod_revision``; raises
        ``Conflict`` when someone else changed it first, ``NotFound`` when it is gone."""
        ...

    async def list_keys(self) -> list[VersionedKey]: ...

    async def get_policy(self) -> VersionedPolicy | None: ...

    async def put_policy(
        self, policy: AccessPolicy, expected_mod_revision: int | None
    ) -> VersionedPolicy:
        """Store the policy. ``expected_mod_revision`` None means "only if none exists yet",
        0 means "unconditionally"; otherwise compare-and-swap. Raises ``Conflict``."""
        ...

    async def snapshot(self) -> StateSnapshot:
        """Every key and the policy at one revision (a single linearizable range read)."""
        ...

    def watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        """Changes from ``start_revision`` on, in order. Raises ``WatchCompacted`` when that
        revision is gone (re-read a snapshot), ``StateStoreError`` when the stream breaks."""
        ...

    async def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease id."""
        ...

    async def keep_alive(self, lease_id: int) -> int:
        """Refresh the lease once; returns the remaining TTL, 0 or less if it has expired."""
        ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def current_revision(self) -> int:
        """The store's revision now (a linearizable read)."""
        ...

    async def close(self) -> None: ...
