"""Key administration use cases: create keys, move versions through their lifecycle, read
them, change the access policy.

Every administrative action passes through :meth:`KeyAdministration.authorize`. Lifecycle
changes also pass through :meth:`KeyAdministration.require_ceremony`: unless the signer runs
in the explicit insecure development mode, they are refused with ``PermissionDenied`` naming
the ``signet ceremony propose`` command, because they must run as custodian ceremonies
(``kms.ceremony``, DESIGN.md I6). Only the maintenance leader's ``SYSTEM`` caller (automatic
rotation, retirement and destruction the custodians configured) is exempt. Every change is a pure
transition of the key (``kms.domain.keys``) applied with a compare-and-swap on the record's etcd
revision; a lost race is ``Conflict`` (gRPC ``ABORTED``) and nothing is half-written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kms.domain.keys import Algorithm, Key, Replication, validate_key_name
from kms.domain.policy import AccessPolicy
from kms.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    KmsError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from kms.ports import (
    AuditRecorder,
    Clock,
    GeneratedKeyPair,
    Hsm,
    KeyStateStore,
    VersionedKey,
    VersionedPolicy,
)
from kms.signing import Caller, StateView
from kms.state.fence import FenceReport, SignerFence

log = logging.getLogger(__name__)

DAY = 86_400


@dataclass(frozen=True)
class LifecycleSettings:
    """Operator choices for the lifecycle. Destruction waits 30 days unless asked for longer;
    shorter waits need an explicitly lowered ``min_destroy_wait_seconds`` (tests do that)."""

    default_destroy_wait_seconds: float = 30 * DAY
    min_destroy_wait_seconds: float = 1 * DAY

    def destroy_wait(self, requested: float | None) -> float:
        """The waiting period to use for a destruction asked with ``requested`` seconds (None:
        the default). Raises ``InvalidArgument`` below the minimum."""
        wait = self.default_destroy_wait_seconds if requested is None else requested
        if wait < self.min_destroy_wait_seconds:
            raise InvalidArgument(
                f"the destruction waiting period must be at least "
                f"{self.min_destroy_wait_seconds:g} s on this cluster, got {wait:g} s"
            )
        return wait


# The maintenance leader's caller. Compared by object identity, so no remote caller (whatever
# URI its certificate carries) can be it; it is exempt from ceremonies because it only carries
# out schedules the custodians set (rotation periods, grace and waiting periods).
SYSTEM = Caller("system://signet/maintenance", unrestricted=True)

# Lifecycle actions that need a custodian ceremony, and the command that proposes each.
CEREMONY_COMMANDS = {
    "create keys": "create-key NAME --algorithm ALG",
    "rotate keys": "rotate NAME",
    "disable key versions": "disable NAME --version N",
    "enable key versions": "enable NAME --version N",
    "revoke key versions": "revoke NAME --version N",
    "schedule key destruction": "schedule-destroy NAME --version N",
    "cancel key destruction": "cancel-destroy NAME --version N",
    "set the minimum signing version": "set-min-version NAME --version N",
    "change the access policy": "policy FILE",
}


class VersionReplicator(Protocol):
    async def replicate_version(self, key: Key, number: int) -> int: ...


@dataclass(frozen=True)
class RevokeResult:
    key: VersionedKey
    fence: FenceReport


class KeyAdministration:
    def __init__(
        self, *, hsm: Hsm, store: KeyStateStore, view: StateView, clock: Clock,
        fence: SignerFence | None = None, settings: LifecycleSettings | None = None,
        audit: AuditRecorder | None = None, ceremonies_required: bool = True,
        region: str | None = None, replicator: VersionReplicator | None = None,
    ) -> None:
        """``region``: recorded as the home region of keys created here. ``replicator``:
        wraps new multi-region versions for the other regions right away (kms.replication)."""
        self._hsm = hsm
        self._store = store
        self._view = view
        self._clock = clock
        self._fence = fence
        self.settings = settings or LifecycleSettings()
        self._audit = audit
        self.ceremonies_required = ceremonies_required
        self.region = region
        self._replicator = replicator

    async def replicate(self, key: Key, number: int) -> None:
        """Wrap a new multi-region version for the other regions now, so they can unwrap it
        as soon as they see it. A failure is logged, not raised: the version is committed and
        the replicator's loop retries."""
        if self._replicator is None or key.replication is not Replication.MULTI_REGION:
            return
        try:
            await self._replicator.replicate_version(key, number)
        except KmsError as error:
            log.warning("key %s version %d is not wrapped for other regions yet (will retry): "
                        "%s", key.name, number, error)

    async def _record(self, caller: Caller, action: str, **fields: Any) -> None:
        """Append an ``admin`` audit entry. The change is already committed in etcd; if the
        entry cannot be written the caller gets UNAVAILABLE and the signer log says why."""
        if self._audit is not None:
            await self._audit.record_event(
                "admin", {"identity": caller.identity, "action": action, **fields}
            )

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

    def require_ceremony(self, caller: Caller, action: str) -> None:
        """Raise ``PermissionDenied`` for a direct lifecycle change when ceremonies are
        required (everywhere but the insecure development mode), naming the command that
        proposes it instead. Raises what ``authorize`` raises first."""
        self.authorize(caller, action)
        if self.ceremonies_required and caller is not SYSTEM:
            command = CEREMONY_COMMANDS.get(action, "ACTION …")
            raise PermissionDenied(
                f"this needs a custodian ceremony: signet ceremony propose {command} — then "
                "custodians approve it with 'signet ceremony approve ID --key KEY' (direct "
                f"calls to {action} work only in the insecure development mode)"
            )

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
        self.require_ceremony(caller, "create keys")
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
        pair = await self.generate(name, algorithm, replication, 1)
        key = Key.new(
            name=name, algorithm=algorithm, replication=replication,
            public_key_der=pair.public_key_der, hsm_id=pair.hsm_id, now=self._clock.now(),
            rotation_period_seconds=rotation_period_seconds, home_region=self.region,
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
        await self.replicate(key, 1)
        await self._record(caller, "create keys", key=name, algorithm=algorithm.value,
                           replication=replication.value, revision=created.mod_revision)
        return created

    async def _discard(self, hsm_id: bytes, name: str) -> None:
        try:
            await self._hsm.destroy_key_pair(hsm_id)
        except KmsError:
            log.exception("could not remove the unused HSM key pair made for %s", name)

    async def _change(
        self, caller: Caller, action: str, name: str, transition: Callable[[Key], Key]
    ) -> VersionedKey:
        """Authorise, read the record, apply the pure transition, compare-and-swap it back.

        Raises ``NotFound``, ``FailedPrecondition`` (illegal move), ``InvalidArgument``,
        ``Conflict`` (someone changed the key first: nothing was written, read and retry),
        ``PermissionDenied`` or ``Unavailable``.
        """
        self.require_ceremony(caller, action)
        validate_key_name(name)
        current = await self._store.get_key(name)
        changed = transition(current.key)
        if changed == current.key:
            return current  # e.g. revoking a revoked version: nothing to write
        updated = await self._update(changed, current.mod_revision, name)
        log.info("%s: key %s now at revision %d", action, name, updated.mod_revision)
        await self._record(caller, action, key=name, revision=updated.mod_revision)
        return updated

    async def _update(self, key: Key, expected: int, name: str) -> VersionedKey:
        try:
            updated = await self._store.update_key(key, expected)
        except Conflict:
            raise Conflict(
                f"key {name!r} was changed by someone else while this request ran; nothing was "
                "written — read it again ('signet key show') and retry if still wanted"
            ) from None
        try:
            await self._view.wait_for_revision(updated.mod_revision, timeout=2.0)
        except Unavailable:
            log.warning("key %s changed but this signer has not seen it yet", name)
        return updated

    async def rotate(
        self, caller: Caller, name: str, *, retire_grace_seconds: float = 0
    ) -> VersionedKey:
        """Generate a new primary version in the HSM; the old primary retires (after the grace
        period, if any). The new HSM key pair is removed again if the swap loses a race."""
        self.require_ceremony(caller, "rotate keys")
        validate_key_name(name)
        current = await self._store.get_key(name)
        key = current.key
        number = len(key.versions) + 1
        pair = await self.generate(key.name, key.algorithm, key.replication, number)
        try:
            rotated = key.rotate(now=self._clock.now(), public_key_der=pair.public_key_der,
                                 hsm_id=pair.hsm_id, retire_grace_seconds=retire_grace_seconds)
            updated = await self._update(rotated, current.mod_revision, name)
        except KmsError:
            await self._discard(pair.hsm_id, name)
            raise
        log.info("rotated key %s to version %d", name, number)
        await self.replicate(updated.key, number)
        await self._record(caller, "rotate keys", key=name, version=number,
                           revision=updated.mod_revision)
        return updated

    async def generate(
        self, name: str, algorithm: Algorithm, replication: Replication, number: int
    ) -> GeneratedKeyPair:
        """A key pair for version ``number``; only multi-region keys may be wrapped out."""
        return await self._hsm.generate_key_pair(
            label=f"signet/{name}/v{number}",
            algorithm=algorithm,
            extractable=replication is Replication.MULTI_REGION,
        )

    async def disable(self, caller: Caller, name: str, version: int) -> VersionedKey:
        now = self._clock.now()
        return await self._change(caller, "disable key versions", name,
                                  lambda k: k.disable(version, now=now))

    async def enable(self, caller: Caller, name: str, version: int) -> VersionedKey:
        now = self._clock.now()
        return await self._change(caller, "enable key versions", name,
                                  lambda k: k.enable(version, now=now))

    async def revoke(self, caller: Caller, name: str, version: int) -> RevokeResult:
        """Revoke a version and return only once every signer in every region has applied the
        revocation or lost its lease (fenced). Raises ``Unavailable`` if the fence does not
        close in time; the revocation is committed then, and retrying waits again."""
        now = self._clock.now()
        updated = await self._change(caller, "revoke key versions", name,
                                     lambda k: k.revoke(version, now=now))
        if self._fence is None:
            raise Unavailable("this signer has no fence configured; cannot confirm revocation")
        report = await self._fence.wait(updated.mod_revision)
        log.warning(
            "revoked key %s version %d at revision %d; fenced in %.1f ms (%d acknowledged, "
            "%d lapsed)", name, version, updated.mod_revision, report.seconds * 1000,
            len(report.acknowledged), len(report.lapsed),
        )
        return RevokeResult(updated, report)

    async def schedule_destroy(
        self, caller: Caller, name: str, version: int, *, waiting_seconds: float | None = None
    ) -> VersionedKey:
        self.require_ceremony(caller, "schedule key destruction")
        wait = self.settings.destroy_wait(waiting_seconds)
        now = self._clock.now()
        return await self._change(caller, "schedule key destruction", name,
                                  lambda k: k.schedule_destroy(version, now=now,
                                                               waiting_seconds=wait))

    async def cancel_destroy(self, caller: Caller, name: str, version: int) -> VersionedKey:
        now = self._clock.now()
        return await self._change(caller, "cancel key destruction", name,
                                  lambda k: k.cancel_destroy(version, now=now))

    async def set_min_sign_version(self, caller: Caller, name: str, version: int
                                   ) -> VersionedKey:
        return await self._change(caller, "set the minimum signing version", name,
                                  lambda k: k.set_min_sign_version(version))

    async def apply_due(self, caller: Caller, name: str, now: float) -> VersionedKey:
        """Retire versions past their grace period and destroy those past their waiting
        period (the maintenance leader calls this)."""
        return await self._change(caller, "run scheduled lifecycle steps", name,
                                  lambda k: k.retire_due(now).destroy_due(now)[0])

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
        self.require_ceremony(caller, "change the access policy")
        stored = await self._store.put_policy(policy, expected_revision)
        await self._record(caller, "change the access policy", revision=stored.mod_revision,
                           bindings=len(policy.bindings))
        return stored

    async def get_policy(self, caller: Caller) -> VersionedPolicy | None:
        self.authorize(caller, "read the access policy")
        return await self._store.get_policy()
