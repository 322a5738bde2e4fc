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
        self.claims = 0

    async def grant_lease(self, ttl_seconds: int) -> int:
        return 1

    async def read_requests(self, paths: Sequence[str]) -> list[bytes | None]:
        self.reads += 1
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
               bound_to: str = "k") -> str:
    return await ledger.once(
        "spiffe://ci", request_id, bound_to, signing(signed, value),
        encode=lambda v: {"v": v}, decode=lambda r: str(r["v"]), still_valid=lambda _: None)


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


