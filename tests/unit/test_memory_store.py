"""InMemoryKeyStateStore keeps etcd's semantics: revisions, CAS, watch, compaction, leases."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from kms.domain.keys import Algorithm, Key, Replication
from kms.domain.policy import AccessPolicy, Binding
from kms.errors import AlreadyExists, Conflict, NotFound, StateStoreError, WatchCompacted
from kms.ports import StateEvent
from kms.state.memory import InMemoryKeyStateStore

T = TypeVar("T")


class FakeClock:
    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 100.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(bounded())


def make_key(name: str, period: int | None = None) -> Key:
    return Key.new(
        name=name,
        algorithm=Algorithm.ED25519,
        replication=Replication.REGIONAL,
        public_key_der=b"spki-" + name.encode(),
        hsm_id=b"\x01",
        now=1.0,
        rotation_period_seconds=period,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> InMemoryKeyStateStore:
    return InMemoryKeyStateStore(clock)


def test_create_get_update_with_revisions(store: InMemoryKeyStateStore) -> None:
    async def scenario() -> None:
        created = await store.create_key(make_key("a"))
        assert await store.get_key("a") == created
        with pytest.raises(AlreadyExists):
            await store.create_key(make_key("a", period=5))
        changed = dataclasses.replace(created.key, rotation_period_seconds=9)
        updated = await store.update_key(changed, created.mod_revision)
        assert updated.mod_revision == created.mod_revision + 1
        assert await store.current_revision() == updated.mod_revision
        with pytest.raises(Conflict, match="read it again"):
            await store.update_key(created.key, created.mod_revision)
        assert (await store.get_key("a")).key == changed  # the stale write changed nothing
        with pytest.raises(NotFound):
            await store.update_key(make_key("b"), 1)
        with pytest.raises(NotFound):
            await store.get_key("b")

    run(scenario())


def test_policy_cas_rules(store: InMemoryKeyStateStore) -> None:
    p1 = AccessPolicy((Binding("x", admin=True),))
    p2 = AccessPolicy(())

    async def scenario() -> None:
        first = await store.put_policy(p1, None)
        with pytest.raises(Conflict):
            await store.put_policy(p2, None)
        with pytest.raises(Conflict):
            await store.put_policy(p2, first.mod_revision + 7)
        second = await store.put_policy(p2, first.mod_revision)
        third = await store.put_policy(p1, 0)
        assert third.mod_revision > second.mod_revision
        assert await store.get_policy() == third

    run(scenario())


def test_snapshot_and_watch_replay_then_follow(store: InMemoryKeyStateStore) -> None:
    async def scenario() -> None:
        a = await store.create_key(make_key("a"))
        snapshot = await store.snapshot()
        assert snapshot.revision == a.mod_revision
        assert snapshot.keys == {"a": a}

        seen: list[StateEvent] = []

        async def follow() -> None:
            async for event in store.watch(a.mod_revision):
                seen.append(event)
                if len(seen) == 3:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        b = await store.create_key(make_key("b"))
        await store.delete_key("a")
        await follower
        assert [(e.kind, e.name) for e in seen] == [
            ("key-put", "a"),
            ("key-put", "b"),
            ("key-deleted", "a"),
        ]
        assert seen[1].key == b

    run(scenario())


def test_compaction_and_broken_streams(store: InMemoryKeyStateStore) -> None:
    async def scenario() -> None:
        a = await store.create_key(make_key("a"))
        await store.create_key(make_key("b"))
        now = await store.current_revision()
        store.compact(now)
        with pytest.raises(WatchCompacted) as caught:
            async for _ in store.watch(a.mod_revision):
                pass
        assert caught.value.compact_revision == now

        async def follow() -> None:
            async for _ in store.watch(now + 1):
                pass

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        store.break_watches()
        with pytest.raises(StateStoreError):
            await follower
        store.unavailable = True
        with pytest.raises(StateStoreError):
            await store.snapshot()

    run(scenario())


def test_leases_expire_by_the_clock_and_take_registrations(
    store: InMemoryKeyStateStore, clock: FakeClock
) -> None:
    async def scenario() -> None:
        lease = await store.grant_lease(5)
        await store.register_signer("s1", lease, 7)
        assert store.registration("s1") == 7
        clock.advance(4)
        assert await store.keep_alive(lease) == 5
        clock.advance(4)
        assert store.registration("s1") == 7  # refreshed 4 s ago, TTL 5
        clock.advance(1.5)
        assert await store.keep_alive(lease) == 0
        assert store.registration("s1") is None
        with pytest.raises(StateStoreError, match="not found"):
            await store.register_signer("s1", lease, 8)
        other = await store.grant_lease(5)
        await store.register_signer("s2", other, 1)
        await store.revoke_lease(other)
        assert store.registration("s2") is None

    run(scenario())
