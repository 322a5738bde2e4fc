"""Keeps the TUF repository in step with key state (docs/adr/0007-trust-bundles.md).

Every signer process runs a ``TufPublisher``. At start it makes sure its region has an online
key (generating it in the HSM the first time, registered under ``tuf/online-keys/<region>``).
Then one signer in the whole cluster, elected through etcd (``try_lead("tuf-publisher")``
under its lease), publishes: on every key-state change it sees (it waits on the view's
revision, so a change is noticed at once), and whenever the timestamp is old enough to be
renewed. Publications are compare-and-swap transactions (``TufRepositoryStore.commit``), so
two publishers at once (a lease lapsing mid-round) cannot interleave versions: the loser
re-reads and tries again.

A signer publishes only once a root exists that lists its online key for the timestamp role;
until then (bootstrap, or a region added without a root rotation) it waits and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tuf.api.metadata import Metadata, Root, Timestamp

from kms.domain.keys import Algorithm
from kms.errors import AlreadyExists, Conflict, KmsError, NotFound, Unavailable
from kms.ports import Clock, FenceRegistry, Hsm
from kms.state.view import KeyStateView
from kms.tuf.repository import (
    ExpiryPolicy,
    OnlineKey,
    Publication,
    build_timestamp,
    build_trust_bundle,
    is_online_key_listed,
    pin_targets,
    plan_publication,
)
from kms.tuf.signing import HsmMetadataSigner
from kms.tuf.store import PublicationFiles, TufRepositoryStore

log = logging.getLogger(__name__)

ROLE = "tuf-publisher"


async def ensure_online_key(repo: TufRepositoryStore, hsm: Hsm, region: str,
                            clock: Clock) -> OnlineKey:
    """The region's online key, generated in ``hsm`` and registered if the region has none.

    Raises ``Unavailable`` when the registered key is not in this HSM (a signer pointed at the
    wrong token), ``HsmError``/``StateStoreError`` when either cannot be reached.
    """
    existing = await repo.online_key(region)
    if existing is None:
        generated = await hsm.generate_key_pair(
            label=f"signet-tuf-online-{region}", algorithm=Algorithm.ECDSA_P256_SHA256,
            extractable=False,
        )
        candidate = OnlineKey(region, generated.public_key_der, generated.hsm_id, clock.now())
        try:
            await repo.register_online_key(candidate)
        except AlreadyExists:
            # Another signer of this region won the race; ours is never used.
            await hsm.destroy_key_pair(generated.hsm_id)
            existing = await repo.online_key(region)
            if existing is None:
                raise Unavailable(f"online key of region {region} vanished; retry") from None
        else:
            log.info("generated the online TUF key of region %s (key id %s)", region,
                     candidate.key_id)
            return candidate
    try:
        held = await hsm.public_key(existing.hsm_id)
    except NotFound:
        raise Unavailable(
            f"the online TUF key of region {region} (key id {existing.key_id[:16]}…) is not in "
            "this signer's HSM token; every signer of a region must use the region's token"
        ) from None
    if held != existing.public_key_der:
        raise Unavailable(f"the HSM key registered as region {region}'s online key does not "
                          "match its record; check the token")
    return existing


class TufPublisher:
    """Publishes the repository; see the module docstring. Use ``run`` as a background task."""

    def __init__(
        self,
        *,
        repo: TufRepositoryStore,
        signer: HsmMetadataSigner,
        online_key: OnlineKey,
        view: KeyStateView,
        registry: FenceRegistry,
        clock: Clock,
        signer_id: str,
        expiry: ExpiryPolicy,
        lead_interval: float = 1.0,
        root_interval: float = 2.0,
    ) -> None:
        self._repo = repo
        self._signer = signer
        self._online_key = online_key
        self._view = view
        self._registry = registry
        self._clock = clock
        self._signer_id = signer_id
        self._expiry = expiry
        self._lead_interval = lead_interval
        self._root_interval = root_interval
        self._leading_until = 0.0
        self._root: tuple[int, Root] | None = None
        self._root_checked = 0.0
        self._published: tuple[Publication | None, int] | None = None
        self._published_bundle: bytes | None = None
        self._published_snapshot: bytes | None = None
        self._waiting_logged = False
        self.publications = 0  # publications this process made (tests, metrics)
        self.last_publish_seconds: float | None = None  # change seen -> committed

    async def run(self) -> None:
        """Publish until cancelled. Wakes on every key-state change, at least every second."""
        seen = -1
        while True:
            started = time.monotonic()
            target = self._view.revision
            try:
                if await self.publish_once() is not None and target != seen:
                    self.last_publish_seconds = time.monotonic() - started
                seen = target
            except KmsError as error:
                log.warning("TUF publication failed: %s", error.diagnostics())
                self._published = None  # re-read everything next round
                await asyncio.sleep(0.5)
            # No change within the interval is fine: the round checks the timestamp's age.
            with contextlib.suppress(Unavailable):
                await self._view.wait_for_revision(seen + 1, timeout=min(
                    1.0, self._lead_interval))

    async def _leading(self) -> bool:
        lease = self._view.lease_id
        if lease is None or not self._view.current:
            return False
        now = time.monotonic()
        if now < self._leading_until:
            return True
        if await self._registry.try_lead(ROLE, self._signer_id, lease):
            # Re-asked every lead_interval; well inside the lease TTL that holds the role.
            self._leading_until = now + self._lead_interval
            return True
        self._published = None  # someone else publishes; re-read when we lead again
        return False

    async def _current_root(self) -> tuple[int, Root] | None:
        now = time.monotonic()
        if self._root is None or now - self._root_checked >= self._root_interval:
            latest = await self._repo.latest_root()
            self._root_checked = now
            if latest is not None:
                version, data = latest
                self._root = (version, Metadata[Root].from_bytes(data).signed)
        return self._root

    async def publish_once(self) -> Publication | None:
        """One round: publish if this signer leads and something is due. Returns the new
        publication, or None. Raises ``KmsError`` subclasses (store, HSM) for the caller to
        log; a lost race is retried on the next round."""
        if not await self._leading():
            return None
        root = await self._current_root()
        if root is None or not is_online_key_listed(root[1], self._online_key.key_id):
            if not self._waiting_logged:
                log.info("not publishing trust bundles yet: no root lists this region's online "
                         "key %s (bootstrap with 'signet dev up' or rotate the root)",
                         self._online_key.key_id[:16])
                self._waiting_logged = True
            return None
        root_version, root_signed = root
        if self._published is None:
            previous, mod_revision = await self._repo.publication()
            self._published_bundle = self._published_snapshot = None
        else:
            previous, mod_revision = self._published
        online_ids = list(root_signed.roles[Timestamp.type].keyids)
        revision = self._view.revision
        bundle = await self._bundle(previous, revision, online_ids)
        now = self._clock.now()
        plan = plan_publication(previous, root_version=root_version, online_key_ids=online_ids,
                                bundle=bundle, bundle_etcd_revision=revision, now=now,
                                expiry=self._expiry)
        if plan is None:
            return None
        publication = plan.publication
        files = PublicationFiles(timestamp=b"")
        snapshot_bytes = self._published_snapshot
        if plan.targets is not None and plan.snapshot is not None:
            targets_bytes = await self._signer.sign_metadata(plan.targets)
            pin_targets(plan.snapshot, targets_bytes)
            snapshot_bytes = await self._signer.sign_metadata(plan.snapshot)
            new_bundle = None if previous is not None and (
                previous.bundle_sha256 == publication.bundle_sha256) else plan.bundle
            files = PublicationFiles(b"", snapshot_bytes, targets_bytes, new_bundle)
        elif snapshot_bytes is None:
            snapshot_bytes = await self._repo.read_file(
                f"{publication.snapshot_version}.snapshot.json")
            if snapshot_bytes is None:
                raise Unavailable("the published snapshot is missing; republishing next round")
        timestamp: Metadata[Timestamp] = build_timestamp(
            publication.timestamp_version, publication.timestamp_expires,
            publication.snapshot_version, snapshot_bytes)
        stamp = await self._signer.sign_metadata(timestamp)
        files = PublicationFiles(stamp, files.snapshot, files.targets, files.bundle)
        try:
            new_mod = await self._repo.commit(mod_revision, publication, files,
                                              retired_bundles=plan.retired_bundles)
        except Conflict as error:
            log.info("another publisher went first (%s); re-reading", error)
            self._published = None
            self._root = None
            return None
        self._published = (publication, new_mod)
        self._published_bundle = plan.bundle
        self._published_snapshot = snapshot_bytes
        self.publications += 1
        log.info("published trust bundle: timestamp %d, snapshot %d, targets %d, key state at "
                 "revision %d", publication.timestamp_version, publication.snapshot_version,
                 publication.targets_version, publication.bundle_etcd_revision)
        return publication

    async def _bundle(self, previous: Publication | None, revision: int,
                      online_ids: list[str]) -> bytes:
        """The bundle to publish: the published bytes when neither key state nor the online
        keys changed, else a new one."""
        if previous is not None and previous.bundle_etcd_revision == revision and tuple(
                sorted(online_ids)) == previous.online_key_ids:
            if self._published_bundle is None:
                self._published_bundle = await self._repo.read_file(
                    f"targets/{previous.bundle_sha256}.trust-bundle.json")
            if self._published_bundle is not None:
                return self._published_bundle
        online = [k for k in await self._repo.online_keys() if k.key_id in set(online_ids)]
        others = sorted(k.region for k in online if k.region != self._online_key.region)
        regions = [self._online_key.region, *others]
        return build_trust_bundle([v.key for v in self._view.all_keys()], online,
                                  regions=regions, etcd_revision=revision,
                                  generated_at=self._clock.now())

