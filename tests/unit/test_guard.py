"""signer.guard without a server: token buckets, the bounded denial audit, the config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms.errors import InvalidArgument
from signer import guard as guard_module
from signer.config import ServerConfig
from signer.guard import DenialAuditor, GuardInterceptor, LimitsConfig, TokenBucket
from signer.limits import IdentityLimits, Refusal

BASE = {"region": "eu", "listen": "127.0.0.1:0", "insecure": True,
        "etcd": {"endpoints": ["127.0.0.1:2379"]}, "hsm": {"token_label": "t", "pin_env": "P"}}


def test_a_token_bucket_grants_its_burst_then_says_when_to_retry() -> None:
    bucket = TokenBucket(rate=10.0, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0  # one token back after 1/rate


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def record_event(self, kind: str, fields: Any) -> int:
        self.events.append({"kind": kind, **fields})
        return len(self.events)

    async def record_signature(self, **_: Any) -> int:
        raise AssertionError


def test_denials_are_audited_at_a_bounded_rate_and_drops_are_counted() -> None:
    now = [0.0]
    auditor = DenialAuditor(LimitsConfig(denial_audit_per_identity_rps=1,
                                         denial_audit_burst=5, denial_audit_total_rps=100),
                            clock=lambda: now[0])
    recorder = Recorder()

    async def flood() -> None:
        auditor.attach(recorder)
        for _ in range(100):
            auditor.denied(identity="spiffe://x/a", method="SignDigest", key="k",
                           code=grpc.StatusCode.PERMISSION_DENIED, reason="no")
        now[0] = 2.0
        auditor.denied(identity="spiffe://x/a", method="SignDigest", key="k",
                       code=grpc.StatusCode.PERMISSION_DENIED, reason="no")
        await auditor.drain()

    asyncio.run(flood())
    assert len(recorder.events) == 6
    assert recorder.events[-1]["dropped"] == 95
    assert {e["kind"] for e in recorder.events} == {"security"}
    assert auditor.dropped == 95


def test_the_limits_section_is_validated() -> None:
    config = ServerConfig.from_dict({**BASE, "limits": {"per_identity_rps": 5,
                                                        "per_identity_burst": 2,
                                                        "per_identity_concurrency": 1}},
                                    base=Path.cwd())
    assert config.limits.per_identity_rps == 5.0
    assert ServerConfig.from_dict(BASE, base=Path.cwd()).limits == LimitsConfig()
    for bad in ({"per_identity_rps": -1}, {"per_identity_burst": 1.5}, {"nope": 1},
                {"per_identity_concurrency": True}, {"per_identity_burst": 0}):
        with pytest.raises(InvalidArgument, match="limits"):
            ServerConfig.from_dict({**BASE, "limits": bad}, base=Path.cwd())


def test_named_identities_inherit_what_they_do_not_set() -> None:
    config = ServerConfig.from_dict({**BASE, "limits": {
        "per_identity_rps": 5, "per_identity_burst": 2, "identities": {
            "spiffe://x/release": {"per_identity_rps": 500, "per_identity_burst": 1000},
            "spiffe://x/probe": {"per_identity_rps": 0}}}}, base=Path.cwd())
    limits = config.limits
    assert limits.for_identity("spiffe://x/release") == IdentityLimits(500.0, 1000, 256)
    assert limits.for_identity("spiffe://x/probe") == IdentityLimits(0.0, 2, 256)
    assert limits.for_identity("spiffe://x/anyone") == IdentityLimits(5.0, 2, 256)
    for bad, words in (({"spiffe://x/a": {"rps": 1}}, "unknown fields"),
                       ({"spiffe://x/a": {}}, "must set some of"),
                       ({"spiffe://x/a": {"per_identity_rps": -1}}, "from 0 to"),
                       ({"spiffe://x/a": {"per_identity_burst": 0}}, "at least 1"),
                       (["spiffe://x/a"], "must map identities")):
        with pytest.raises(InvalidArgument, match=words):
            ServerConfig.from_dict({**BASE, "limits": {"identities": bad}}, base=Path.cwd())


class HeldContext:
    """What ``GuardInterceptor._hold`` reads of a call: its time left."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def rate_refusal(retry_after: float, rps: float = 100.0) -> Refusal:
    return Refusal("rate", retry_after, IdentityLimits(rps=rps, burst=20, concurrency=4))


def test_refusals_of_one_identity_are_held_and_spaced_by_its_refill_interval() -> None:
    async def scenario() -> None:
        guard = GuardInterceptor(LimitsConfig(), DenialAuditor(LimitsConfig()), insecure=True)
        a, b = "spiffe://x/a", "spiffe://x/b"
        assert guard.hold_seconds(a, rate_refusal(0.004), None) == pytest.approx(0.004)
        # Two refusals of a already held: the next waits two refill intervals (10 ms) more.
        held = [asyncio.ensure_future(guard._hold(HeldContext(None), a, rate_refusal(0.2)))
                for _ in range(2)]
        await asyncio.sleep(0)
        assert guard.hold_seconds(a, rate_refusal(0.004), None) == pytest.approx(0.024)
        assert guard.hold_seconds(b, rate_refusal(0.004), None) == pytest.approx(0.004)
        # Never more than 250 ms, nor more than half of what the caller's deadline leaves.
        assert guard.hold_seconds(b, rate_refusal(5.0), None) == 0.25
        assert guard.hold_seconds(b, rate_refusal(5.0), 0.1) == pytest.approx(0.05)
        assert guard.hold_seconds(b, rate_refusal(0.0005), None) == 0.0  # not worth a wait
        await asyncio.gather(*held)

    asyncio.run(scenario())


def test_draining_answers_held_refusals_at_once_and_holds_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(guard_module, "MAX_HOLD_SECONDS", 60.0)

    async def scenario() -> None:
        guard = GuardInterceptor(LimitsConfig(), DenialAuditor(LimitsConfig()), insecure=True)
        held = asyncio.ensure_future(
            guard._hold(HeldContext(None), "spiffe://x/a", rate_refusal(30.0)))
        await asyncio.sleep(0.05)
        assert not held.done()
        await guard.drain(timeout=1.0)
        assert await asyncio.wait_for(held, 5.0) < 5.0
        assert guard.hold_seconds("spiffe://x/a", rate_refusal(30.0), None) == 0.0

    asyncio.run(scenario())


def test_at_most_max_held_refusals_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_module, "MAX_HELD", 3)

    async def scenario() -> None:
        guard = GuardInterceptor(LimitsConfig(), DenialAuditor(LimitsConfig()), insecure=True)
        held = [asyncio.ensure_future(
            guard._hold(HeldContext(None), f"spiffe://x/{n}", rate_refusal(0.05)))
            for n in range(3)]
        await asyncio.sleep(0)
        assert guard.hold_seconds("spiffe://x/late", rate_refusal(0.05), None) == 0.0
        await asyncio.gather(*held)
        assert guard.hold_seconds("spiffe://x/late", rate_refusal(0.05), None) == 0.05

    asyncio.run(scenario())
