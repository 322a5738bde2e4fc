"""Signing use case: authorise, pick the version, sign in the HSM, re-check, return.

The HSM cannot check key state, so this code does (DESIGN.md, "Fencing"): it signs only while the
state view can prove it is current, and drops a signature whose version stopped being ACTIVE
while the HSM was working.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from kms.domain.keys import Algorithm, Digest, Key, KeyVersion, VersionState
from kms.domain.policy import AccessPolicy
from kms.errors import FailedPrecondition, InvalidArgument, KmsError, PermissionDenied
from kms.ports import AuditRecorder, Hsm, VersionedKey

MAX_BATCH = 1024


class StateView(Protocol):
    """What signing needs from the signer's watch-fed view of key state."""

    @property
    def revision(self) -> int:
        """The key-state revision applied so far."""
        ...

    def require_current(self) -> None: ...
    def key(self, name: str) -> VersionedKey: ...
    def policy(self) -> AccessPolicy | None: ...
    async def wait_for_revision(self, revision: int, timeout: float) -> None:
        """Wait until changes up to ``revision`` are applied; raises ``Unavailable``."""
        ...


@dataclass(frozen=True)
class Signature:
    signature: bytes
    key: str
    version: int
    key_id: str
    algorithm: Algorithm
    revision: int
    region: str


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. ``unrestricted`` is only ever set by the explicit insecure
    development mode, which skips the access policy."""

    identity: str
    unrestricted: bool = False


def authorize_sign(view: StateView, caller: Caller, key_name: str) -> None:
    if caller.unrestricted:
        return
    policy = view.policy()
    if policy is None:
        raise PermissionDenied(
            "no access policy is configured, so nobody may sign; apply one with "
            "'signet policy apply FILE'"
        )
    policy.check_sign(caller.identity, key_name)


class InflightSignatures:
    """Signatures in progress, counted by the key-state revision that authorised them.

    Before a signer acknowledges revision R to the fence, ``drained_below(R)`` waits until every
    signature authorised by older state has been re-checked and returned or dropped, so none
    leaves this process after a Revoke at R has returned.
    """

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def track(self, revision: int) -> Iterator[None]:
        self._counts[revision] += 1
        try:
            yield
        finally:
            self._counts[revision] -= 1
            if not self._counts[revision]:
                del self._counts[revision]
            self._changed.set()

    def oldest(self) -> int | None:
        return min(self._counts, default=None)

    async def drained_below(self, revision: int) -> None:
        while (oldest := self.oldest()) is not None and oldest < revision:
            self._changed.clear()
            await self._changed.wait()


class SigningService:
    """Signs digests. Every signature is recorded in the audit log before it is returned; if
    the record cannot be written, the signature is dropped and the caller gets UNAVAILABLE."""

    def __init__(
        self, *, hsm: Hsm, view: StateView, region: str, audit: AuditRecorder,
        inflight: InflightSignatures | None = None,
    ) -> None:
        self._hsm = hsm
        self._view = view
        self._region = region
        self._audit = audit
        self.inflight = inflight or InflightSignatures()

    async def _record(
        self, caller: Caller, signature: Signature, digest: Digest, request_id: str
    ) -> None:
        await self._audit.record_signature(
            identity=caller.identity, key=signature.key, version=signature.version,
            key_id=signature.key_id, digest=str(digest), request_id=request_id,
            revision=signature.revision, region=signature.region,
        )

    def _prepare(self, caller: Caller, key_name: str) -> VersionedKey:
        if not key_name:
            raise InvalidArgument("a key name is required")
        self._view.require_current()
        authorize_sign(self._view, caller, key_name)
        return self._view.key(key_name)

    def _still_valid(self, key_name: str, version: int) -> None:
        """After C_Sign: refuse to return a signature whose version changed state meanwhile."""
        self._view.require_current()
        current = self._view.key(key_name).key.version(version)
        if current.state is not VersionState.ACTIVE:
            raise FailedPrecondition(
                f"key {key_name!r} version {version} became {current.state.value} while "
                "signing; the signature was discarded"
            )

    def _result(self, key: Key, version: KeyVersion, revision: int, sig: bytes) -> Signature:
        return Signature(
            signature=sig,
            key=key.name,
            version=version.number,
            key_id=version.key_id,
            algorithm=key.algorithm,
            revision=revision,
            region=self._region,
        )

    async def sign_digest(
        self, caller: Caller, key_name: str, version: int | None, digest: Digest,
        *, request_id: str = "",
    ) -> Signature:
        """Sign one digest. Raises ``InvalidArgument``, ``NotFound``, ``PermissionDenied``,
        ``FailedPrecondition`` or ``Unavailable``; never returns an unfenced or unaudited
        signature."""
        with self.inflight.track(self._view.revision):
            versioned = self._prepare(caller, key_name)
            key_version = versioned.key.signing_version(version, digest)
            sig = await self._hsm.sign_digest(
                key_version.hsm_id, versioned.key.algorithm, digest.value
            )
            self._still_valid(key_name, key_version.number)
            result = self._result(versioned.key, key_version, versioned.mod_revision, sig)
            await self._record(caller, result, digest, request_id)
            return result

    async def sign_batch(
        self,
        caller: Caller,
        key_name: str,
        version: int | None,
        digests: Sequence[Digest | KmsError],
        *,
        request_id: str = "",
    ) -> list[Signature | KmsError]:
        """Sign up to ``MAX_BATCH`` digests with one key version. Items that were already
        invalid (passed in as errors) or that fail alone keep their own error; the others
        are signed and audited (item ``i`` under request id ``<request_id>#<i>``); an item
        whose audit record fails gets ``Unavailable`` instead of its signature. Errors about
        the key or caller fail the whole batch."""
        if not digests:
            raise InvalidArgument("a batch needs at least one digest")
        if len(digests) > MAX_BATCH:
            raise InvalidArgument(
                f"a batch holds at most {MAX_BATCH} digests, got {len(digests)}; split it"
            )
        with self.inflight.track(self._view.revision):
            return await self._sign_batch(caller, key_name, version, digests, request_id)

    async def _sign_batch(
        self,
        caller: Caller,
        key_name: str,
        version: int | None,
        digests: Sequence[Digest | KmsError],
        request_id: str,
    ) -> list[Signature | KmsError]:
        versioned = self._prepare(caller, key_name)
        key = versioned.key
        # Invalid items keep their error; the rest are filled in below.
        results: list[Signature | KmsError] = [
            item if isinstance(item, KmsError) else KmsError("not signed") for item in digests
        ]
        chosen: KeyVersion | None = None
        todo: list[int] = []
        todo_digests: list[Digest] = []
        for index, item in enumerate(digests):
            if isinstance(item, KmsError):
                continue
            try:
                key_version = key.signing_version(version, item)
            except InvalidArgument as error:
                results[index] = error
                continue
            chosen = key_version
            todo.append(index)
            todo_digests.append(item)
        if chosen is None:
            return results
        signed = await self._hsm.sign_digests(
            chosen.hsm_id, key.algorithm, [d.value for d in todo_digests]
        )
        self._still_valid(key_name, chosen.number)
        audited: list[tuple[int, Digest, Signature]] = []
        for index, digest, outcome in zip(todo, todo_digests, signed, strict=True):
            if isinstance(outcome, KmsError):
                results[index] = outcome
            elif isinstance(outcome, Exception):
                results[index] = KmsError(f"HSM error: {outcome}")
            else:
                signature = self._result(key, chosen, versioned.mod_revision, outcome)
                audited.append((index, digest, signature))
        records = await asyncio.gather(
            *(self._record(caller, sig, d, f"{request_id}#{i}") for i, d, sig in audited),
            return_exceptions=True,
        )
        for (index, _, sig), record in zip(audited, records, strict=True):
            if isinstance(record, KmsError):
                results[index] = record
            elif isinstance(record, BaseException):
                raise record
            else:
                results[index] = sig
        return results
