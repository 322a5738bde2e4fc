"""Runtime attestation: a matching workload is allowed; each mismatch is denied, listed and
recorded as a security event without environment values."""

from __future__ import annotations

import logging

import pytest

from kms.attestation import AttestationReport, Baseline, RuntimeAttestation, compare
from kms.errors import InvalidArgument

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


def test_a_denial_is_a_security_event_without_secret_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attestation = RuntimeAttestation(BASELINE)
    with caplog.at_level(logging.WARNING, logger="signet.security"):
        allowed = attestation.attest("spiffe://agent", report(), SUBJECTS)
        assert allowed.allowed
        assert not caplog.records
        denied = attestation.attest(
            "spiffe://agent", report(environment={"APP_ENV": "s3cr3t-debug"}), SUBJECTS)
    assert not denied.allowed
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
