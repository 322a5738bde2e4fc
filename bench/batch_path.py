"""CPU per signature of the ``SignBatch`` path outside the HSM, in-process
(``python -m bench.batch_path``): request parse, ``SigningService.sign_batch`` with a fake HSM
and the real audit log (group commit, fsync) behind the tracing wrapper, response build and
serialise, and the interceptor's signature count. Batches of 256, 40 in flight; best of three.
Not affected by the cluster's other processes the way ``bench.run`` is (see bench/README.md).

Measured twice: with the audit log, and with a recorder that records nothing. A signer cannot
run without its audit log (invariant I3: a signature is returned only once it is durably
recorded), so this is where "audit off" is measured; ``bench.run`` puts both in its JSON.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from kms.audit.checkpoint import SoftwareCheckpointSigner
from kms.audit.log import AuditLog
from kms.domain.keys import Algorithm, Key, Replication
from kms.domain.policy import AccessPolicy
from kms.ports import SystemClock, VersionedKey
from kms.signing import Caller, SigningService
from signer import convert, telemetry
from signer._pb.signet.v1 import common_pb2, signing_pb2

BATCH = 256
IN_FLIGHT = 40


class _FakeHsm:
    async def sign_digests(self, hsm_id: bytes, algorithm: Algorithm, digests: Sequence[bytes]
                           ) -> list[bytes | Exception]:
        return [b"\x30\x45" + b"\x01" * 69 for _ in digests]


class _FixedView:
    def __init__(self, key: Key) -> None:
        self.record = VersionedKey(key, 7)
        self.revision = 7

    def require_current(self) -> None:
        return None

    def key(self, name: str) -> VersionedKey:
        return self.record

    def policy(self) -> AccessPolicy | None:
        return None

    async def wait_for_revision(self, revision: int, timeout: float) -> None:
        return None


class _NoAudit:
    """Records nothing: only to measure what the audit log costs (never in a signer)."""

    def __init__(self) -> None:
        self._next = 0

    async def record_signatures(self, **fields: Any) -> list[int]:
        first, self._next = self._next, self._next + len(fields["digests"])
        return list(range(first, self._next))


async def measure(*, audit: bool = True) -> float:
    """Microseconds of process CPU per signature, with the audit log or without."""
    key = Key.new(name="release", algorithm=Algorithm.ECDSA_P256_SHA256,
                  replication=Replication.REGIONAL, public_key_der=b"\x30" * 91,
                  hsm_id=b"\x01" * 16, now=0.0)
    log = await AuditLog.open(tempfile.mkdtemp(prefix="signet-batch-path-"), "bench/batch",
                              signer=SoftwareCheckpointSigner.generate(), clock=SystemClock())
    recorder: Any = telemetry.TracedAudit(log) if audit else _NoAudit()
    service = SigningService(hsm=_FakeHsm(), view=_FixedView(key),  # type: ignore[arg-type]
                             region="bench", audit=recorder)
    caller = Caller("spiffe://bench/pipeline", unrestricted=True)
    request = signing_pb2.SignBatchRequest(key="release", request_id="b", digests=[
        common_pb2.Digest(algorithm=common_pb2.SHA256, value=os.urandom(32))
        for _ in range(BATCH)]).SerializeToString()

    async def one() -> bytes:
        parsed = signing_pb2.SignBatchRequest.FromString(request)
        outcomes = await service.sign_batch(caller, parsed.key, None,
                                            convert.digests_from_pb(parsed.digests),
                                            request_id=parsed.request_id)
        response = convert.batch_to_pb(outcomes)
        telemetry._count_signatures(telemetry.metrics(), "release", response)
        return response.SerializeToString()

    try:
        for _ in range(5):
            await one()
        best = float("inf")
        for _ in range(3):
            began = time.process_time()
            await asyncio.gather(*(one() for _ in range(IN_FLIGHT)))
            best = min(best, (time.process_time() - began) / (IN_FLIGHT * BATCH) * 1e6)
    finally:
        await log.close()
    return best


def audit_cost() -> dict[str, float]:
    """Both measurements, for the benchmark's JSON."""
    with_audit = asyncio.run(measure(audit=True))
    without = asyncio.run(measure(audit=False))
    return {"cpu_us_per_signature_with_audit_log": round(with_audit, 1),
            "cpu_us_per_signature_without_audit_log": round(without, 1),
            "audit_log_us_per_signature": round(with_audit - without, 1)}


def main() -> None:
    figures = audit_cost()
    print(f"SignBatch {BATCH}: {figures['cpu_us_per_signature_with_audit_log']:.1f} µs of CPU "
          "per signature outside the HSM with the audit log, "
          f"{figures['cpu_us_per_signature_without_audit_log']:.1f} µs without "
          "(fake HSM; in process)")


if __name__ == "__main__":
    main()
