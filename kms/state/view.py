"""The signer's view of key state: a watch-fed copy, and the lease that proves it is current.

DESIGN.md "Fencing", steps 1-2. A signer signs only while

- its etcd lease is provably alive: the monotonic time now is before the time it *sent* its last
  successful keep-alive plus the lease TTL (less a safety margin), since etcd may have reset the
  lease's expiry at any moment after the send, never before; and
- its watch is connected, i.e. not reconnecting and not re-reading a snapshot.

``require_current`` turns anything else into ``Unavailable`` with a message a person can act on.

Seam for fencing step 3 (Revoke waits for acks): given ``signer_id`` and a ``SignerRegistry``
(``EtcdKeyStateStore`` is one), the view writes ``{prefix}/signers/{id}`` under its lease with
the revision it has applied, after each applied change. Revoke itself is not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from kms.domain.policy import AccessPolicy
from kms.errors import NotFound, StateStoreError, Unavailable, WatchCompacted
from kms.ports import Clock, KeyStateStore, StateEvent, StateSnapshot, VersionedKey

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 5.0
_MIN_BACKOFF = 0.05


@runtime_checkable
class SignerRegistry(Protocol):
    async def register_signer(self, signer_id: str, lease_id: int, applied_revision: int) -> None:
        """Write the signer's applied revision under its lease. Raises ``StateStoreError``."""
        ...


class KeyStateView:
    """Key state kept current by a watch, plus the lease proving it. One per signer process.

    Use it from one event loop: ``await start()``, then ``require_current()`` before each
    signature and ``key(name)`` for the state; ``await stop()`` at shutdown.
    """

    def __init__(
        self,
        store: KeyStateStore,
        clock: Clock,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        *,
        keepalive_interval: float | None = None,
        max_backoff: float = 1.0,
        signer_id: str | None = None,
        registry: SignerRegistry | None = None,
        fence_gate: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        if (signer_id is None) != (registry is None):
            raise ValueError("give signer_id and registry together, or neither")
        self._store = store
        self._clock = clock
        self._ttl = lease_ttl
        # etcd leases are whole seconds; the proof below uses the smaller, requested TTL.
        self._grant_ttl = max(1, math.ceil(lease_ttl))
        self._interval = keepalive_interval if keepalive_interval else lease_ttl / 3
        # Covers clock-rate differences between us and the etcd leader, and scheduling jitter.
        self._margin = min(0.5, lease_ttl * 0.1)
        self._max_backoff = max_backoff
        self._signer_id = signer_id
        self._registry = registry
        # Called with revision R before this signer acknowledges R: lets signatures that were
        # authorised by older state finish first, so none is returned after a Revoke at R.
        self._fence_gate = fence_gate

        self._keys: dict[str, VersionedKey] = {}
        self._policy: AccessPolicy | None = None
        self._revision = 0
        self._resume_from = 1  # the revision the next watch starts at
        self._lease_id: int | None = None
        self._lease_valid_until = -math.inf  # monotonic seconds
        self._watch_connected = False
        self._trouble_since: float | None = None  # wall time, for messages
        self._trouble = "not started"
        self._changed = asyncio.Condition()
        self._register_wanted = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Grant the lease, read a snapshot, start the watch and keep-alive tasks.

        Raises ``StateStoreError`` if etcd cannot be reached within the store's retry budget.
        """
        sent = self._clock.monotonic()
        lease_id = await self._store.grant_lease(self._grant_ttl)
        # Register (as having applied nothing) *before* reading state: a Revoke committed after
        # the registration waits for us; one committed before it is in the snapshot.
        await self._register_now(lease_id)
        self._lease_id = lease_id
        self._lease_valid_until = sent + self._ttl
        await self._apply_snapshot(await self._store.snapshot())
        # The snapshot is current as of now; the watch task opens from just after it.
        self._watch_connected = True
        self._trouble_since = None
        self._watch_task = asyncio.create_task(self._watch_loop(resnapshot=False))
        self._tasks.append(asyncio.create_task(self._keepalive_loop()))
        if self._registry is not None:
            self._tasks.append(asyncio.create_task(self._register_loop()))
            self._register_wanted.set()

    async def stop(self) -> None:
        """Cancel the background tasks and revoke the lease (best effort, bounded)."""
        self._stopped = True
        tasks = [*self._tasks, *([self._watch_task] if self._watch_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._watch_task = None
        self._watch_connected = False
        lease_id, self._lease_id = self._lease_id, None
        self._lease_valid_until = -math.inf
        if lease_id is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._store.revoke_lease(lease_id)
            except (StateStoreError, TimeoutError) as e:
                # The lease expires by itself within one TTL; nothing else depends on it.
                log.warning("could not revoke lease %x at shutdown: %s", lease_id, e)

    # -- what signers ask -------------------------------------------------------------------

    def require_current(self) -> None:
        """Return only if this signer can prove its key state is current.

        Raises ``Unavailable`` when the lease is not provably alive (no keep-alive succeeded
        recently enough) or the watch is reconnecting or re-reading a snapshot.
        """
        if self._stopped or not self._tasks:
            raise Unavailable(
                "this signer is not following key state (not started, or shutting down); "
                "retry, or use another region"
            )
        lease_alive = self._clock.monotonic() < self._lease_valid_until - self._margin
        if lease_alive and self._watch_connected:
            return
        since = "just now"
        if self._trouble_since is not None:
            moment = datetime.datetime.fromtimestamp(self._trouble_since, datetime.UTC)
            since = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        raise Unavailable(
            f"this signer cannot prove its key state is current: {self._trouble} since {since}; "
            "retry, or use another region"
        )

    @property
    def current(self) -> bool:
        """``require_current`` as a boolean, for health reporting."""
        try:
            self.require_current()
        except Unavailable:
            return False
        return True

    def key(self, name: str) -> VersionedKey:
        """The key as last applied. Raises ``NotFound`` naming the revision it looked at."""
        found = self._keys.get(name)
        if found is None:
            raise NotFound(
                f"no key named {name!r} in key state at revision {self._revision}; "
                "check the name with 'signet key list'"
            )
        return found

    def all_keys(self) -> list[VersionedKey]:
        """Every key as last applied, ordered by name."""
        return [self._keys[n] for n in sorted(self._keys)]

    def policy(self) -> AccessPolicy | None:
        return self._policy

    @property
    def revision(self) -> int:
        """The store revision of the last applied snapshot or key-state change."""
        return self._revision

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    async def wait_for_revision(self, revision: int, timeout: float) -> None:
        """Wait until changes up to ``revision`` are applied (e.g. after our own write).

        Only key and policy changes move the view's revision, so pass a revision returned by a
        key-state write. Raises ``Unavailable`` after ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self._revision >= revision)
        except TimeoutError:
            raise Unavailable(
                f"key state did not reach revision {revision} within {timeout:g} s (applied "
                f"{self._revision}); the watch on etcd may be lagging, retry"
            ) from None

    # -- applying state ---------------------------------------------------------------------

    async def _apply_snapshot(self, snapshot: StateSnapshot) -> None:
        async with self._changed:
            self._keys = dict(snapshot.keys)
            self._policy = snapshot.policy.policy if snapshot.policy else None
            self._revision = max(self._revision, snapshot.revision)
            self._resume_from = snapshot.revision + 1
            self._changed.notify_all()
        self._register_wanted.set()

    async def _apply(self, event: StateEvent) -> None:
        async with self._changed:
            if event.kind == "key-put" and event.key is not None:
                self._keys[event.name] = event.key
            elif event.kind == "key-deleted":
                self._keys.pop(event.name, None)
            elif event.kind == "policy-put" and event.policy is not None:
                self._policy = event.policy.policy
            elif event.kind == "policy-deleted":
                self._policy = None
            self._revision = max(self._revision, event.revision)
            # Resume *at* this revision, not after it: one transaction can carry several events
            # at one revision, and a stream broken between them would lose the rest. Applying
            # an event twice is harmless (puts and deletes are idempotent).
            self._resume_from = event.revision
            self._changed.notify_all()
        self._register_wanted.set()

    def _note_trouble(self, what: str) -> None:
        if self._trouble_since is None:
            self._trouble_since = self._clock.now()
        self._trouble = what

    def _note_recovered(self) -> None:
        if self._watch_connected and self._clock.monotonic() < self._lease_valid_until:
            self._trouble_since = None

    # -- background tasks -------------------------------------------------------------------

    async def _watch_loop(self, *, resnapshot: bool) -> None:
        backoff = _MIN_BACKOFF
        while True:
            try:
                if resnapshot:
                    await self._apply_snapshot(await self._store.snapshot())
                    resnapshot = False
                events = self._store.watch(self._resume_from)
                self._watch_connected = True
                self._note_recovered()
                async for event in events:
                    await self._apply(event)
                    backoff = _MIN_BACKOFF
                # A watch never ends by itself; treat an end like a broken stream.
                self._watch_connected = False
                self._note_trouble("the key-state watch ended")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            except WatchCompacted as e:
                self._watch_connected = False
                self._note_trouble(f"key-state history was compacted ({e}); re-reading it")
                resnapshot = True
            except StateStoreError as e:
                self._watch_connected = False
                self._note_trouble(f"key-state watch broken: {e.diagnostics()}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    def _restart_watch_with_snapshot(self) -> None:
        self._watch_connected = False
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.create_task(self._watch_loop(resnapshot=True))

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_send = loop.time() + self._interval
        while True:
            await asyncio.sleep(max(0.0, next_send - loop.time()))
            next_send = loop.time() + self._interval
            sent = self._clock.monotonic()
            try:
                # A keep-alive stuck longer than one interval is worthless: the next send
                # would prove more.
                async with asyncio.timeout(self._interval):
                    if self._lease_id is None:
                        await self._regrant()
                        continue
                    ttl = await self._store.keep_alive(self._lease_id)
            except (StateStoreError, TimeoutError) as e:
                detail = e.diagnostics() if isinstance(e, StateStoreError) else "timed out"
                self._note_trouble(f"etcd unreachable: {detail}")
                continue
            if ttl <= 0:
                self._note_trouble("the etcd lease expired")
                self._lease_id = None
                self._lease_valid_until = -math.inf
                with contextlib.suppress(StateStoreError, TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._regrant()
                continue
            self._lease_valid_until = max(self._lease_valid_until, sent + min(ttl, self._ttl))
            self._note_recovered()

    async def _regrant(self) -> None:
        """A new lease after the old one expired.

        While we had no lease, a Revoke may have stopped waiting for us and returned; the watch
        may be behind it. So state is re-read from a snapshot before we claim to be current.
        """
        sent = self._clock.monotonic()
        lease_id = await self._store.grant_lease(self._grant_ttl)
        await self._register_now(lease_id)  # before the snapshot, as in start()
        self._lease_id = lease_id
        self._lease_valid_until = sent + self._ttl
        self._restart_watch_with_snapshot()
        self._register_wanted.set()

    async def _register_now(self, lease_id: int) -> None:
        """Register under ``lease_id`` with the revision applied so far (stale is safe: a
        Revoke then waits for us)."""
        if self._registry is not None and self._signer_id is not None:
            await self._registry.register_signer(self._signer_id, lease_id, self._revision)

    async def _register_loop(self) -> None:
        registry, signer_id = self._registry, self._signer_id
        if registry is None or signer_id is None:
            return
        backoff = _MIN_BACKOFF
        while True:
            await self._register_wanted.wait()
            self._register_wanted.clear()
            lease_id, revision = self._lease_id, self._revision
            if lease_id is None:
                continue
            if self._fence_gate is not None:
                await self._fence_gate(revision)
            try:
                await registry.register_signer(signer_id, lease_id, revision)
                backoff = _MIN_BACKOFF
            except StateStoreError as e:
                log.warning("signer registration at revision %d failed: %s", revision, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                self._register_wanted.set()
