"""Pure builders for the TUF repository that carries the trust bundle (docs/adr/0007).

Nothing here does I/O, reads a clock or signs: callers pass the time in and sign the returned
``Metadata`` (custodian keys offline, online HSM keys in ``kms.tuf.signing``). The publisher
(``kms.tuf.publisher``) decides *when* to publish with ``plan_publication`` and stores what
these functions build.

Repository shape (consistent snapshots, so every file a client fetches is immutable):

- ``N.root.json``: signed by a threshold of custodian keys; lists every region's online key
  for ``targets``, ``snapshot`` and ``timestamp`` with threshold 1 (any region may publish).
- ``N.targets.json``: one target, ``trust-bundle.json``, served as
  ``targets/<sha256>.trust-bundle.json``.
- ``N.snapshot.json`` names the targets version, length and SHA-256; ``timestamp.json`` names
  the snapshot version, length and hash, and expires soon (it is re-signed well before).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from kms.domain.keys import Key, VersionState, key_id_for

BUNDLE_TARGET = "trust-bundle.json"
BUNDLE_FORMAT = "signet-trust-bundle/v1"
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
SPEC_VERSION = "1.0.31"
# Versions of snapshot/targets metadata and bundles kept in the store after a newer one is
# published: a client that read timestamp N a moment ago can still fetch what it names.
RETAINED_VERSIONS = 8


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN: the one byte form of bundles and statements."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def format_time(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC with microseconds."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _expiry(seconds: float) -> datetime:
    # TUF expiry has whole seconds; round down so metadata never outlives what was asked.
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def spki_pem(public_key_der: bytes) -> str:
    """PEM SubjectPublicKeyInfo of a DER SubjectPublicKeyInfo."""
    public = serialization.load_der_public_key(public_key_der)
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def tuf_key(public_key_der: bytes) -> SSlibKey:
    """The TUF key for a P-256 or Ed25519 public key. Its key id is Signet's key id (hex
    SHA-256 of the DER SubjectPublicKeyInfo), so one id names a key everywhere.

    Raises ``ValueError`` for other key types.
    """
    public = serialization.load_der_public_key(public_key_der)
    if not isinstance(public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise TypeError("TUF keys must be ECDSA P-256 or Ed25519")
    if isinstance(public, ec.EllipticCurvePublicKey) and not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise TypeError("ECDSA TUF keys must be on P-256")
    return SSlibKey.from_crypto(public, keyid=key_id_for(public_key_der))


@dataclass(frozen=True)
class OnlineKey:
    """A region's online key: an ECDSA P-256 pair in that region's HSM that signs targets,
    snapshot and timestamp metadata and the region's freshness statements."""

    region: str
    public_key_der: bytes
    hsm_id: bytes
    created_at: float

    @property
    def key_id(self) -> str:
        return key_id_for(self.public_key_der)

    @property
    def public_key_pem(self) -> str:
        return spki_pem(self.public_key_der)

    def tuf_key(self) -> SSlibKey:
        return tuf_key(self.public_key_der)

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "public_key_der": base64.b64encode(self.public_key_der).decode("ascii"),
            "hsm_id": self.hsm_id.hex(),
            "key_id": self.key_id,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OnlineKey:
        """Raises ``ValueError``/``KeyError``/``TypeError`` for a malformed record."""
        key = cls(
            region=str(data["region"]),
            public_key_der=base64.b64decode(data["public_key_der"], validate=True),
            hsm_id=bytes.fromhex(data["hsm_id"]),
            created_at=float(data["created_at"]),
        )
        if data.get("key_id") not in (None, key.key_id):
            raise ValueError(f"online key of {key.region}: key_id does not match its public key")
        return key


# -- the trust bundle --------------------------------------------------------------------------


def _version_entry(key: Key, number: int) -> dict[str, Any]:
    version = key.version(number)
    return {
        "number": version.number,
        "state": version.state.value,
        "revoked": version.revoked,
        "primary": version.number == key.primary_version,
        "key_id": version.key_id,
        "public_key_pem": spki_pem(version.public_key_der),
        "not_before": format_time(version.created_at),
        # A revoked version was never trustworthy after its revocation; everything else stays
        # open-ended until a later bundle says otherwise.
        "not_after": None if version.revoked_at is None else format_time(version.revoked_at),
        "retired_at": None if version.retired_at is None else format_time(version.retired_at),
    }


def build_trust_bundle(
    keys: Iterable[Key],
    online_keys: Iterable[OnlineKey],
    *,
    regions: Sequence[str],
    etcd_revision: int,
    generated_at: float,
) -> bytes:
    """The ``trust-bundle.json`` target, canonical JSON.

    Every version of every key is listed, DESTROYED and REVOKED ones included, so a verifier
    can tell "revoked" from "unknown". ``regions`` are the regions a multi-region key lives in
    (every region with an online key); a regional key lives in its home region
    (``Key.home_region``; ``regions[0]`` for records written before keys had one).
    """
    entries = []
    for key in sorted(keys, key=lambda k: k.name):
        if key.replication.value == "multi-region":
            key_regions = list(regions)
        else:
            key_regions = [key.home_region] if key.home_region else list(regions[:1])
        entries.append({
            "name": key.name,
            "algorithm": key.algorithm.value,
            "replication": key.replication.value,
            "regions": key_regions,
            "primary_version": key.primary_version,
            "versions": [_version_entry(key, v.number) for v in key.versions],
        })
    online = {
        k.region: {"key_id": k.key_id, "public_key_pem": k.public_key_pem,
                   "algorithm": "ecdsa-p256-sha256"}
        for k in sorted(online_keys, key=lambda k: k.region)
    }
    return canonical_json({
        "format": BUNDLE_FORMAT,
        "etcd_revision": etcd_revision,
        "generated_at": format_time(generated_at),
        "keys": entries,
        "online_keys": online,
    })


def bundle_target_name(bundle: bytes) -> str:
    """The consistent-snapshot file name clients download: ``<sha256>.trust-bundle.json``."""
    return f"{hashlib.sha256(bundle).hexdigest()}.{BUNDLE_TARGET}"


# -- root ----------------------------------------------------------------------------------------


def build_root(
    *,
    custodian_keys: Sequence[SSlibKey],
    threshold: int,
    online_keys: Sequence[SSlibKey],
    version: int,
    expires: float,
) -> Metadata[Root]:
    """Unsigned root metadata: custodians for ``root`` (``threshold`` of them), every online
    key for the online roles with threshold 1, consistent snapshots on.

    Raises ``ValueError`` for a threshold outside 1..len(custodian_keys), no online key, or
    a key listed twice.
    """
    if not 1 <= threshold <= len(custodian_keys):
        raise ValueError(
            f"the root threshold must be between 1 and the {len(custodian_keys)} custodian keys, "
            f"got {threshold}"
        )
    if not online_keys:
        raise ValueError("root must list at least one online key")
    custodian_ids = [k.keyid for k in custodian_keys]
    if len(set(custodian_ids)) != len(custodian_ids):
        raise ValueError(f"custodian keys listed twice: {custodian_ids}")
    if set(custodian_ids) & {k.keyid for k in online_keys}:
        raise ValueError("a custodian key cannot also be an online key")
    root = Root(version=version, spec_version=SPEC_VERSION, expires=_expiry(expires),
                consistent_snapshot=True)
    for key in custodian_keys:
        root.add_key(key, Root.type)
    root.roles[Root.type].threshold = threshold
    for key in online_keys:
        for role in ONLINE_ROLES:
            root.add_key(key, role)
    return Metadata(root)


# -- publications -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long online metadata is valid, and when it is renewed.

    The timestamp expires ``timestamp_seconds`` after signing and is re-signed once it is
    ``timestamp_resign_seconds`` old. Snapshot and targets expire after ``metadata_seconds``
    and are renewed when less than ``timestamp_seconds`` of that is left, so a valid timestamp
    never points at expired metadata.
    """

    timestamp_seconds: float = 86_400.0
    timestamp_resign_seconds: float = 3_600.0
    metadata_seconds: float = 7 * 86_400.0

    def __post_init__(self) -> None:
        if not 0 < self.timestamp_resign_seconds < self.timestamp_seconds:
            raise ValueError("timestamp_resign_seconds must be positive and below "
                             "timestamp_seconds")
        if self.metadata_seconds < 2 * self.timestamp_seconds:
            raise ValueError("metadata_seconds must be at least twice timestamp_seconds")


@dataclass(frozen=True)
class Publication:
    """What the store holds now: the pointer record every publication swaps."""

    root_version: int
    timestamp_version: int
    snapshot_version: int
    targets_version: int
    bundle_sha256: str
    bundle_etcd_revision: int
    online_key_ids: tuple[str, ...]
    timestamp_signed_at: float
    timestamp_expires: float
    metadata_expires: float  # snapshot and targets share their expiry
    recent_bundles: tuple[str, ...] = field(default=())  # newest last, at most RETAINED_VERSIONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_version": self.root_version,
            "timestamp_version": self.timestamp_version,
            "snapshot_version": self.snapshot_version,
            "targets_version": self.targets_version,
            "bundle_sha256": self.bundle_sha256,
            "bundle_etcd_revision": self.bundle_etcd_revision,
            "online_key_ids": list(self.online_key_ids),
            "timestamp_signed_at": self.timestamp_signed_at,
            "timestamp_expires": self.timestamp_expires,
            "metadata_expires": self.metadata_expires,
            "recent_bundles": list(self.recent_bundles),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Publication:
        """Raises ``KeyError``/``TypeError``/``ValueError`` for a malformed record."""
        return cls(
            root_version=int(data["root_version"]),
            timestamp_version=int(data["timestamp_version"]),
            snapshot_version=int(data["snapshot_version"]),
            targets_version=int(data["targets_version"]),
            bundle_sha256=str(data["bundle_sha256"]),
            bundle_etcd_revision=int(data["bundle_etcd_revision"]),
            online_key_ids=tuple(str(k) for k in data["online_key_ids"]),
            timestamp_signed_at=float(data["timestamp_signed_at"]),
            timestamp_expires=float(data["timestamp_expires"]),
            metadata_expires=float(data["metadata_expires"]),
            recent_bundles=tuple(str(b) for b in data.get("recent_bundles", ())),
        )


@dataclass(frozen=True)
class PublicationPlan:
    """What to sign next. ``targets``/``snapshot`` are None when only the timestamp is renewed
    (their current versions stay)."""

    publication: Publication
    targets: Metadata[Targets] | None
    snapshot: Metadata[Snapshot] | None
    bundle: bytes
    retired_bundles: tuple[str, ...]


def plan_publication(
    previous: Publication | None,
    *,
    root_version: int,
    online_key_ids: Sequence[str],
    bundle: bytes,
    bundle_etcd_revision: int,
    now: float,
    expiry: ExpiryPolicy,
) -> PublicationPlan | None:
    """Decide whether to publish, and build the unsigned targets and snapshot if they change.

    ``bundle`` is the bundle to publish: a new one, or the published bytes when key state did
    not change. A new root, different bundle bytes, a changed set of online keys, or
    snapshot/targets closer to expiry than one timestamp lifetime publish all three roles,
    each version one higher; a timestamp ``timestamp_resign_seconds`` old is renewed alone.
    Returns None when nothing is due. The timestamp is built by ``build_timestamp`` once the
    snapshot bytes are signed.
    """
    bundle_sha = hashlib.sha256(bundle).hexdigest()
    timestamp_expires = now + expiry.timestamp_seconds
    online = tuple(sorted(online_key_ids))
    if previous is not None:
        changed = (
            bundle_sha != previous.bundle_sha256
            or root_version != previous.root_version
            or online != previous.online_key_ids
            or previous.metadata_expires - now < expiry.timestamp_seconds
        )
        if not changed:
            if now - previous.timestamp_signed_at < expiry.timestamp_resign_seconds:
                return None
            renewed = _replace_timestamp(previous, now, timestamp_expires)
            return PublicationPlan(renewed, None, None, bundle, ())
    metadata_expires = now + expiry.metadata_seconds
    targets_version = 1 if previous is None else previous.targets_version + 1
    snapshot_version = 1 if previous is None else previous.snapshot_version + 1
    recent = (*(() if previous is None else previous.recent_bundles), bundle_sha)
    recent = tuple(dict.fromkeys(reversed(recent)))[::-1]  # newest last, each once
    retired = recent[:-RETAINED_VERSIONS]
    same_bundle = previous is not None and bundle_sha == previous.bundle_sha256
    publication = Publication(
        root_version=root_version,
        timestamp_version=1 if previous is None else previous.timestamp_version + 1,
        snapshot_version=snapshot_version,
        targets_version=targets_version,
        bundle_sha256=bundle_sha,
        bundle_etcd_revision=previous.bundle_etcd_revision
        if same_bundle and previous is not None else bundle_etcd_revision,
        online_key_ids=online,
        timestamp_signed_at=now,
        timestamp_expires=timestamp_expires,
        metadata_expires=metadata_expires,
        recent_bundles=recent[-RETAINED_VERSIONS:],
    )
    return PublicationPlan(
        publication=publication,
        targets=build_targets(targets_version, metadata_expires, bundle),
        snapshot=build_snapshot(snapshot_version, metadata_expires, targets_version),
        bundle=bundle,
        retired_bundles=retired,
    )


def _replace_timestamp(previous: Publication, now: float, expires: float) -> Publication:
    data = previous.to_dict()
    data.update(timestamp_version=previous.timestamp_version + 1, timestamp_signed_at=now,
                timestamp_expires=expires)
    return Publication.from_dict(data)


def build_targets(version: int, expires: float, bundle: bytes) -> Metadata[Targets]:
    """Unsigned targets metadata listing ``trust-bundle.json`` (length and SHA-256)."""
    target = TargetFile.from_data(BUNDLE_TARGET, bundle, ["sha256"])
    return Metadata(Targets(version=version, spec_version=SPEC_VERSION, expires=_expiry(expires),
                            targets={BUNDLE_TARGET: target}))


def build_snapshot(version: int, expires: float, targets_version: int) -> Metadata[Snapshot]:
    """Unsigned snapshot metadata naming ``targets_version``; ``pin_targets`` adds the signed
    targets' length and hash once they exist."""
    return Metadata(Snapshot(version=version, spec_version=SPEC_VERSION,
                             expires=_expiry(expires),
                             meta={"targets.json": MetaFile(version=targets_version)}))


def pin_targets(snapshot: Metadata[Snapshot], targets_bytes: bytes) -> None:
    """Record the signed targets file's length and SHA-256 in ``snapshot``, so a client
    downloads exactly those bytes (and refuses any other, or an endless stream, at that
    length) rather than trusting only the version inside whatever it received, up to its
    default size cap."""
    meta = snapshot.signed.meta["targets.json"]
    meta.length = len(targets_bytes)
    meta.hashes = {"sha256": hashlib.sha256(targets_bytes).hexdigest()}


def build_timestamp(version: int, expires: float, snapshot_version: int,
                    snapshot_bytes: bytes) -> Metadata[Timestamp]:
    """Unsigned timestamp naming the snapshot version, length and SHA-256."""
    meta = MetaFile(version=snapshot_version, length=len(snapshot_bytes),
                    hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()})
    return Metadata(Timestamp(version=version, spec_version=SPEC_VERSION,
                              expires=_expiry(expires), snapshot_meta=meta))


def is_online_key_listed(root: Root, key_id: str) -> bool:
    """Whether ``key_id`` may sign the timestamp under ``root`` (it can then publish)."""
    return key_id in root.roles[Timestamp.type].keyids


def unused_versions(now_version: int) -> int | None:
    """The snapshot/targets version to delete when ``now_version`` is written (None: none)."""
    old = now_version - RETAINED_VERSIONS
    return old if old >= 1 else None


def version_states() -> tuple[str, ...]:
    """Every state a bundle entry can carry (for documentation and clients)."""
    return tuple(s.value for s in VersionState)
