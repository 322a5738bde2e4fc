"""A signer whose watch was cut while a version was revoked and etcd compacted its history
re-reads the whole state when the watch comes back, and refuses the revoked version."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kms.audit.checkpoint import SoftwareCheckpointSigner
from kms.audit.log import AuditLog
from kms.domain.keys import Digest, DigestAlgorithm
from kms.domain.policy import AccessPolicy
from kms.errors import FailedPrecondition, StateStoreError, Unavailable
from kms.hsm.pkcs11 import Pkcs11Hsm
from kms.ports import StateEvent, SystemClock
from kms.signing import Caller, SigningService
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.state.view import KeyStateView
from signer.dev.etcd import EtcdCluster
from tests.fixtures.keys import signing_key

pytestmark = pytest.mark.integration

PIPELINE = Caller("spiffe://test/pipeline")
DIGEST = Digest(DigestAlgorithm.SHA256, bytes(range(32)))


class SeveredWatches:
    """The real etcd store, except that its watch streams can be cut like a network link."""

    def __init__(self, store: EtcdKeyStateStore) -> None:
        self._store = store
        self.cut = asyncio.Event()
        self.watch_starts: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def sever(self) -> None:
        self.cut.set()

    def restore(self) -> None:
        self.cut.clear()

    def watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        return self._watch(start_revision)

    async def _watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        if self.cut.is_set():
            raise StateStoreError("watch link is cut (test)")
        self.watch_starts.append(start_revision)
        events = self._store.watch(start_revision)
        while True:
            next_event = asyncio.ensure_future(anext(events))
            cut = asyncio.ensure_future(self.cut.wait())
            done, _ = await asyncio.wait({next_event, cut}, return_when=asyncio.FIRST_COMPLETED)
            if cut in done:
                next_event.cancel()
                raise StateStoreError("watch link is cut (test)")
            cut.cancel()
            yield next_event.result()


def test_revocation_hidden_by_compaction_is_found_by_a_full_re_read(
    etcd_cluster: EtcdCluster, hsm: Pkcs11Hsm, tmp_path: Path
) -> None:
    async def scenario() -> None:
        store = EtcdKeyStateStore(EtcdConfig(endpoints=etcd_cluster.endpoints))
        severed = SeveredWatches(store)
        clock = SystemClock()
        key, created = await signing_key(hsm, store, "compacted", signer=PIPELINE.identity,
                                         now=clock.now())
        view = KeyStateView(severed, clock, lease_ttl=5, max_backoff=0.05)  # type: ignore[arg-type]
        await view.start()
        audit = await AuditLog.open(tmp_path / "audit", "test/compaction",
                                    signer=SoftwareCheckpointSigner.generate(), clock=clock)
        signing = SigningService(hsm=hsm, view=view, region="test", audit=audit)
        try:
            assert (await signing.sign_digest(PIPELINE, "compacted", None, DIGEST)).version == 1

            severed.sever()
            for _ in range(100):  # the view notices the cut link
                if not view.current:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(Unavailable):
                await signing.sign_digest(PIPELINE, "compacted", None, DIGEST)

            revoked = key.revoke(1, now=clock.now())
            stored = await store.update_key(revoked, created.mod_revision)
            # Churn, then compact etcd past everything the signer has seen.
            for i in range(3):
                await store.put_policy(AccessPolicy.from_dict({"version": 1, "bindings": [
                    {"identity": PIPELINE.identity, "sign": ["*"], "description": str(i)}]}), 0)
            compacted_at = await store.current_revision()
            etcd_cluster.etcdctl("compact", str(compacted_at))
            assert view.revision < stored.mod_revision
            starts_before = len(severed.watch_starts)

            severed.restore()
            await view.wait_for_revision(stored.mod_revision, timeout=10)
            assert view.current
            with pytest.raises(FailedPrecondition, match="REVOKED"):
                await signing.sign_digest(PIPELINE, "compacted", None, DIGEST)
            # It first tried to resume where it left off, was told that history is gone, and
            # resumed from a fresh snapshot instead.
            resumed = severed.watch_starts[starts_before:]
            assert resumed[0] < compacted_at
            assert resumed[-1] > compacted_at
            assert audit.size == 1  # only the one signature that was returned
        finally:
            await audit.close()
            await view.stop()
            await store.close()

    asyncio.run(scenario())
