"""Key administration use cases: create keys, read them, change the access policy.

Every administrative action passes through :meth:`KeyAdministration.authorize`, the one place
where the custodian-approval check of later ceremonies plugs in.
"""

from __future__ import annotations

import logging

from kms.domain.keys import Algorithm, Key, Replication, validate_key_name
from kms.domain.policy import AccessPolicy
from kms.errors import AlreadyExists, KmsError, NotFound, PermissionDenied, Unavailable
from kms.ports import Clock, Hsm, KeyStateStore, VersionedKey, VersionedPolicy
from kms.signing import Caller, StateView

log = logging.getLogger(__name__)


class KeyAdministration:
    def __init__(
        self, *, hsm: Hsm, store: KeyStateStore, view: StateView, clock: Clock
    ) -> None:
        self._hsm = hsm
        self._store = store
        self._view = view
        self._clock = clock

    def authorize(self, caller: Caller, action: str) -> None:
        """Raise ``PermissionDenied`` unless the caller may perform an administrative action."""
        if caller.unrestricted:
            return
        policy = self._view.policy()
        if policy is None:
            raise PermissionDenied(
                f"no access policy is configured, so nobody may {action}; bootstrap one with "
                "'signet dev up' or write it to etcd with 'signet policy apply FILE'"
            )
        policy.check_admin(caller.identity)

    async def create_key(
        self,
        caller: Caller,
        *,
        name: str,
        algorithm: Algorithm,
        replication: Replication,
        rotation_period_seconds: int | None = None,
    ) -> VersionedKey:
        """Generate version 1 in the HSM and record it with a compare-and-swap create.

        Raises ``AlreadyExists`` for a taken name; the HSM object made for a lost race is
        destroyed again, so nothing is left half-created.
        """
        self.authorize(caller, "create keys")
        validate_key_name(name)
        self._view.require_current()
        try:
            self._view.key(name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"a key named {name!r} exists already")
        # Validate everything pure before generating anything in the HSM.
        Key.new(
            name=name, algorithm=algorithm, replication=replication,
            public_key_der=b"-", hsm_id=b"-", now=self._clock.now(),
            rotation_period_seconds=rotation_period_seconds,
        )
        pair = await self._hsm.generate_key_pair(
            label=f"signet/{name}/v1",
            algorithm=algorithm,
            extractable=replication is Replication.MULTI_REGION,
        )
        key = Key.new(
            name=name, algorithm=algorithm, replication=replication,
            public_key_der=pair.public_key_der, hsm_id=pair.hsm_id, now=self._clock.now(),
            rotation_period_seconds=rotation_period_seconds,
        )
        try:
            created = await self._store.create_key(key)
        except KmsError:
            await self._discard(pair.hsm_id, name)
            raise
        # Let this signer's view catch up so a sign right after create finds the key here.
        try:
            await self._view.wait_for_revision(created.mod_revision, timeout=2.0)
        except Unavailable:
            log.warning("key %s is created but this signer has not seen it yet", name)
        log.info("created key %s (%s, %s)", name, algorithm.value, replication.value)
        return created

    async def _discard(self, hsm_id: bytes, name: str) -> None:
        try:
            await self._hsm.destroy_key_pair(hsm_id)
        except KmsError:
            log.exception("could not remove the unused HSM key pair made for %s", name)

    async def get_key(self, caller: Caller, name: str) -> VersionedKey:
        self.authorize(caller, "read key metadata")
        validate_key_name(name)
        return await self._store.get_key(name)

    async def list_keys(self, caller: Caller) -> list[VersionedKey]:
        self.authorize(caller, "list keys")
        return sorted(await self._store.list_keys(), key=lambda k: k.key.name)

    async def set_policy(
        self, caller: Caller, policy: AccessPolicy, expected_revision: int
    ) -> VersionedPolicy:
        self.authorize(caller, "change the access policy")
        return await self._store.put_policy(policy, expected_revision)

    async def get_policy(self, caller: Caller) -> VersionedPolicy | None:
        self.authorize(caller, "read the access policy")
        return await self._store.get_policy()
