"""The ``Attestation`` service: runtime attestation of running workloads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from kms.attestation import AttestationReport, RuntimeAttestation
from kms.domain.provenance import VerificationPolicy
from kms.errors import FailedPrecondition
from signer._pb.signet.v1 import attestation_pb2, attestation_pb2_grpc
from signer.servicers.base import ServicerBase, rpc
from signer.verification import KeyResolver, verify_attestation

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class AttestationSetup:
    """The baseline comparison, and the policy saying which keys may sign the provenance and
    what it must show."""

    runtime: RuntimeAttestation
    policy: VerificationPolicy


class AttestationServicer(ServicerBase, attestation_pb2_grpc.AttestationServicer):
    """``setup`` is None when no baseline is configured: every call then answers
    FAILED_PRECONDITION. ``resolver`` gives the keys that may have signed provenance (the
    signer's own key state)."""

    def __init__(
        self,
        setup: AttestationSetup | None,
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
        setup = self._setup
        if setup is None:
            raise FailedPrecondition(
                "runtime attestation is not configured on this signer: no baseline of "
                "expected measurements was given"
            )
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
        outcome = setup.runtime.attest(caller.identity, report, subjects, problem)
        return attestation_pb2.AttestResponse(
            allowed=outcome.allowed, discrepancies=list(outcome.discrepancies)
        )
