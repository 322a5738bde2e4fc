"""An in-memory ``KeyStateStore`` with etcd's semantics, for unit tests of pure logic.

It keeps one revision counter for every write (as etcd does), compare-and-swap on
``mod_revision``, a history that ``compact`` trims, watches fed from that history, and leases
that expire by the injected clock. Tests can make it unreachable (``unavailable = True``) or
break its watch streams (``break_watches``) to drive failure paths without processes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kms.domain.keys import Key
from kms.domain.policy import AccessPolicy
from kms.errors import AlreadyExists, Conflict, NotFound, StateStoreError, WatchCompacted
from kms.ports import (
    Clock,
    SignerRegistrations,
    StateEvent,
    StateSnapshot,
    VersionedKey,
    VersionedPolicy,
)
from kms.state.etcd import DEFAULT_PREFIX, StateLayout, state_layout


@dataclass(frozen=True)
class _Record:
    value: Key | AccessPolicy | int | str  # int: a signer's applied revision; str: a leader
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass
class _Lease:
    ttl: int
    expires_at: float


class InMemoryKeyStateStore:
    """``KeyStateStore`` in process memory. Not thread-safe; use from one event loop."""

    def __init__(self, clock: Clock, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.clock = clock
        self.layout: StateLayout = state_layout(prefix)
        self._revision = 1  # etcd's first revision, before any write
        self._records: dict[str, _Record] = {}
        self._history: list[StateEvent] = []
        self._compacted = 0
        self._watchers: set[asyncio.Queue[StateEvent | Exception]] = set()
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._unavailable = False
        self.closed = False

    # -- test controls ----------------------------------------------------------------------

    @property
    def unavailable(self) -> bool:
        return self._unavailable

    @unavailable.setter
    def unavailable(self, value: bool) -> None:
        """While true every call raises ``StateStoreError`` and open watches break."""
        self._unavailable = value
        if value:
            self.break_watches()

    def break_watches(self) -> None:
        """Make every open watch raise ``StateStoreError`` (a broken stream)."""
        for queue in self._watchers:
            queue.put_nowait(StateStoreError("in-memory watch stream broken by the test"))

    def compact(self, revision: int) -> None:
        """Forget history below ``revision``; watches starting earlier raise ``WatchCompacted``."""
        if revision > self._revision:
            raise ValueError(f"cannot compact beyond the current revision {self._revision}")
        self._compacted = max(self._compacted, revision)
        self._history = [e for e in self._history if e.revision >= self._compacted]

    def registration(self, signer_id: str) -> int | None:
        """The applied revision a signer registered, None if absent or its lease expired."""
        self._expire_leases()
        record = self._records.get(self.layout.signer(signer_id))
        return record.value if record is not None and isinstance(record.value, int) else None

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    # -- internals --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._unavailable:
            raise StateStoreError("in-memory store is unavailable (simulated etcd outage)")
        self._expire_leases()

    def _expire_leases(self) -> None:
        now = self.clock.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        del self._leases[lease_id]
        attached = [path for path, r in self._records.items() if r.lease == lease_id]
        if attached:
            self._revision += 1
            for path in attached:
                del self._records[path]

    def _write(self, path: str, value: Key | AccessPolicy | int | str, lease: int = 0) -> int:
        self._revision += 1
        previous = self._records.get(path)
        created = previous.create_revision if previous else self._revision
        self._records[path] = _Record(value, created, self._revision, lease)
        event: StateEvent | None = None
        if isinstance(value, Key):
            event = StateEvent(
                self._revision, "key-put", name=value.name, key=VersionedKey(value, self._revision)
            )
        elif isinstance(value, AccessPolicy):
            event = StateEvent(
                self._revision, "policy-put", policy=VersionedPolicy(value, self._revision)
            )
        if event is not None:
            self._history.append(event)
            for queue in self._watchers:
                queue.put_nowait(event)
        return self._revision

    # -- KeyStateStore ----------------------------------------------------------------------

    async def create_key(self, key: Key) -> VersionedKey:
        self._check()
        if self.layout.key(key.name) in self._records:
            raise AlreadyExists(f"a key named {key.name!r} already exists")
        return VersionedKey(key, self._write(self.layout.key(key.name), key))

    async def get_key(self, name: str) -> VersionedKey:
        self._check()
        record = self._records.get(self.layout.key(name))
        if record is None or not isinstance(record.value, Key):
            raise NotFound(f"no key named {name!r}")
        return VersionedKey(record.value, record.mod_revision)

    async def update_key(self, key: Key, expected_mod_revision: int) -> VersionedKey:
        self._check()
        record = self._records.get(self.layout.key(key.name))
        if record is None:
            raise NotFound(f"key {key.name!r} was deleted; nothing to update")
        if record.mod_revision != expected_mod_revision:
            raise Conflict(
                f"key {key.name!r} changed at revision {record.mod_revision} after it was read "
                f"at revision {expected_mod_revision}; read it again and retry"
            )
        return VersionedKey(key, self._write(self.layout.key(key.name), key))

    async def delete_key(self, name: str) -> None:
        """Delete a key record (etcd allows it; tests use it to produce delete events)."""
        self._check()
        if self._records.pop(self.layout.key(name), None) is None:
            raise NotFound(f"no key named {name!r}")
        self._revision += 1
        event = StateEvent(self._revision, "key-deleted", name=name)
        self._history.append(event)
        for queue in self._watchers:
            queue.put_nowait(event)

    async def list_keys(self) -> list[VersionedKey]:
        return sorted((await self.snapshot()).keys.values(), key=lambda v: v.key.name)

    async def get_policy(self) -> VersionedPolicy | None:
        self._check()
        record = self._records.get(self.layout.policy)
        if record is None or not isinstance(record.value, AccessPolicy):
            return None
        return VersionedPolicy(record.value, record.mod_revision)

    async def put_policy(
        self, policy: AccessPolicy, expected_mod_revision: int | None
    ) -> VersionedPolicy:
        self._check()
        record = self._records.get(self.layout.policy)
        if expected_mod_revision is None and record is not None:
            raise Conflict(f"an access policy exists already (revision {record.mod_revision})")
        if expected_mod_revision not in (None, 0) and (
            record is None or record.mod_revision != expected_mod_revision
        ):
            raise Conflict(
                f"the access policy changed after it was read at revision "
                f"{expected_mod_revision}; read it again and retry"
            )
        return VersionedPolicy(policy, self._write(self.layout.policy, policy))

    async def snapshot(self) -> StateSnapshot:
        self._check()
        keys = {
            r.value.name: VersionedKey(r.value, r.mod_revision)
            for r in self._records.values()
            if isinstance(r.value, Key)
        }
        policy = await self.get_policy()
        return StateSnapshot(self._revision, keys, policy)

    def watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        return self._watch(start_revision)

    async def _watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        self._check()
        if start_revision < self._compacted:
            raise WatchCompacted(
                f"revision {start_revision} was compacted (compact revision {self._compacted})",
                compact_revision=self._compacted,
            )
        queue: asyncio.Queue[StateEvent | Exception] = asyncio.Queue()
        # Registering and reading the backlog with no await in between: nothing is missed or
        # delivered twice.
        self._watchers.add(queue)
        backlog = [e for e in self._history if e.revision >= start_revision]
        try:
            for event in backlog:
                yield event
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.revision >= start_revision:
                    yield item
        finally:
            self._watchers.discard(queue)

    async def grant_lease(self, ttl_seconds: int) -> int:
        self._check()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl_seconds, self.clock.monotonic() + ttl_seconds)
        return lease_id

    async def keep_alive(self, lease_id: int) -> int:
        self._check()
        lease = self._leases.get(lease_id)
        if lease is None:
            return 0
        lease.expires_at = self.clock.monotonic() + lease.ttl
        return lease.ttl

    async def revoke_lease(self, lease_id: int) -> None:
        self._check()
        if lease_id in self._leases:
            self._drop_lease(lease_id)

    async def current_revision(self) -> int:
        self._check()
        return self._revision

    async def register_signer(self, signer_id: str, lease_id: int, applied_revision: int) -> None:
        """Record the signer's applied revision under its lease (see ``EtcdKeyStateStore``)."""
        self._check()
        if lease_id not in self._leases:
            raise StateStoreError(f"lease {lease_id:x} not found; it expired or was revoked")
        self._write(self.layout.signer(signer_id), applied_revision, lease=lease_id)

    async def signer_registrations(self) -> SignerRegistrations:
        self._check()
        applied = {
            path.removeprefix(self.layout.signers_dir): record.value
            for path, record in self._records.items()
            if path.startswith(self.layout.signers_dir) and isinstance(record.value, int)
        }
        return SignerRegistrations(self._revision, applied)

    async def try_lead(self, role: str, candidate: str, lease_id: int) -> bool:
        self._check()
        path = self.layout.leader(role)
        current = self._records.get(path)
        if current is None:
            if lease_id not in self._leases:
                raise StateStoreError(f"lease {lease_id:x} not found; it expired or was revoked")
            self._write(path, candidate, lease=lease_id)
            return True
        return current.value == candidate

    async def close(self) -> None:
        self.closed = True
        self.break_watches()
