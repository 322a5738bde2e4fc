"""KeyStateView against the in-memory store and a fake clock: no processes, no real time."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kms.domain.keys import Algorithm, Key, Replication
from kms.domain.policy import AccessPolicy
from kms.errors import NotFound, StateStoreError, Unavailable
from kms.ports import StateEvent, StateSnapshot
from kms.state.memory import InMemoryKeyStateStore
from kms.state.view import KeyStateView

T = TypeVar("T")
TTL = 1.0
INTERVAL = 0.005  # real seconds between keep-alives; lease proofs use the fake clock


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


class FlakyStore(InMemoryKeyStateStore):
    """Lets a test fail keep-alives or watch openings alone, and counts snapshots."""

    fail_keepalive = False
    fail_watch = False
    snapshots = 0

    async def keep_alive(self, lease_id: int) -> int:
        if self.fail_keepalive:
            raise StateStoreError("keep-alive failed (test)")
        return await super().keep_alive(lease_id)

    async def snapshot(self) -> StateSnapshot:
        self.snapshots += 1
        return await super().snapshot()

    def watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        if self.fail_watch:
            return self._failing_watch()
        return super().watch(start_revision)

    async def _failing_watch(self) -> AsyncIterator[StateEvent]:
        raise StateStoreError("watch refused (test)")
        yield  # pragma: no cover  (makes this an async generator)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(bounded())


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        # Polls state owned by the view's tasks; there is no event to wait on from outside.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


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
def store(clock: FakeClock) -> FlakyStore:
    return FlakyStore(clock)


def new_view(store: FlakyStore, clock: FakeClock, **kwargs: Any) -> KeyStateView:
    return KeyStateView(store, clock, lease_ttl=TTL, keepalive_interval=INTERVAL, **kwargs)


def test_starts_from_a_snapshot_and_applies_changes(store: FlakyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        a = await store.create_key(make_key("a"))
        policy = await store.put_policy(AccessPolicy(()), None)
        view = new_view(store, clock)
        with pytest.raises(Unavailable, match="not following"):
            view.require_current()
        await view.start()
        view.require_current()
        assert view.key("a") == a
        assert view.policy() == policy.policy
        assert view.revision == policy.mod_revision

        b = await store.create_key(make_key("b"))
        await view.wait_for_revision(b.mod_revision, timeout=1)
        assert [v.key.name for v in view.all_keys()] == ["a", "b"]
        await store.delete_key("a")
        await eventually(lambda: len(view.all_keys()) == 1)
        with pytest.raises(NotFound, match="no key named 'a' in key state at revision"):
            view.key("a")
        with pytest.raises(Unavailable, match="did not reach revision 999"):
            await view.wait_for_revision(999, timeout=0.05)
        await view.stop()
        with pytest.raises(Unavailable):
            view.require_current()

    run(scenario())


def test_compacted_history_is_replaced_by_a_fresh_snapshot(
    store: FlakyStore, clock: FakeClock
) -> None:
    async def scenario() -> None:
        a = await store.create_key(make_key("a"))
        b = await store.create_key(make_key("b"))
        view = new_view(store, clock)
        await view.start()
        assert store.snapshots == 1
        # While the view is disconnected: a deletion and an update, then compaction. No await
        # in between, so the view's watch task sees none of it live.
        store.break_watches()
        await store.delete_key("a")
        b2 = await store.update_key(
            dataclasses.replace(b.key, rotation_period_seconds=3), b.mod_revision
        )
        store.compact(await store.current_revision())

        await eventually(lambda: store.snapshots == 2 and view.revision == b2.mod_revision)
        # The deletion was only in the snapshot.
        assert [v.key.name for v in view.all_keys()] == ["b"]
        assert view.key("b") == b2
        assert a.mod_revision < view.revision
        await eventually(lambda: view.current)
        c = await store.create_key(make_key("c"))  # and the watch follows again afterwards
        await view.wait_for_revision(c.mod_revision, timeout=1)
        await view.stop()

    run(scenario())


def test_refuses_when_keepalives_fail_and_recovers(store: FlakyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        view = new_view(store, clock)
        await view.start()
        lease = view.lease_id
        view.require_current()

        store.fail_keepalive = True
        await asyncio.sleep(INTERVAL * 5)  # several keep-alives fail
        clock.advance(0.85)  # last success was sent 0.85 s ago: TTL 1 s less margin 0.1 s
        view.require_current()
        clock.advance(0.1)
        with pytest.raises(Unavailable) as refused:
            view.require_current()
        message = str(refused.value)
        assert "cannot prove its key state is current" in message
        assert "etcd unreachable" in message
        assert "retry, or use another region" in message

        store.fail_keepalive = False
        await eventually(lambda: view.current)
        assert view.lease_id == lease  # the lease never lapsed in the store

        # Now let the lease expire in the store: the view takes a new lease and re-reads state.
        store.fail_keepalive = True
        await asyncio.sleep(INTERVAL * 5)
        clock.advance(1.5)
        assert not view.current
        snapshots = store.snapshots
        store.fail_keepalive = False
        await eventually(lambda: view.current)
        assert view.lease_id != lease
        assert store.snapshots == snapshots + 1
        await view.stop()

    run(scenario())


def test_refuses_while_the_watch_cannot_reconnect(store: FlakyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        view = new_view(store, clock, max_backoff=0.01)
        await view.start()
        store.fail_watch = True
        store.break_watches()
        await eventually(lambda: not view.current)
        with pytest.raises(Unavailable, match="watch"):
            view.require_current()
        created = await store.create_key(make_key("late"))
        store.fail_watch = False
        await view.wait_for_revision(created.mod_revision, timeout=1)
        await eventually(lambda: view.current)
        assert view.key("late") == created  # resumed from the last revision, nothing lost
        await view.stop()

    run(scenario())


def test_registers_applied_revision_under_its_lease(store: FlakyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        view = new_view(store, clock, signer_id="signer-1", registry=store)
        await view.start()
        await eventually(lambda: store.registration("signer-1") == view.revision)
        created = await store.create_key(make_key("a"))
        await eventually(lambda: store.registration("signer-1") == created.mod_revision)
        await view.stop()
        assert store.registration("signer-1") is None  # the lease was revoked at stop

    run(scenario())
