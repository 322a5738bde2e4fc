"""Background lifecycle work in every signer process.

- Every signer removes from its own HSM the key material of versions that became DESTROYED.
- One signer in the whole cluster, elected through etcd (a role claimed under its lease),
  rotates keys whose rotation period has passed, retires versions whose grace period ended,
  and destroys versions whose waiting period ended. Each change is a compare-and-swap, so
  even two leaders at once (a lease lapsing mid-round) cannot rotate a key twice for one
  period: the second swap loses and its new HSM key pair is removed again. The same leader
  deletes ceremony proposals closed longer than ``ceremonies.retention_seconds`` (the audit
  log is their permanent record).

Maintenance is exempt from custodian ceremonies (docs/adr/0009): it acts as
``kms.admin.SYSTEM`` and only carries out what custodians already approved — a key's rotation
period, a retirement grace period, a destruction waiting period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kms.admin import SYSTEM, KeyAdministration
from kms.domain.keys import VersionState
from kms.errors import Conflict, KmsError
from kms.ports import Clock, FenceRegistry, Hsm
from kms.state.view import KeyStateView

log = logging.getLogger(__name__)

ROLE = "maintenance"


class KeyMaintenance:
    def __init__(
        self, *, admin: KeyAdministration, registry: FenceRegistry, hsm: Hsm,
        view: KeyStateView, clock: Clock, signer_id: str, interval: float = 1.0,
        purge_closed_proposals: Callable[[], Awaitable[tuple[str, ...]]] | None = None,
    ) -> None:
        """``purge_closed_proposals``: deletes ceremony proposals closed longer than the
        retention period (``Ceremonies.purge_closed``); the leader calls it every round."""
        self._admin = admin
        self._registry = registry
        self._hsm = hsm
        self._view = view
        self._clock = clock
        self._signer_id = signer_id
        self._interval = interval
        self._removed: set[bytes] = set()
        self.rotations = 0  # automatic rotations this process made (for tests and metrics)
        self._purge_closed_proposals = purge_closed_proposals

    async def run(self) -> None:
        """Loop until cancelled; a failed round is logged and retried next interval."""
        while True:
            try:
                await self.round()
            except KmsError as error:
                log.warning("maintenance round failed: %s", error.diagnostics())
            await asyncio.sleep(self._interval)

    async def round(self) -> None:
        await self._remove_destroyed_material()
        lease = self._view.lease_id
        if lease is None or not self._view.current:
            return
        if not await self._registry.try_lead(ROLE, self._signer_id, lease):
            return
        now = self._clock.now()
        for versioned in self._view.all_keys():
            key = versioned.key
            try:
                if key.due_for_rotation(now):
                    await self._admin.rotate(SYSTEM, key.name)
                    self.rotations += 1
                    log.info("rotated key %s automatically (period %ss)", key.name,
                             key.rotation_period_seconds)
                    continue
                due, _ = key.retire_due(now).destroy_due(now)
                if due != key:
                    await self._admin.apply_due(SYSTEM, key.name, now)
            except Conflict:
                log.info("key %s changed during maintenance; next round retries", key.name)
        if self._purge_closed_proposals is not None:
            purged = await self._purge_closed_proposals()
            if purged:
                log.info("deleted %d closed ceremony proposals past their retention period "
                         "(the audit log keeps them)", len(purged))

    async def _remove_destroyed_material(self) -> None:
        for versioned in self._view.all_keys():
            for version in versioned.key.versions:
                if version.state is VersionState.DESTROYED and version.hsm_id not in self._removed:
                    await self._hsm.destroy_key_pair(version.hsm_id)
                    self._removed.add(version.hsm_id)
                    log.warning("removed HSM key material of %s version %d",
                                versioned.key.name, version.number)
