"""Multi-region keys: HSM-to-HSM replication of key versions, and where a key may sign.

Every region has an RSA transport key pair in its own HSM (``kms.hsm.transport``), registered
at ``{prefix}/regions/<region>``. In production that record is written by the
region-onboarding ceremony (``kms.ceremony``, action ``onboard-region``) from the PEM this
signer logs at start-up; a development cluster lets the region's first signer write it itself
(``replication.bootstrap_register``), which is the seam the ceremony replaces.

The region whose HSM generated a multi-region version (the origin: its copy is ``CKA_LOCAL``
and extractable) wraps it for every other registered region and stores the blobs at
``{prefix}/replicas/<key>/<version>/<region>``. Every region's replicator sees new versions
through the signer's key-state watch, unwraps what was wrapped for it into its own HSM, and
records ``{prefix}/replicas/<key>/<version>/held/<region>``. Replicas are never extractable,
so only the origin's HSM can serve a region onboarded later (docs/adr/0010-multi-region.md).

Signing rules (``check_region`` and ``missing_replica``): a regional key signs only in its home
region (elsewhere ``FailedPrecondition`` naming it); a multi-region version this region's HSM
does not hold yet is ``Unavailable`` — never another key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kms.domain.keys import Key, Replication, VersionState
from kms.errors import FailedPrecondition, HsmError, KmsError, StateStoreError, Unavailable
from kms.hsm import transport
from kms.hsm.transport import TransportKey, WrappedKey
from kms.ports import VersionedKey

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSPORT_ROLE = "transport"
HSM_ID_SIZE = 16
# Versions that no longer sign or verify need no copy; DESTROYED ones lose theirs.
_NOT_REPLICATED = frozenset({VersionState.DESTROYED, VersionState.REVOKED})


def check_region(key: Key, region: str) -> None:
    """Raise ``FailedPrecondition`` when ``key`` is regional and lives in another region."""
    if (key.replication is Replication.REGIONAL and key.home_region is not None
            and key.home_region != region):
        raise FailedPrecondition(
            f"key {key.name!r} is regional and lives in region {key.home_region!r}; this is "
            f"region {region!r} — send the request to region {key.home_region!r}"
        )


def missing_replica(key: Key, version: int, region: str) -> KmsError:
    """The error for a version this region's HSM does not hold (yet)."""
    if key.home_region is None or key.home_region == region:
        # The key was made here, so the token should hold it: the token is damaged or this
        # signer points at the wrong one. Retrying elsewhere may work; nothing is signed here.
        return HsmError(
            f"the HSM token of region {region!r} does not hold key {key.name!r} version "
            f"{version}, which was generated here; check the token (backup restore?) and the "
            "signer's token label, or use another region"
        )
    if key.replication is Replication.MULTI_REGION:
        home = f" or use region {key.home_region!r}" if key.home_region else ""
        return Unavailable(
            f"key {key.name!r} version {version} is not yet replicated to region "
            f"{region!r}; retry{home}"
        )
    return FailedPrecondition(
        f"key {key.name!r} is regional and its HSM key is not in region {region!r}"
        + (f"; it lives in region {key.home_region!r}" if key.home_region else "")
    )


class SessionHsm(Protocol):
    """The part of ``Pkcs11Hsm`` replication needs."""

    async def run_with_session(self, fn: Callable[[Any], T]) -> T: ...
    async def destroy_key_pair(self, hsm_id: bytes) -> None: ...


class ReplicationStore(Protocol):
    """The part of ``EtcdKeyStateStore`` replication needs."""

    @property
    def layout(self) -> Any: ...
    async def get_record(self, path: str) -> dict[str, Any] | None: ...
    async def get_or_create_record(self, path: str, value: Mapping[str, Any]) -> dict[str, Any]:
        ...
    async def put_record(self, path: str, value: Mapping[str, Any]) -> int: ...
    async def try_lead(self, role: str, candidate: str, lease_id: int) -> bool: ...
    async def read_records(self, paths: Sequence[str] = (), *, prefixes: Sequence[str] = ()
                           ) -> Any: ...


class KeyView(Protocol):
    @property
    def revision(self) -> int: ...
    @property
    def lease_id(self) -> int | None: ...
    def all_keys(self) -> list[VersionedKey]: ...
    async def wait_for_revision(self, revision: int, timeout: float) -> None: ...


@dataclass
class ReplicationStats:
    """What this region's replicator did, for logs and drills."""

    wrapped: int = 0
    unwrapped: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, version created -> held


class KeyReplicator:
    """One per signer process; only the region's ``replicator/<region>`` leader (under the
    signer's lease) wraps and unwraps, so two processes sharing a token never unwrap twice."""

    def __init__(
        self, *, hsm: SessionHsm, store: ReplicationStore, view: KeyView, region: str,
        signer_id: str, bootstrap_register: bool = False, interval: float = 0.1,
        full_interval: float = 2.0, wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._hsm = hsm
        self._store = store
        self._view = view
        self.region = region
        self._signer_id = signer_id
        self._bootstrap = bootstrap_register
        self._interval = interval
        self._full_interval = full_interval
        self._now = wall_clock
        self._transport: TransportKey | None = None
        self._done: set[tuple[str, int]] = set()
        self._origin: dict[bytes, bool] = {}
        self._lock = asyncio.Lock()
        self.stats = ReplicationStats()

    @property
    def layout(self) -> Any:
        return self._store.layout

    async def start(self) -> TransportKey:
        """Make sure this region has a transport key and (in bootstrap mode) a registration.
        Raises ``HsmError`` or ``StateStoreError``."""
        self._transport = await self._ensure_transport_key()
        pem = self._transport.public_key_pem
        path = self.layout.region(self.region)
        record = await self._store.get_record(path)
        if record is None and self._bootstrap:
            # Development bootstrap standing in for the onboarding ceremony, which writes the
            # same record after M-of-N custodian approval (DESIGN.md I6).
            record = await self._store.get_or_create_record(path, {
                "region": self.region, "transport_key_pem": pem,
                "onboarded_at": self._now(), "proposal": None, "bootstrap": True,
            })
            log.info("registered region %s with its transport key (development bootstrap)",
                     self.region)
        if record is None:
            log.warning(
                "region %s is not onboarded: no multi-region key can reach it until custodians "
                "run 'signet ceremony propose onboard-region' with this transport key:\n%s",
                self.region, pem)
        elif record.get("transport_key_pem") != pem:
            log.error("region %s is registered with another transport key than this HSM's; "
                      "replicas wrapped for it cannot be unwrapped here", self.region)
        return self._transport

    async def _ensure_transport_key(self) -> TransportKey:
        path = self.layout.region_key(TRANSPORT_ROLE, self.region)
        stored = await self._store.get_record(path)
        if stored is None:
            hsm_id = os.urandom(HSM_ID_SIZE)
            label = f"signet-{TRANSPORT_ROLE}/{self.region}"
            made = await self._hsm.run_with_session(
                lambda session: transport.generate_transport_key(session, hsm_id, label))
            stored = await self._store.get_or_create_record(path, {
                "role": TRANSPORT_ROLE, "region": self.region, "algorithm": "rsa-oaep-3072",
                "hsm_id": made.hsm_id.hex(),
                "public_key_der": base64.b64encode(made.public_key_der).decode(),
            })
            if stored["hsm_id"] != made.hsm_id.hex():  # another signer of the region won
                await self._hsm.destroy_key_pair(made.hsm_id)
            else:
                log.info("generated the transport key of region %s in the HSM", self.region)
        return TransportKey(bytes.fromhex(stored["hsm_id"]),
                            base64.b64decode(stored["public_key_der"]))

    async def replicate_version(self, key: Key, number: int) -> int:
        """Wrap version ``number`` (generated here) for every other registered region that has
        neither a blob nor a copy yet. Returns how many regions were served. Called right after
        create/rotate and by the loop. Raises ``HsmError``, ``StateStoreError``."""
        if key.replication is not Replication.MULTI_REGION:
            return 0
        async with self._lock:
            read = await self._store.read_records(
                prefixes=[self.layout.regions_dir,
                          f"{self.layout.replicas_dir}{key.name}/{number}/"])
            return await self._wrap_missing(key, number, read.records, self._regions(read))

    def _regions(self, read: Any) -> dict[str, str]:
        regions = {}
        for path, (value, _) in read.records.items():
            if path.startswith(self.layout.regions_dir):
                record = json.loads(value)
                pem = record.get("transport_key_pem")
                if isinstance(pem, str):
                    regions[path[len(self.layout.regions_dir):]] = pem
        return regions

    async def _wrap_missing(self, key: Key, number: int,
                            records: Mapping[str, tuple[bytes, int]],
                            regions: Mapping[str, str]) -> int:
        version = key.version(number)
        served = 0
        for region, pem in sorted(regions.items()):
            if region == self.region:
                continue
            if (self.layout.replica(key.name, number, region) in records
                    or self.layout.replica_held(key.name, number, region) in records):
                continue
            wrapped = await self._wrap(version.hsm_id, key, pem)
            await self._store.put_record(self.layout.replica(key.name, number, region), {
                "key": key.name, "version": number, "from": self.region, "to": region,
                "hsm_id": version.hsm_id.hex(), "algorithm": key.algorithm.value,
                "wrapped_aes_key": base64.b64encode(wrapped.wrapped_aes_key).decode(),
                "wrapped_private_key": base64.b64encode(wrapped.wrapped_private_key).decode(),
                "aes_wrap": "CKM_RSA_PKCS_OAEP(SHA-1,MGF1-SHA1)",
                "key_wrap": "CKM_AES_KEY_WRAP_PAD", "wrapped_at": self._now(),
            })
            served += 1
            self.stats.wrapped += 1
            log.info("wrapped key %s version %d for region %s", key.name, number, region)
        held = self.layout.replica_held(key.name, number, self.region)
        if held not in records:
            await self._store.put_record(held, {
                "region": self.region, "how": "generated", "held_at": self._now(),
                "hsm_id": version.hsm_id.hex()})
        return served

    async def _wrap(self, hsm_id: bytes, key: Key, pem: str) -> WrappedKey:
        return await self._hsm.run_with_session(
            lambda session: transport.wrap_private_key(session, hsm_id, key.algorithm, pem))

    async def run(self) -> None:
        """Replicate until cancelled: after every key-state change, every ``interval`` while
        something is pending, and every ``full_interval`` anyway (a region onboarded later)."""
        seen = -1
        last_full = 0.0
        pending = False
        while True:
            now = time.monotonic()
            changed = self._view.revision != seen
            if changed or pending or now - last_full >= self._full_interval:
                if now - last_full >= self._full_interval:
                    self._done.clear()
                    last_full = now
                seen = self._view.revision
                try:
                    pending = await self.round()
                except (KmsError, OSError) as error:
                    pending = True
                    log.warning("replication round failed (will retry): %s", error)
            if pending:
                await asyncio.sleep(self._interval)
            else:
                with contextlib.suppress(KmsError, TimeoutError):
                    await self._view.wait_for_revision(self._view.revision + 1,
                                                       timeout=self._full_interval)

    async def round(self) -> bool:
        """One pass over every multi-region version. Returns whether work is left (a blob not
        there yet). Raises ``KmsError`` subclasses."""
        todo = [(vk.key, v.number) for vk in self._view.all_keys()
                if vk.key.replication is Replication.MULTI_REGION
                for v in vk.key.versions if (vk.key.name, v.number) not in self._done]
        if not todo:
            return False
        lease = self._view.lease_id
        if lease is None or not await self._store.try_lead(
                f"replicator/{self.region}", self._signer_id, lease):
            return False  # another signer of this region replicates
        async with self._lock:
            read = await self._store.read_records(
                prefixes=[self.layout.regions_dir, self.layout.replicas_dir])
            regions = self._regions(read)
            pending = False
            for key, number in todo:
                if not await self._one(key, number, read.records, regions):
                    pending = True
            return pending

    async def _one(self, key: Key, number: int, records: Mapping[str, tuple[bytes, int]],
                   regions: Mapping[str, str]) -> bool:
        """Bring one version up to date here; True when nothing is left to do for it."""
        version = key.version(number)
        held = await self._holds(version.hsm_id)
        if version.state in _NOT_REPLICATED:
            if held and version.state is VersionState.DESTROYED:
                await self._hsm.destroy_key_pair(version.hsm_id)
                log.info("destroyed this region's copy of key %s version %d", key.name, number)
            self._done.add((key.name, number))
            return True
        if held:
            if await self._is_origin(version.hsm_id):
                await self._wrap_missing(key, number, records, regions)
            elif self.layout.replica_held(key.name, number, self.region) not in records:
                await self._mark_held(key, number, "unwrapped")
            self._done.add((key.name, number))
            return True
        blob = records.get(self.layout.replica(key.name, number, self.region))
        if blob is None:
            return False
        record = json.loads(blob[0])
        if bytes.fromhex(record["hsm_id"]) != version.hsm_id:
            log.error("the blob for key %s version %d names another HSM object; ignored",
                      key.name, number)
            return False
        if self._transport is None:
            raise RuntimeError("KeyReplicator.start() must run before replication rounds")
        transport_id = self._transport.hsm_id
        wrapped = WrappedKey(base64.b64decode(record["wrapped_aes_key"]),
                             base64.b64decode(record["wrapped_private_key"]))
        await self._hsm.run_with_session(lambda session: transport.unwrap_private_key(
            session, transport_id, wrapped, hsm_id=version.hsm_id,
            label=f"signet/{key.name}/v{number}", algorithm=key.algorithm))
        latency = await self._mark_held(key, number, "unwrapped")
        self.stats.unwrapped += 1
        self.stats.latencies.append(latency)
        log.info("unwrapped key %s version %d into this region's HSM (%.0f ms after it was "
                 "created)", key.name, number, latency * 1000)
        self._done.add((key.name, number))
        return True

    async def _mark_held(self, key: Key, number: int, how: str) -> float:
        now = self._now()
        try:
            await self._store.put_record(self.layout.replica_held(key.name, number, self.region),
                                         {"region": self.region, "how": how, "held_at": now,
                                          "hsm_id": key.version(number).hsm_id.hex()})
        except StateStoreError:
            log.warning("could not record that region %s holds key %s version %d",
                        self.region, key.name, number)
        return now - key.version(number).created_at

    async def _holds(self, hsm_id: bytes) -> bool:
        return await self._hsm.run_with_session(
            lambda session: transport.holds_private_key(session, hsm_id))

    async def _is_origin(self, hsm_id: bytes) -> bool:
        """Whether this HSM generated the key (CKA_LOCAL) and can still wrap it."""
        if hsm_id not in self._origin:
            self._origin[hsm_id] = await self._hsm.run_with_session(
                lambda session: transport.is_origin_copy(session, hsm_id))
        return self._origin[hsm_id]
