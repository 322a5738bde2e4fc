"""Runtime attestation: compare what a workload reports about itself with its signed
provenance and a baseline of expected measurements.

``compare`` is pure. ``RuntimeAttestation.attest`` adds the security event on a mismatch: an
audit entry (kind ``security``), a counter and a ``signet.security`` log line.
Environment values are never logged or echoed (they may hold secrets): discrepancies name the
variable only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kms.errors import InvalidArgument
from kms.ports import AuditRecorder

security_log = logging.getLogger("signet.security")

BASELINE_VERSION = 1
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ImageBaseline:
    files: Mapping[str, str]  # path -> sha256 hex
    environment: Mapping[str, str]  # variable -> required value
    forbidden_environment: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Baseline:
    """Expected measurements per image digest (``sha256:<hex>``)::

        {"version": 1,
         "images": {"sha256:<hex>": {"files": {"/app/server": "<sha256 hex>"},
                                     "environment": {"APP_ENV": "production"},
                                     "forbidden_environment": ["LD_PRELOAD"]}}}
    """

    images: Mapping[str, ImageBaseline]

    @classmethod
    def from_dict(cls, data: Any) -> Baseline:
        """Raises ``InvalidArgument`` naming the offending field."""
        if not isinstance(data, Mapping) or data.get("version") != BASELINE_VERSION:
            raise InvalidArgument(f"the baseline must be a mapping with version {BASELINE_VERSION}")
        raw_images = data.get("images")
        if not isinstance(raw_images, Mapping):
            raise InvalidArgument("baseline field 'images' must be a mapping of digests")
        images = {}
        for digest, raw in raw_images.items():
            where = f"images[{digest!r}]"
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                raise InvalidArgument(f"baseline {where}: key must be sha256:<64 hex>")
            if not isinstance(raw, Mapping):
                raise InvalidArgument(f"baseline {where} must be a mapping")
            files = _string_map(raw.get("files", {}), f"{where}.files")
            for path, value in files.items():
                if not _SHA256_HEX.match(value):
                    raise InvalidArgument(f"baseline {where}.files[{path!r}] must be 64 hex")
            environment = _string_map(raw.get("environment", {}), f"{where}.environment")
            forbidden = raw.get("forbidden_environment", [])
            if not isinstance(forbidden, list) or not all(isinstance(n, str) for n in forbidden):
                raise InvalidArgument(f"baseline {where}.forbidden_environment must list names")
            images[digest] = ImageBaseline(files, environment, frozenset(forbidden))
        return cls(images)


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument(f"baseline {where} must map strings to strings")
    return dict(value)


@dataclass(frozen=True)
class AttestationReport:
    """What a workload agent reports. Raises ``InvalidArgument`` for a malformed digest."""

    image_digest: str
    measurements: Mapping[str, str] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _DIGEST.match(self.image_digest):
            raise InvalidArgument(
                f"image digest {self.image_digest!r} must be sha256: and 64 lowercase hex"
            )


@dataclass(frozen=True)
class AttestationDecision:
    allowed: bool
    discrepancies: tuple[str, ...]


def compare(
    report: AttestationReport,
    baseline: Baseline,
    provenance_subjects: frozenset[str] | None,
    provenance_problem: str | None = None,
) -> AttestationDecision:
    """Allowed only when the image is a subject of the verified provenance, has a baseline,
    every baseline file is measured with the expected digest, no unexpected file is reported,
    required environment values match and forbidden variables are absent.
    ``provenance_subjects`` None means no verified provenance was presented;
    ``provenance_problem`` then says why (e.g. which verification rule failed)."""
    found: list[str] = []
    if provenance_subjects is None:
        found.append(provenance_problem or "no verified provenance was presented for the image")
    elif report.image_digest not in provenance_subjects:
        found.append(f"image {report.image_digest} is not a subject of the signed provenance")
    expected = baseline.images.get(report.image_digest)
    if expected is None:
        found.append(f"no baseline is configured for image {report.image_digest}")
        return AttestationDecision(False, tuple(found))
    for path, digest in sorted(expected.files.items()):
        measured = report.measurements.get(path)
        if measured is None:
            found.append(f"file {path}: not measured")
        elif measured.lower() != digest:
            found.append(f"file {path}: sha256 {measured} differs from baseline {digest}")
    found.extend(
        f"file {path}: not in the baseline"
        for path in sorted(set(report.measurements) - set(expected.files))
    )
    for name, value in sorted(expected.environment.items()):
        if name not in report.environment:
            found.append(f"environment {name}: missing")
        elif report.environment[name] != value:
            found.append(f"environment {name}: value differs from the baseline")
    found.extend(
        f"environment {name}: forbidden but set"
        for name in sorted(expected.forbidden_environment & set(report.environment))
    )
    return AttestationDecision(not found, tuple(found))


SECURITY_EVENT = "runtime_attestation_denied"


class RuntimeAttestation:
    """Decide runtime attestations and record a security event for every denial.

    ``audit`` receives a ``security`` entry and ``count_event`` the event kind (a metric)
    for each denial; either may be None where there is nothing to record to (unit tests).
    """

    def __init__(
        self,
        baseline: Baseline,
        *,
        audit: AuditRecorder | None = None,
        count_event: Callable[[str], None] | None = None,
    ) -> None:
        self._baseline = baseline
        self._audit = audit
        self._count_event = count_event

    async def attest(
        self,
        identity: str,
        report: AttestationReport,
        provenance_subjects: frozenset[str] | None,
        provenance_problem: str | None = None,
    ) -> AttestationDecision:
        """Compare (see :func:`compare`). A denial is recorded before it is answered: audit
        entry, metric, ``signet.security`` log. Raises ``Unavailable`` when the audit entry
        cannot be written (the agent then gets no answer and must treat that as a denial)."""
        decision = compare(report, self._baseline, provenance_subjects, provenance_problem)
        if not decision.allowed:
            if self._audit is not None:
                # Discrepancies name variables and paths, never environment values.
                await self._audit.record_event("security", {
                    "event": SECURITY_EVENT,
                    "identity": identity,
                    "image_digest": report.image_digest,
                    "discrepancies": list(decision.discrepancies),
                })
            if self._count_event is not None:
                self._count_event(SECURITY_EVENT)
            security_log.warning(
                "runtime attestation denied for image %s: %s",
                report.image_digest, "; ".join(decision.discrepancies),
                extra={
                    "event": SECURITY_EVENT,
                    "caller": identity,
                    "image_digest": report.image_digest,
                    "discrepancies": list(decision.discrepancies),
                },
            )
        return decision
