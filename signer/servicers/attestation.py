"""The ``Attestation`` service: runtime attestation of running workloads."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from kms.attestation import AttestationReport, Baseline, RuntimeAttestation
from kms.domain.provenance import VerificationPolicy
from kms.errors import FailedPrecondition, InvalidArgument
from kms.ports import AuditRecorder
from signer._pb.signet.v1 import attestation_pb2, attestation_pb2_grpc
from signer.config import AttestationConfig
from signer.servicers.base import Deferred, ServicerBase, rpc
from signer.verification import KeyResolver, verify_attestation

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class AttestationSetup:
    """The baseline comparison, and the policy saying which keys may sign the provenance and
    what it must show."""

    runtime: RuntimeAttestation
    policy: VerificationPolicy


def _read_document(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as error:
        raise InvalidArgument(f"cannot read the attestation {what} {path}: {error}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise InvalidArgument(f"the attestation {what} {path} is not valid: {error}") from None


def load_attestation_setup(
    config: AttestationConfig, *, audit: AuditRecorder | None,
    count_event: Callable[[str], None] | None,
) -> AttestationSetup:
    """Read the configured baseline and verification policy. Raises ``InvalidArgument``
    naming the file and field when either is unreadable or malformed."""
    baseline = Baseline.from_dict(_read_document(config.baseline, "baseline"))
    policy = VerificationPolicy.from_dict(_read_document(config.policy, "policy"))
    return AttestationSetup(
        RuntimeAttestation(baseline, audit=audit, count_event=count_event), policy)


class AttestationServicer(ServicerBase, attestation_pb2_grpc.AttestationServicer):
    """``setup`` is None when no baseline is configured: every call then answers
    FAILED_PRECONDITION (and UNAVAILABLE while the signer starts). ``resolver`` gives the keys
    that may have signed provenance (the signer's own key state)."""

    def __init__(
        self,
        setup: Deferred[AttestationSetup] | None,
        resolver: Callable[[], KeyResolver],
        *,
        insecure: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(insecure=insecure)
        self._setup = setup
        self._resolver = resolver
        self._clock = clock

    @rpc
    async def Attest(
        self, request: attestation_pb2.AttestRequest, context: Context
    ) -> attestation_pb2.AttestResponse:
        caller = self.caller(context)
        if self._setup is None:
            raise FailedPrecondition(
                "runtime attestation is not configured on this signer: no baseline of "
                "expected measurements was given (config section 'attestation')"
            )
        setup = self._setup.get()
        report = AttestationReport(
            request.image_digest, dict(request.measurements), dict(request.environment)
        )
        subjects: frozenset[str] | None = None
        problem: str | None = None
        if request.provenance_envelope:
            decision = verify_attestation(
                request.provenance_envelope, self._resolver(), setup.policy, now=self._clock()
            )
            failure = decision.first_failure
            if failure is None:
                subjects = decision.statement_subjects
            else:
                problem = f"provenance rejected: {failure.message}"
        outcome = await setup.runtime.attest(caller.identity, report, subjects, problem)
        return attestation_pb2.AttestResponse(
            allowed=outcome.allowed, discrepancies=list(outcome.discrepancies)
        )
