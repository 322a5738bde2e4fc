"""Request ids: a sign request retried after a failover is answered once, with one signature.

After a signature is made and audited, the signer stores it at
``{prefix}/requests/<sha256(identity)[:32]>/<request_id>`` with ONE create-if-absent
transaction. The first result stored is the only one ever returned for that request id, in any
region: a signer whose create loses (a concurrent duplicate, or a retry of a request that was
already answered) drops its own signature and returns the stored one instead, after re-checking
its version against current key state (a result made with a version revoked since is refused,
I2). Dropped signatures are audited but never returned, which ADR 0005 allows.

One etcd write per request (no claim before signing) keeps the cost low: etcd batches
concurrent transactions into one disk sync. A read before signing (no disk sync) answers the
usual retry — one that arrives after the first attempt finished — from the stored result, so
only a retry racing the original is signed twice (audited, never returned twice).

Records live on a shared *window lease* (TTL = the idempotency window), granted afresh every
tenth of the window, so an id is remembered for between one and 1.1 windows; etcd deletes it
then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from kms.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_REQUEST_ID = 200
DEFAULT_WINDOW_SECONDS = 600.0


class LedgerStore(Protocol):
    """What the ledger needs from etcd (``EtcdKeyStateStore`` implements it)."""

    @property
    def layout(self) -> Any: ...
    async def grant_lease(self, ttl_seconds: int) -> int: ...
    async def claim_request(self, path: str, value: bytes, lease_id: int
                            ) -> tuple[bool, bytes | None, int]: ...
    async def get_record(self, path: str) -> dict[str, Any] | None: ...


def identity_hash(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def fingerprint(*parts: str) -> str:
    """What a request id is bound to (key, version, digest): reusing the id for anything else
    is refused."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


class _Answered(Exception):
    """Another attempt stored its result first; ``record`` is that result."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        super().__init__("request already answered")
        self.record = record


class RequestLedger:
    def __init__(
        self, store: LedgerStore, *, signer_id: str,
        window_seconds: float = DEFAULT_WINDOW_SECONDS, store_timeout: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds < 1:
            raise ValueError("the idempotency window must be at least 1 s")
        self._store = store
        self._signer_id = signer_id
        self.window = window_seconds
        self._store_timeout = store_timeout
        self._now = wall_clock
        self._lease: tuple[int, float] | None = None  # id, monotonic time granted
        self._lease_lock = asyncio.Lock()

    async def _window_lease(self) -> int:
        async with self._lease_lock:
            now = time.monotonic()
            if self._lease is None or now - self._lease[1] > self.window / 10:
                self._lease = (await self._store.grant_lease(int(self.window)), now)
            return self._lease[0]

    async def once(
        self, identity: str, request_id: str, bound_to: str,
        action: Callable[[Callable[[T], Awaitable[None]]], Awaitable[T]],
        *, encode: Callable[[T], dict[str, Any]], decode: Callable[[Mapping[str, Any]], T],
        still_valid: Callable[[T], None],
    ) -> T:
        """Run ``action(commit)``; ``action`` calls ``commit(result)`` before it returns the
        result. If a result for this (identity, request id) was stored first — by another
        region, or by the attempt a retry repeats — that stored result is returned instead,
        once it passes ``still_valid``.

        Raises ``InvalidArgument`` for a malformed id or one reused for another request,
        ``Unavailable`` when etcd does not take the record in time (nothing is returned then),
        and whatever ``action`` or ``still_valid`` raise.
        """
        if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
            raise InvalidArgument(
                f"request id must be at most {MAX_REQUEST_ID} printable characters")
        path = self._store.layout.request(identity_hash(identity), request_id)
        try:
            async with asyncio.timeout(self._store_timeout):
                earlier = await self._store.get_record(path)
        except TimeoutError:
            raise Unavailable(
                "cannot look up the request id: etcd did not answer in time; retry, or use "
                "another region") from None
        if earlier is not None:
            return self._stored(earlier, request_id, bound_to, decode, still_valid)

        async def commit(result: T) -> None:
            record = {"bound_to": bound_to, "owner": self._signer_id,
                      "result": encode(result), "completed_at": self._now()}
            try:
                # Bounded: a caller's deadline is usually a few seconds, and a result that
                # cannot be stored means this region cannot answer now (fail closed).
                async with asyncio.timeout(self._store_timeout):
                    lease = await self._window_lease()
                    stored, existing, _ = await self._store.claim_request(
                        path, _encode(record), lease)
            except TimeoutError:
                raise Unavailable(
                    "cannot record the request id: etcd did not answer in time; retry, or "
                    "use another region") from None
            if not stored:
                raise _Answered(json.loads(existing or b"{}"))

        try:
            return await action(commit)
        except _Answered as answered:
            return self._stored(answered.record, request_id, bound_to, decode, still_valid)

    @staticmethod
    def _stored(record: Mapping[str, Any], request_id: str, bound_to: str,
                decode: Callable[[Mapping[str, Any]], T], still_valid: Callable[[T], None]
                ) -> T:
        if record.get("bound_to") != bound_to:
            raise InvalidArgument(
                f"request id {request_id!r} was already used for a different request "
                "(another key, version or digest); use a new request id")
        result = decode(record["result"])
        still_valid(result)
        log.info("request %s was answered before; returning the stored signature", request_id)
        return result


def _encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
