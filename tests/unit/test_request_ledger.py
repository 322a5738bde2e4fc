"""The request-id ledger with an in-memory store: one signature per id, coalesced round trips."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence

import pytest

from kms.errors import InvalidArgument
from kms.requests import RequestLedger


class Layout:
    def request(self, identity: str, request_id: str) -> str:
        return f"/requests/{identity}/{request_id}"


class MemoryLedgerStore:
    """Records in a dict; counts round trips."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.layout = Layout()
        self.reads = 0
        self.read_paths: list[list[str]] = []
        self.claims = 0

    async def grant_lease(self, ttl_seconds: int) -> int:
        return 1

    async def read_requests(self, paths: Sequence[str]) -> list[bytes | None]:
        self.reads += 1
        self.read_paths.append(list(paths))
        await asyncio.sleep(0.001)
        return [self.records.get(path) for path in paths]

    async def claim_requests(self, claims: Sequence[tuple[str, bytes]], lease_id: int
                             ) -> list[tuple[bool, bytes | None]]:
        self.claims += 1
        assert len({path for path, _ in claims}) == len(claims)
        await asyncio.sleep(0.001)
        out: list[tuple[bool, bytes | None]] = []
        for path, value in claims:
            if path in self.records:
                out.append((False, self.records[path]))
            else:
                self.records[path] = value
                out.append((True, None))
        return out


def signing(counter: list[int], value: str) -> Callable[
        [Callable[[str], Awaitable[None]]], Awaitable[str]]:
    async def action(commit: Callable[[str], Awaitable[None]]) -> str:
        counter.append(1)
        await commit(value)
        return value

    return action


async def once(ledger: RequestLedger, request_id: str, value: str, signed: list[int],
               bound_to: str = "k", *, new_id: bool = False) -> str:
    return await ledger.once(
        "spiffe://ci", request_id, bound_to, signing(signed, value),
        encode=lambda v: {"v": v}, decode=lambda r: str(r["v"]), still_valid=lambda _: None,
        new_id=new_id)


def test_concurrent_requests_share_round_trips() -> None:
    store = MemoryLedgerStore()

    async def scenario() -> list[str]:
        ledger = RequestLedger(store, signer_id="s")
        signed: list[int] = []
        results = await asyncio.gather(*(once(ledger, f"r{n}", f"sig{n}", signed)
                                         for n in range(200)))
        assert len(signed) == 200
        return results

    assert asyncio.run(scenario()) == [f"sig{n}" for n in range(200)]
    assert len(store.records) == 200
    assert store.reads < 20, store.reads
    assert store.claims < 20, store.claims


def test_a_request_id_is_answered_with_one_signature() -> None:
    store = MemoryLedgerStore()

    async def scenario() -> list[str]:
        ledger = RequestLedger(store, signer_id="s")
        signed: list[int] = []
        # Concurrent duplicates: each signs (none was stored when they looked), one create
        # wins, and every one of them returns the winner's signature.
        racing = await asyncio.gather(*(once(ledger, "same", f"sig{n}", signed)
                                        for n in range(5)))
        assert len(set(racing)) == 1
        # A retry after the answer is served from the record without signing.
        before = len(signed)
        again = await once(ledger, "same", "other", signed)
        assert len(signed) == before
        return [*racing, again]

    results = asyncio.run(scenario())
    assert len(set(results)) == 1
    assert json.loads(store.records["/requests/" + _hash("spiffe://ci") + "/same"])["result"] \
        == {"v": results[0]}


def test_a_new_request_id_is_not_looked_up_before_signing() -> None:
    store = MemoryLedgerStore()

    async def scenario() -> str:
        ledger = RequestLedger(store, signer_id="s")
        return await once(ledger, "fresh", "sig", [], new_id=True)

    assert asyncio.run(scenario()) == "sig"
    assert (store.reads, store.claims) == (0, 1)


def test_under_load_a_new_id_waits_with_its_group_but_is_not_read() -> None:
    """Under load the lookup groups are where concurrent requests gather (their audit commits
    and creates then share round trips), so a new id joins one; only the ids that are not new
    are read from etcd."""
    store = MemoryLedgerStore()

    async def scenario() -> list[str]:
        ledger = RequestLedger(store, signer_id="s", group_linger=0.05)
        release = asyncio.Event()

        async def slow(commit: Callable[[str], Awaitable[None]]) -> str:
            await release.wait()
            await commit("slow")
            return "slow"

        first = asyncio.create_task(ledger.once(
            "spiffe://ci", "busy", "k", slow, encode=lambda v: {"v": v},
            decode=lambda r: str(r["v"]), still_valid=lambda _: None, new_id=True))
        await asyncio.sleep(0.01)  # the first is signing: the ledger is busy
        together = await asyncio.gather(
            once(ledger, "fresh-1", "sig1", [], new_id=True),
            once(ledger, "retried", "sig2", []),
            once(ledger, "fresh-2", "sig3", [], new_id=True))
        release.set()
        return [await first, *together]

    assert asyncio.run(scenario()) == ["slow", "sig1", "sig2", "sig3"]
    assert store.read_paths == [["/requests/" + _hash("spiffe://ci") + "/retried"]]


def test_under_load_a_group_of_new_ids_makes_no_read() -> None:
    store = MemoryLedgerStore()

    async def scenario() -> None:
        ledger = RequestLedger(store, signer_id="s", group_linger=0.01)
        signed: list[int] = []
        await asyncio.gather(*(once(ledger, f"n{n}", f"sig{n}", signed, new_id=True)
                               for n in range(20)))
        assert len(signed) == 20

    asyncio.run(scenario())
    assert (store.reads, len(store.records)) == (0, 20)


def test_an_id_wrongly_marked_new_still_gets_its_stored_signature() -> None:
    """The mark is a hint: a retry that claims to be a first attempt signs again, loses the
    create, and returns what the first attempt stored."""
    store = MemoryLedgerStore()

    async def scenario() -> tuple[str, str, int]:
        ledger = RequestLedger(store, signer_id="s")
        signed: list[int] = []
        first = await once(ledger, "r", "sig1", signed, new_id=True)
        retry = await once(ledger, "r", "sig2", signed, new_id=True)
        return first, retry, len(signed)

    assert asyncio.run(scenario()) == ("sig1", "sig1", 2)
    assert store.reads == 0


def test_an_id_wrongly_marked_new_for_another_request_is_refused() -> None:
    store = MemoryLedgerStore()

    async def scenario() -> None:
        ledger = RequestLedger(store, signer_id="s")
        await once(ledger, "r", "sig", [], bound_to="k1", new_id=True)
        with pytest.raises(InvalidArgument, match="different request"):
            await once(ledger, "r", "sig", [], bound_to="k2", new_id=True)

    asyncio.run(scenario())


def test_a_request_id_reused_for_another_request_is_refused() -> None:
    store = MemoryLedgerStore()

    async def scenario() -> None:
        ledger = RequestLedger(store, signer_id="s")
        signed: list[int] = []
        await once(ledger, "r", "sig", signed, bound_to="k1")
        with pytest.raises(InvalidArgument, match="different request"):
            await once(ledger, "r", "sig", signed, bound_to="k2")

    asyncio.run(scenario())


def _hash(identity: str) -> str:
    from kms.requests import identity_hash

    return identity_hash(identity)




class GatedLedgerStore(MemoryLedgerStore):
    """Records the size of every lookup group."""

    def __init__(self) -> None:
        super().__init__()
        self.lookup_groups: list[int] = []

    async def read_requests(self, paths: Sequence[str]) -> list[bytes | None]:
        self.lookup_groups.append(len(paths))
        return await super().read_requests(paths)


def test_a_busy_ledger_holds_a_lookup_back_for_the_requests_arriving_next() -> None:
    store = GatedLedgerStore()

    async def scenario() -> None:
        ledger = RequestLedger(store, signer_id="s", group_linger=0.5)
        signing_started, release = asyncio.Event(), asyncio.Event()

        async def slow(commit: Callable[[str], Awaitable[None]]) -> str:
            signing_started.set()
            await release.wait()
            await commit("slow")
            return "slow"

        first = asyncio.create_task(ledger.once(
            "spiffe://ci", "first", "k", slow, encode=lambda v: {"v": v},
            decode=lambda r: str(r["v"]), still_valid=lambda _: None))
        await signing_started.wait()  # "first" is past its lookup, signing
        signed: list[int] = []
        second = asyncio.create_task(once(ledger, "second", "sig2", signed))
        await asyncio.sleep(0.02)  # well inside the linger
        third = asyncio.create_task(once(ledger, "third", "sig3", signed))
        assert await second == "sig2"
        assert await third == "sig3"
        release.set()
        assert await first == "slow"

    asyncio.run(scenario())
    # The lone first lookup went alone; the two that came while it was signing went together.
    assert store.lookup_groups == [1, 2]


def test_an_idle_ledger_sends_a_lone_lookup_at_once() -> None:
    store = GatedLedgerStore()

    async def scenario() -> str:
        # A linger longer than the deadline: only a lookup that does not wait can answer.
        ledger = RequestLedger(store, signer_id="s", group_linger=60.0)
        async with asyncio.timeout(10):
            return await once(ledger, "alone", "sig", [])

    assert asyncio.run(scenario()) == "sig"
    assert store.lookup_groups == [1]


def test_a_negative_group_linger_is_refused() -> None:
    with pytest.raises(ValueError, match="linger"):
        RequestLedger(MemoryLedgerStore(), signer_id="s", group_linger=-1)
