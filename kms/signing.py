"""Signing use case: authorise, pick the version, sign in the HSM, re-check, return.

The HSM cannot check key state, so this code does (DESIGN.md, "Fencing"): it signs only while the
state view can prove it is current, and drops a signature whose version stopped being ACTIVE
while the HSM was working.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from kms import errors
from kms.domain.keys import Algorithm, Digest, DigestAlgorithm, Key, KeyVersion, VersionState
from kms.domain.policy import AccessPolicy
from kms.errors import FailedPrecondition, InvalidArgument, KmsError, NotFound, PermissionDenied
from kms.ports import AuditRecorder, Hsm, VersionedKey
from kms.replication import check_region, missing_replica
from kms.requests import RequestLedger, fingerprint

MAX_BATCH = 1024
_tracer = trace.get_tracer("signet.kms.signing")  # the API only: a no-op until a provider exists


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

    @classmethod
    def sharing(cls, signatures: Iterable[bytes], **shared: Any) -> list[Signature]:
        """One ``Signature`` per signature bytes, with the other fields (all of them, by
        name) shared: what a batch returns. Each instance's ``__dict__`` is filled at once,
        where the frozen dataclass's ``__init__`` assigns through ``object.__setattr__``
        field by field at three times the cost (0.26 against 0.87 µs; a batch makes
        hundreds). Equality, hashing and ``repr`` read the same attributes."""
        if set(shared) != _SHARED_SIGNATURE_FIELDS:
            raise TypeError(f"Signature.sharing needs exactly {sorted(_SHARED_SIGNATURE_FIELDS)}")
        new = object.__new__
        made: list[Signature] = []
        for signature in signatures:
            instance = new(cls)
            fields = instance.__dict__
            fields.update(shared)
            fields["signature"] = signature
            made.append(instance)
        return made


_SHARED_SIGNATURE_FIELDS = frozenset(
    {"key", "version", "key_id", "algorithm", "revision", "region"})


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
        inflight: InflightSignatures | None = None, requests: RequestLedger | None = None,
    ) -> None:
        """``requests``: remember request ids so a retried SignDigest is signed once
        (kms.requests); None signs every request."""
        self._hsm = hsm
        self._view = view
        self._region = region
        self._audit = audit
        self.inflight = inflight or InflightSignatures()
        self._requests = requests

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
        with _tracer.start_as_current_span("authorize", attributes={"signet.key": key_name}):
            self._view.require_current()
            authorize_sign(self._view, caller, key_name)
            versioned = self._view.key(key_name)
            check_region(versioned.key, self._region)
            return versioned

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
        *, request_id: str = "", new_request_id: bool = False,
    ) -> Signature:
        """Sign one digest. Raises ``InvalidArgument``, ``NotFound``, ``PermissionDenied``,
        ``FailedPrecondition``, ``Unavailable`` (also for a multi-region version not yet
        replicated here) or ``Conflict``; never returns an unfenced or unaudited signature.
        With a request ledger, a request id seen in the window returns the original
        signature instead of signing again. ``new_request_id``: the client generated the id
        for this call and sends it for the first time, so nothing can be stored under it and
        the ledger does not read it (kms.requests)."""
        if self._requests is None or not request_id:
            return await self._sign_digest(caller, key_name, version, digest,
                                           request_id=request_id, commit=None)
        # Fail fast while this signer cannot prove its state is current (etcd out of reach),
        # rather than stalling on the request-id claim for the store's whole retry budget.
        self._view.require_current()
        bound_to = fingerprint(key_name, str(version or 0), str(digest))
        return await self._requests.once(
            caller.identity, request_id, bound_to,
            lambda commit: self._sign_digest(caller, key_name, version, digest,
                                             request_id=request_id, commit=commit),
            encode=_signature_record, decode=_signature_from_record,
            still_valid=lambda sig: self._still_valid(sig.key, sig.version),
            new_id=new_request_id,
        )

    async def _sign_digest(
        self, caller: Caller, key_name: str, version: int | None, digest: Digest, *,
        request_id: str, commit: Callable[[Signature], Awaitable[None]] | None,
    ) -> Signature:
        with self.inflight.track(self._view.revision):
            versioned = self._prepare(caller, key_name)
            key_version = versioned.key.signing_version(version, digest)
            try:
                sig = await self._hsm.sign_digest(
                    key_version.hsm_id, versioned.key.algorithm, digest.value
                )
            except NotFound:
                raise missing_replica(versioned.key, key_version.number, self._region) from None
            self._still_valid(key_name, key_version.number)
            result = self._result(versioned.key, key_version, versioned.mod_revision, sig)
            await self._record(caller, result, digest, request_id)
            if commit is not None:
                # Inside the in-flight count: a Revoke's fence waits for this too. Shielded:
                # if the caller gives up now (deadline), the result is still stored, so the
                # retry gets this signature instead of a second one.
                await asyncio.shield(commit(result))
            return result

    async def _sign_in_hsm(self, key: Key, version: KeyVersion, digests: list[bytes]
                           ) -> list[bytes | Exception]:
        try:
            return await self._hsm.sign_digests(version.hsm_id, key.algorithm, digests)
        except NotFound:
            raise missing_replica(key, version.number, self._region) from None

    async def sign_batch(
        self,
        caller: Caller,
        key_name: str,
        version: int | None,
        digests: Sequence[Digest | KmsError],
        *,
        request_id: str = "",
        new_request_id: bool = False,
    ) -> list[Signature | KmsError]:
        """Sign up to ``MAX_BATCH`` digests with one key version. Items that were already
        invalid (passed in as errors) or that fail alone keep their own error; the others
        are signed and audited (item ``i`` under request id ``<request_id>#<i>``); an item
        whose audit record fails gets ``Unavailable`` instead of its signature. Errors about
        the key or caller fail the whole batch. With a request ledger, a request id seen in
        the window returns the stored outcomes instead of signing again (``new_request_id``
        as in ``sign_digest``)."""
        if not digests:
            raise InvalidArgument("a batch needs at least one digest")
        if len(digests) > MAX_BATCH:
            raise InvalidArgument(
                f"a batch holds at most {MAX_BATCH} digests, got {len(digests)}; split it"
            )
        if self._requests is None or not request_id:
            return await self._sign_batch_tracked(caller, key_name, version, digests,
                                                  request_id=request_id, commit=None)
        # As for SignDigest: a retried batch (same caller and request id) gets the results
        # the first attempt stored, from any signer in any region, instead of new signatures.
        self._view.require_current()
        return await self._requests.once(
            caller.identity, request_id, _batch_fingerprint(key_name, version, digests),
            lambda commit: self._sign_batch_tracked(caller, key_name, version, digests,
                                                    request_id=request_id, commit=commit),
            encode=_batch_record, decode=_batch_from_record,
            still_valid=self._batch_still_valid, new_id=new_request_id,
        )

    async def _sign_batch_tracked(
        self, caller: Caller, key_name: str, version: int | None,
        digests: Sequence[Digest | KmsError], *, request_id: str,
        commit: Callable[[list[Signature | KmsError]], Awaitable[None]] | None,
    ) -> list[Signature | KmsError]:
        with self.inflight.track(self._view.revision):
            results = await self._sign_batch(caller, key_name, version, digests, request_id)
            if commit is not None and any(isinstance(r, Signature) for r in results):
                # Inside the in-flight count and shielded, as in _sign_digest. A batch that
                # signed nothing is not stored: its retry may simply try again.
                await asyncio.shield(commit(results))
            return results

    def _batch_still_valid(self, results: Sequence[Signature | KmsError]) -> None:
        for result in results:
            if isinstance(result, Signature):
                self._still_valid(result.key, result.version)
                return  # one version per batch

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
        unsigned = KmsError("not signed")
        results: list[Signature | KmsError] = [
            item if isinstance(item, KmsError) else unsigned for item in digests
        ]
        chosen, todo, todo_digests = _plan_batch(key, version, digests, results)
        if chosen is None:
            return results
        signed = await self._sign_in_hsm(key, chosen, [d.value for d in todo_digests])
        self._still_valid(key_name, chosen.number)
        audited: list[int] = []
        audited_digests: list[str] = []
        signatures: list[bytes] = []
        for index, digest, outcome in zip(todo, todo_digests, signed, strict=True):
            if isinstance(outcome, KmsError):
                results[index] = outcome
            elif isinstance(outcome, Exception):
                results[index] = KmsError(f"HSM error: {outcome}")
            else:
                audited.append(index)
                audited_digests.append(str(digest))
                signatures.append(outcome)
        if not audited:
            return results
        # One audit queue operation for the whole batch (I3): durable together before any
        # signature is returned, or every one of them is replaced by the audit error.
        try:
            await self._audit.record_signatures(
                identity=caller.identity, key=key.name, version=chosen.number,
                key_id=chosen.key_id, revision=versioned.mod_revision, region=self._region,
                digests=audited_digests, request_ids=[f"{request_id}#{i}" for i in audited])
        except KmsError as error:
            for index in audited:
                results[index] = error
            return results
        made = Signature.sharing(
            signatures, key=key.name, version=chosen.number, key_id=chosen.key_id,
            algorithm=key.algorithm, revision=versioned.mod_revision, region=self._region)
        for index, signature in zip(audited, made, strict=True):
            results[index] = signature
        return results


def _plan_batch(
    key: Key, version: int | None, digests: Sequence[Digest | KmsError],
    results: list[Signature | KmsError],
) -> tuple[KeyVersion | None, list[int], list[Digest]]:
    """The version that signs the batch (None when no item can be signed), and the indices
    and digests to sign; an item the key refuses gets its ``InvalidArgument`` in ``results``.
    Errors about the version itself raise for the whole batch."""
    chosen: KeyVersion | None = None
    todo: list[int] = []
    todo_digests: list[Digest] = []
    # The version depends only on the digest's algorithm: asked once per algorithm.
    by_algorithm: dict[DigestAlgorithm, KeyVersion | InvalidArgument] = {}
    for index, item in enumerate(digests):
        if isinstance(item, KmsError):
            continue
        found = by_algorithm.get(item.algorithm)
        if found is None:
            try:
                found = key.signing_version(version, item)
            except InvalidArgument as error:
                found = error
            by_algorithm[item.algorithm] = found
        if isinstance(found, InvalidArgument):
            results[index] = found
            continue
        chosen = found
        todo.append(index)
        todo_digests.append(item)
    return chosen, todo, todo_digests


def _signature_record(signature: Signature) -> dict[str, Any]:
    return {"signature": base64.b64encode(signature.signature).decode(), "key": signature.key,
            "version": signature.version, "key_id": signature.key_id,
            "algorithm": signature.algorithm.value, "revision": signature.revision,
            "region": signature.region}


def _signature_from_record(record: Mapping[str, Any]) -> Signature:
    return Signature(base64.b64decode(record["signature"]), str(record["key"]),
                     int(record["version"]), str(record["key_id"]),
                     Algorithm(record["algorithm"]), int(record["revision"]),
                     str(record["region"]))


# -- stored batch results (request ids) --------------------------------------------------------


def _batch_fingerprint(key_name: str, version: int | None,
                       digests: Sequence[Digest | KmsError]) -> str:
    return fingerprint("batch", key_name, str(version or 0),
                       *(f"error:{item}" if isinstance(item, KmsError) else str(item)
                         for item in digests))


def _batch_record(results: Sequence[Signature | KmsError]) -> dict[str, Any]:
    """The batch's outcomes in order: signatures as base64 (the key version fields once, as a
    batch signs with one version) and errors as their kind and message."""
    signed = next(r for r in results if isinstance(r, Signature))
    shared = _signature_record(signed)
    del shared["signature"]
    items: list[Any] = [
        base64.b64encode(r.signature).decode() if isinstance(r, Signature)
        else {"error": type(r).__name__, "message": str(r)} for r in results]
    return {**shared, "items": items}


def _batch_from_record(record: Mapping[str, Any]) -> list[Signature | KmsError]:
    results: list[Signature | KmsError] = []
    for item in record["items"]:
        if isinstance(item, str):
            results.append(_signature_from_record({**record, "signature": item}))
        else:
            kind = getattr(errors, str(item["error"]), KmsError)
            if not (isinstance(kind, type) and issubclass(kind, KmsError)):
                kind = KmsError
            results.append(kind(str(item["message"])))
    return results
