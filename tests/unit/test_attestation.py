"""Runtime attestation: a matching workload is allowed; each mismatch is denied, listed and
recorded as a security event without environment values."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kms.attestation import AttestationReport, Baseline, RuntimeAttestation, compare
from kms.errors import InvalidArgument, Unavailable
from signer.telemetry import SecurityEventCounter

IMAGE = "sha256:" + "aa" * 32
FILE_HEX = "bb" * 32
BASELINE = Baseline.from_dict({
    "version": 1,
    "images": {IMAGE: {"files": {"/app/server": FILE_HEX},
                       "environment": {"APP_ENV": "production"},
                       "forbidden_environment": ["LD_PRELOAD"]}},
})
SUBJECTS = frozenset({IMAGE})


def report(**changes: object) -> AttestationReport:
    fields: dict[str, object] = {"image_digest": IMAGE,
                                 "measurements": {"/app/server": FILE_HEX},
                                 "environment": {"APP_ENV": "production", "HOME": "/root"}}
    fields.update(changes)
    return AttestationReport(**fields)  # type: ignore[arg-type]


def test_a_matching_workload_is_allowed() -> None:
    decision = compare(report(), BASELINE, SUBJECTS)
    assert decision.allowed
    assert decision.discrepancies == ()


@pytest.mark.parametrize(
    ("changed", "subjects", "expected"),
    [
        ({}, None, "no verified provenance"),
        ({}, frozenset({"sha256:" + "cc" * 32}), "not a subject of the signed provenance"),
        ({"image_digest": "sha256:" + "dd" * 32}, None, "no baseline is configured"),
        ({"measurements": {"/app/server": "ee" * 32}}, SUBJECTS, "/app/server: sha256"),
        ({"measurements": {}}, SUBJECTS, "/app/server: not measured"),
        ({"measurements": {"/app/server": FILE_HEX, "/app/extra": FILE_HEX}}, SUBJECTS,
         "/app/extra: not in the baseline"),
        ({"environment": {"APP_ENV": "debug"}}, SUBJECTS, "APP_ENV: value differs"),
        ({"environment": {}}, SUBJECTS, "APP_ENV: missing"),
        ({"environment": {"APP_ENV": "production", "LD_PRELOAD": "/evil.so"}}, SUBJECTS,
         "LD_PRELOAD: forbidden"),
    ],
)
def test_each_mismatch_is_denied_and_listed(
    changed: dict[str, object], subjects: frozenset[str] | None, expected: str
) -> None:
    decision = compare(report(**changed), BASELINE, subjects)
    assert not decision.allowed
    assert any(expected in d for d in decision.discrepancies), decision.discrepancies


class MemoryAudit:
    def __init__(self, *, failing: bool = False) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.failing = failing

    async def record_signature(self, **fields: object) -> int:
        raise AssertionError("attestation records events only")

    async def record_signatures(self, **fields: object) -> list[int]:
        raise AssertionError("attestation records events only")

    async def record_event(self, kind: str, fields: Mapping[str, Any]) -> int:
        if self.failing:
            raise Unavailable("the audit log cannot be written")
        self.events.append((kind, dict(fields)))
        return len(self.events)


def test_a_denial_is_a_security_event_without_secret_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = MemoryAudit()
    registry = CollectorRegistry()
    attestation = RuntimeAttestation(BASELINE, audit=audit,
                                     count_event=SecurityEventCounter(registry))

    def events() -> float | None:
        return registry.get_sample_value("signet_security_events_total",
                                         {"kind": "runtime_attestation_denied"})

    assert events() == 0.0
    with caplog.at_level(logging.WARNING, logger="signet.security"):
        allowed = asyncio.run(attestation.attest("spiffe://agent", report(), SUBJECTS))
        assert allowed.allowed
        assert not caplog.records
        assert (audit.events, events()) == ([], 0.0)
        denied = asyncio.run(attestation.attest(
            "spiffe://agent", report(environment={"APP_ENV": "s3cr3t-debug"}), SUBJECTS))
    assert not denied.allowed
    assert events() == 1.0
    [(kind, fields)] = audit.events
    assert kind == "security"
    assert fields == {"event": "runtime_attestation_denied", "identity": "spiffe://agent",
                      "image_digest": IMAGE, "discrepancies": list(denied.discrepancies)}
    assert "s3cr3t" not in repr(fields)
    [record] = caplog.records
    assert record.event == "runtime_attestation_denied"  # type: ignore[attr-defined]
    assert record.caller == "spiffe://agent"  # type: ignore[attr-defined]
    assert record.discrepancies == list(denied.discrepancies)  # type: ignore[attr-defined]
    assert "s3cr3t" not in record.getMessage()
    assert "s3cr3t" not in " ".join(denied.discrepancies)


def test_malformed_reports_and_baselines_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="image digest"):
        AttestationReport("sha256:short")
    with pytest.raises(InvalidArgument, match="files"):
        Baseline.from_dict({"version": 1, "images": {IMAGE: {"files": {"/a": "nothex"}}}})
    with pytest.raises(InvalidArgument, match="sha256"):
        Baseline.from_dict({"version": 1, "images": {"latest": {}}})


def test_a_denial_that_cannot_be_audited_is_not_answered() -> None:
    registry = CollectorRegistry()
    attestation = RuntimeAttestation(BASELINE, audit=MemoryAudit(failing=True),
                                     count_event=SecurityEventCounter(registry))
    with pytest.raises(Unavailable):
        asyncio.run(attestation.attest("spiffe://agent", report(measurements={}), SUBJECTS))
    assert registry.get_sample_value(
        "signet_security_events_total", {"kind": "runtime_attestation_denied"}) == 0.0
