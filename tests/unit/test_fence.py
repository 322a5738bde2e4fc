"""The revocation fence and lifecycle administration, against the in-memory store."""

from __future__ import annotations

import asyncio

import pytest

from kms.admin import SYSTEM, KeyAdministration, LifecycleSettings
from kms.domain.keys import Algorithm, Key, Replication, VersionState
from kms.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from kms.ports import GeneratedKeyPair
from kms.signing import Caller, InflightSignatures
from kms.state.fence import SignerFence
from kms.state.memory import InMemoryKeyStateStore

ADMIN = Caller("spiffe://ops/admin", unrestricted=True)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


class TickingClock(FakeClock):
    """Each reading moves time on a little, as waiting would."""

    def monotonic(self) -> float:
        self.t += 0.01
        return self.t


class CountingHsm:
    def __init__(self) -> None:
        self.made: list[bytes] = []
        self.destroyed: list[bytes] = []

    async def generate_key_pair(self, *, label: str, algorithm: Algorithm,
                                extractable: bool) -> GeneratedKeyPair:
        hsm_id = len(self.made).to_bytes(16, "big")
        self.made.append(hsm_id)
        return GeneratedKeyPair(hsm_id, b"spki-" + hsm_id)

    async def destroy_key_pair(self, hsm_id: bytes) -> None:
        self.destroyed.append(hsm_id)


class InstantView:
    def __init__(self, store: InMemoryKeyStateStore) -> None:
        self.store = store
        self.revision = 0

    def policy(self) -> None:
        return None

    async def wait_for_revision(self, revision: int, timeout: float) -> None:
        self.revision = revision


def new_key() -> Key:
    return Key.new(name="k", algorithm=Algorithm.ECDSA_P256_SHA256,
                   replication=Replication.REGIONAL, public_key_der=b"p", hsm_id=b"h", now=0.0)


def test_fence_waits_for_every_registered_signer_or_its_lease() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = InMemoryKeyStateStore(clock)
        fast = await store.grant_lease(5)
        slow = await store.grant_lease(5)
        await store.register_signer("fast", fast, 10)
        await store.register_signer("slow", slow, 3)
        fence = SignerFence(store, clock, timeout=60)
        waiting = asyncio.ensure_future(fence.wait(10))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # "slow" has not applied revision 10
        clock.t += 4
        await store.keep_alive(fast)
        clock.t += 2  # slow's lease, and with it its registration, lapses; fast's lives on
        report = await asyncio.wait_for(waiting, 1)
        assert report.acknowledged == ("fast",)
        assert report.lapsed == ("slow",)

    asyncio.run(scenario())


def test_fence_names_the_signers_behind_when_it_times_out() -> None:
    async def scenario() -> None:
        clock = TickingClock()
        store = InMemoryKeyStateStore(clock)
        lease = await store.grant_lease(5)
        await store.register_signer("stuck", lease, 1)
        fence = SignerFence(store, clock, timeout=0.5)
        with pytest.raises(Unavailable, match="signers stuck have not acknowledged"):
            await fence.wait(5)

    asyncio.run(scenario())


def administration() -> tuple[KeyAdministration, InMemoryKeyStateStore, CountingHsm]:
    clock = FakeClock()
    store = InMemoryKeyStateStore(clock)
    hsm = CountingHsm()
    admin = KeyAdministration(hsm=hsm, store=store, view=InstantView(store),  # type: ignore[arg-type]
                              clock=clock, fence=SignerFence(store, clock, timeout=1),
                              settings=LifecycleSettings(100, 10),
                              # the lifecycle engine itself, as the insecure dev mode runs it
                              ceremonies_required=False)
    return admin, store, hsm


def test_revoke_returns_a_fence_report_and_is_idempotent() -> None:
    async def scenario() -> None:
        admin, store, _ = administration()
        await store.create_key(new_key())
        first = await admin.revoke(ADMIN, "k", 1)
        assert first.key.key.version(1).state is VersionState.REVOKED
        again = await admin.revoke(ADMIN, "k", 1)
        assert again.key.mod_revision == first.key.mod_revision  # nothing written twice

    asyncio.run(scenario())


def test_a_rotation_that_loses_the_swap_removes_its_new_hsm_key() -> None:
    async def scenario() -> None:
        admin, store, hsm = administration()
        await store.create_key(new_key())
        real_get = store.get_key

        async def stale_get(name: str):  # type: ignore[no-untyped-def]
            current = await real_get(name)
            # Someone else rotates between our read and our write.
            other = current.key.rotate(now=1.0, public_key_der=b"q", hsm_id=b"other")
            await store.update_key(other, current.mod_revision)
            return current

        store.get_key = stale_get  # type: ignore[method-assign]
        with pytest.raises(Conflict, match="changed by someone else"):
            await admin.rotate(ADMIN, "k")
        assert hsm.destroyed == hsm.made  # the loser's key pair is gone again
        store.get_key = real_get  # type: ignore[method-assign]
        assert len((await store.get_key("k")).key.versions) == 2

    asyncio.run(scenario())


def test_destruction_waits_are_bounded_by_the_cluster_settings() -> None:
    async def scenario() -> None:
        admin, store, _ = administration()
        key = new_key().rotate(now=1.0, public_key_der=b"q", hsm_id=b"i")
        await store.create_key(key)
        with pytest.raises(InvalidArgument, match="at least 10 s"):
            await admin.schedule_destroy(ADMIN, "k", 1, waiting_seconds=5)
        default = await admin.schedule_destroy(ADMIN, "k", 1)
        assert default.key.version(1).destroy_after == 1000.0 + 100
        with pytest.raises(FailedPrecondition, match="primary version; rotate first"):
            await admin.schedule_destroy(ADMIN, "k", 2, waiting_seconds=50)

    asyncio.run(scenario())


def test_acknowledgement_waits_for_signatures_authorised_by_older_state() -> None:
    async def scenario() -> None:
        inflight = InflightSignatures()
        with inflight.track(5):
            gate = asyncio.ensure_future(inflight.drained_below(6))
            await asyncio.sleep(0.01)
            assert not gate.done()
            await inflight.drained_below(5)  # newer-or-equal work never blocks
        await asyncio.wait_for(gate, 1)

    asyncio.run(scenario())


def test_direct_lifecycle_calls_need_a_ceremony_except_for_maintenance() -> None:
    async def scenario() -> None:
        _, store, hsm = administration()
        await store.create_key(new_key())
        strict = KeyAdministration(hsm=hsm, store=store, view=InstantView(store),  # type: ignore[arg-type]
                                   clock=FakeClock(), settings=LifecycleSettings(100, 10))
        made = len(hsm.made)
        with pytest.raises(PermissionDenied, match="signet ceremony propose create-key"):
            await strict.create_key(ADMIN, name="k2", algorithm=Algorithm.ED25519,
                                    replication=Replication.REGIONAL)
        with pytest.raises(PermissionDenied, match="signet ceremony propose rotate NAME"):
            await strict.rotate(ADMIN, "k")
        with pytest.raises(PermissionDenied, match="propose revoke"):
            await strict.revoke(ADMIN, "k", 1)
        assert len(hsm.made) == made  # refused before the HSM was asked for anything
        # The maintenance leader's SYSTEM caller (compared by object identity, so no
        # certificate URI can impersonate it) carries out schedules without a ceremony.
        rotated = await strict.rotate(SYSTEM, "k")
        assert rotated.key.primary_version == 2
        impostor = Caller(SYSTEM.identity, unrestricted=True)
        with pytest.raises(PermissionDenied):
            await strict.rotate(impostor, "k")

    asyncio.run(scenario())
