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

A request whose client marks its id *new* (generated for this call, sent for the first time:
nothing can be stored under it yet) is never read. It goes through the lookup groups like any
other id — alone at once, under load gathered with the others, which is where concurrent
requests meet so that their audit commits and creates share round trips too (bypassing the
groups measured slower) — but a group's etcd read covers only the ids that are not new: none
for the client library's usual traffic, so a lone client saves a round trip (≈ 1 ms). The
mark is only a hint: a wrong one costs one more audited signature, and the create still
returns the stored result (bench/README.md, round 8).

The read is *serializable* (the local member's state): it may miss a result committed a
moment ago through another member, which costs one more audited-but-never-returned signature,
never a second acknowledged one, since the create-if-absent transaction decides.

The lookups and the creates of concurrent requests are coalesced: while one group is in
flight to etcd, the next one gathers, and goes as one read-only transaction (lookups) or one
all-or-nothing create transaction (claims; when some id in it already exists, the existing ones
are answered and the rest are tried again). Under load one etcd round trip serves many
requests; a lone request goes at once.

New requests reach a worker one event-loop turn at a time, so without help a lookup group
holds one or two of them even when dozens are in flight, and every etcd round trip costs the
calling process ≈ 0.4 ms of CPU. So a lookup that starts a group *while other requests of this
ledger are already past their own lookup* (the worker is busy) waits up to ``group_linger``
(default 5 ms, like MySQL's ``binlog_group_commit_sync_delay``) for more to join; a request
with none in progress beside it goes at once. The creates need no wait: they arrive together,
released by one audit-log commit. Measured in ``bench/README.md`` (round 7).

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from kms.coalescing import Coalescer
from kms.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_REQUEST_ID = 200
_LEDGER_STOPPED = "the request-id ledger stopped"
DEFAULT_WINDOW_SECONDS = 600.0
DEFAULT_GROUP_LINGER_SECONDS = 0.005


class LedgerStore(Protocol):
    """What the ledger needs from etcd (``EtcdKeyStateStore`` implements it)."""

    @property
    def layout(self) -> Any: ...
    async def grant_lease(self, ttl_seconds: int) -> int: ...
    async def read_requests(self, paths: Sequence[str]) -> list[bytes | None]:
        """Serializable reads of at most ``kms.coalescing.MAX_GROUP`` paths in one round trip."""
        ...

    async def claim_requests(self, claims: Sequence[tuple[str, bytes]], lease_id: int
                             ) -> list[tuple[bool, bytes | None]]:
        """Create-if-absent for at most ``kms.coalescing.MAX_GROUP`` distinct paths:
        (created, existing)."""
        ...


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
        group_linger: float = DEFAULT_GROUP_LINGER_SECONDS,
    ) -> None:
        """``group_linger``: how long a lookup waits for others to share its etcd round trip
        while this ledger already has requests in progress (module docstring); 0 never
        waits."""
        if window_seconds < 1:
            raise ValueError("the idempotency window must be at least 1 s")
        if group_linger < 0:
            raise ValueError("the group linger cannot be negative")
        self._store = store
        self._signer_id = signer_id
        self.window = window_seconds
        self._store_timeout = store_timeout
        self._now = wall_clock
        self._lease: tuple[int, float] | None = None  # id, monotonic time granted
        self._lease_lock = asyncio.Lock()
        self._group_linger = group_linger
        self._in_progress = 0  # calls of ``once`` not yet returned
        self._lookups: Coalescer[tuple[str, bool], bytes | None] = Coalescer(
            self._read_group, "request-id lookups", linger=self._lookup_linger,
            stopped=_LEDGER_STOPPED)
        self._claims: Coalescer[tuple[str, bytes], bool | bytes] = Coalescer(
            self._claim_group, "request-id claims", stopped=_LEDGER_STOPPED)

    async def _read_group(self, lookups: list[tuple[str, bool]]) -> list[bytes | None]:
        """The stored records of a group of (path, new id) lookups, with one etcd read for
        the ids that are not new, and none when all of them are."""
        wanted = [path for path, new in lookups if not new]
        found = iter(await self._store.read_requests(wanted) if wanted else ())
        return [None if new else next(found) for _, new in lookups]

    def _lookup_linger(self, queued: int) -> float:
        """Wait for company only while requests beyond the queued lookups are in progress: a
        busy worker gains whole round trips, an idle one answers at once."""
        return self._group_linger if self._in_progress > queued else 0.0

    async def _claim_group(self, claims: list[tuple[str, bytes]]) -> list[bool | bytes]:
        """True where this claim created its record; else the value stored first. A duplicate
        path within the group loses to its first occurrence, like a concurrent duplicate."""
        lease = await self._window_lease()
        sent: dict[str, tuple[int, int]] = {}  # path: (index in distinct, position in claims)
        distinct: list[tuple[str, bytes]] = []
        for position, (path, value) in enumerate(claims):
            if path not in sent:
                sent[path] = (len(distinct), position)
                distinct.append((path, value))
        outcomes = await self._store.claim_requests(distinct, lease)
        results: list[bool | bytes] = []
        for position, (path, _) in enumerate(claims):
            at, first_position = sent[path]
            created, existing = outcomes[at]
            if position == first_position:
                results.append(True if created else existing or b"{}")
            else:
                results.append(distinct[at][1] if created else existing or b"{}")
        return results

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
        still_valid: Callable[[T], None], new_id: bool = False,
    ) -> T:
        """Run ``action(commit)``; ``action`` calls ``commit(result)`` before it returns the
        result. If a result for this (identity, request id) was stored first — by another
        region, or by the attempt a retry repeats — that stored result is returned instead,
        once it passes ``still_valid``. ``new_id``: the client says it generated the id for
        this call and sends it for the first time; no stored result is then read before
        ``action`` (module docstring).

        Raises ``InvalidArgument`` for a malformed id or one reused for another request,
        ``Unavailable`` when etcd does not take the record in time (nothing is returned then),
        and whatever ``action`` or ``still_valid`` raise.
        """
        if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
            raise InvalidArgument(
                f"request id must be at most {MAX_REQUEST_ID} printable characters")
        path = self._store.layout.request(identity_hash(identity), request_id)
        self._in_progress += 1
        try:
            return await self._once(path, request_id, bound_to, action, encode=encode,
                                    decode=decode, still_valid=still_valid, new_id=new_id)
        finally:
            self._in_progress -= 1

    async def _once(
        self, path: str, request_id: str, bound_to: str,
        action: Callable[[Callable[[T], Awaitable[None]]], Awaitable[T]],
        *, encode: Callable[[T], dict[str, Any]], decode: Callable[[Mapping[str, Any]], T],
        still_valid: Callable[[T], None], new_id: bool,
    ) -> T:
        # A new id goes through the lookup group too, which reads it from nowhere: alone it
        # goes at once, under load it gathers with the others (module docstring).
        found = await self._look_up(path, new_id)
        if found is not None:
            return self._stored(json.loads(found), request_id, bound_to, decode, still_valid)

        async def commit(result: T) -> None:
            record = {"bound_to": bound_to, "owner": self._signer_id,
                      "result": encode(result), "completed_at": self._now()}
            try:
                # Bounded: a caller's deadline is usually a few seconds, and a result that
                # cannot be stored means this region cannot answer now (fail closed).
                async with asyncio.timeout(self._store_timeout):
                    claimed = await self._claims((path, _encode(record)))
            except TimeoutError:
                raise Unavailable(
                    "cannot record the request id: etcd did not answer in time; retry, or "
                    "use another region") from None
            if claimed is not True:
                raise _Answered(json.loads(claimed or b"{}"))

        try:
            return await action(commit)
        except _Answered as answered:
            return self._stored(answered.record, request_id, bound_to, decode, still_valid)

    async def _look_up(self, path: str, new_id: bool) -> bytes | None:
        """The stored record at ``path``, if any. Raises ``Unavailable`` when etcd does not
        answer in time."""
        try:
            async with asyncio.timeout(self._store_timeout):
                # Serializable (the local member's view, no leader round): a result another
                # region stored moments ago may be missed; then this attempt signs, audits and
                # loses the create below, and returns the stored result (docs/adr/0010).
                return await self._lookups((path, new_id))
        except TimeoutError:
            raise Unavailable(
                "cannot look up the request id: etcd did not answer in time; retry, or use "
                "another region") from None

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
