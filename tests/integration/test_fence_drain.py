"""A signer acknowledges a revocation only after the signatures that older state authorised
have been re-checked: one caught inside C_Sign while the Revoke lands is dropped, and the
Revoke does not return before that (DESIGN.md, "Fencing" step 3), on real etcd and SoftHSM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kms.audit.checkpoint import SoftwareCheckpointSigner
from kms.audit.log import AuditLog
from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from kms.errors import FailedPrecondition
from kms.hsm.pkcs11 import Pkcs11Hsm
from kms.ports import SystemClock
from kms.signing import Caller, InflightSignatures, SigningService
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.state.fence import SignerFence
from kms.state.view import KeyStateView
from signer.dev.etcd import EtcdCluster
from tests.fixtures.keys import signing_key

pytestmark = pytest.mark.integration

PIPELINE = Caller("spiffe://test/pipeline")
DIGEST = Digest(DigestAlgorithm.SHA256, bytes(range(32)))
SIGNER = "test/held"


class HeldHsm:
    """The real HSM, except that a signature, once made, is held until the test releases it:
    a signature still on its way out of C_Sign when the revocation arrives."""

    def __init__(self, hsm: Pkcs11Hsm) -> None:
        self._hsm = hsm
        self.signed = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)

    async def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        signature = await self._hsm.sign_digest(hsm_id, algorithm, digest)
        self.signed.set()
        await self.release.wait()
        return signature


def test_a_revocation_is_acknowledged_only_after_older_signatures_are_dropped(
    etcd_cluster: EtcdCluster, hsm: Pkcs11Hsm, tmp_path: Path
) -> None:
    async def scenario() -> None:
        store = EtcdKeyStateStore(EtcdConfig(endpoints=etcd_cluster.endpoints))
        clock = SystemClock()
        key, created = await signing_key(hsm, store, "held", signer=PIPELINE.identity,
                                         now=clock.now())
        # Wired as signer/server.py wires a signer process.
        inflight = InflightSignatures()
        view = KeyStateView(store, clock, lease_ttl=5, signer_id=SIGNER, registry=store,
                            fence_gate=inflight.drained_below)
        await view.start()
        audit = await AuditLog.open(tmp_path / "audit", SIGNER,
                                    signer=SoftwareCheckpointSigner.generate(), clock=clock)
        held = HeldHsm(hsm)
        signing = SigningService(hsm=held, view=view, region="test",  # type: ignore[arg-type]
                                 audit=audit, inflight=inflight)
        try:
            in_flight = asyncio.ensure_future(
                signing.sign_digest(PIPELINE, "held", None, DIGEST))
            await asyncio.wait_for(held.signed.wait(), 10)

            revoked = await store.update_key(key.revoke(1, now=clock.now()),
                                             created.mod_revision)
            fence = asyncio.ensure_future(
                SignerFence(store, clock, timeout=30).wait(revoked.mod_revision))
            await view.wait_for_revision(revoked.mod_revision, timeout=10)
            # The view has applied the revocation, yet it must not say so while the signature
            # that older state authorised is still on its way out.
            for _ in range(20):
                await asyncio.sleep(0.02)
                applied = (await store.signer_registrations()).applied[SIGNER]
                assert applied < revoked.mod_revision
                assert not fence.done()

            held.release.set()
            with pytest.raises(FailedPrecondition, match="became REVOKED while signing"):
                await in_flight
            report = await asyncio.wait_for(fence, 10)
            assert report.acknowledged == (SIGNER,)
            assert audit.size == 0  # the dropped signature was never recorded or returned
        finally:
            held.release.set()
            await audit.close()
            await view.stop()
            await store.close()

    asyncio.run(scenario())
