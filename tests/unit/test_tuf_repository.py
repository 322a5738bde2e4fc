"""Pure building of the TUF repository: versions, bundle content, expiry, roots, and the
store's compare-and-swap."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Root

from kms.domain.keys import Algorithm, Key, Replication
from kms.errors import Conflict, InvalidArgument
from kms.state.etcd import RecordRead, StateLayout
from kms.tuf.repository import (
    RETAINED_VERSIONS,
    ExpiryPolicy,
    OnlineKey,
    build_root,
    build_trust_bundle,
    pin_targets,
    plan_publication,
)
from kms.tuf.signing import init_root, rotate_root
from kms.tuf.store import MemoryRecordStore, PublicationFiles, TufRepositoryStore
from tests.unit.tuf_simulator import spki

NOW = 1_800_000_000.0
EXPIRY = ExpiryPolicy(timestamp_seconds=3600, timestamp_resign_seconds=600,
                      metadata_seconds=7200)


def online() -> OnlineKey:
    return OnlineKey("local", spki(ec.generate_private_key(ec.SECP256R1())), b"\0" * 16, NOW)


def a_key(name: str = "k") -> Key:
    return Key.new(name=name, algorithm=Algorithm.ECDSA_P256_SHA256,
                   replication=Replication.REGIONAL,
                   public_key_der=spki(ec.generate_private_key(ec.SECP256R1())),
                   hsm_id=b"\1" * 16, now=NOW)


def bundle(keys: list[Key], revision: int, key: OnlineKey) -> bytes:
    return build_trust_bundle(keys, [key], regions=["local"], etcd_revision=revision,
                              generated_at=NOW)


def test_bundle_lists_every_version_with_state_window_and_key() -> None:
    key = a_key()
    key = key.rotate(now=NOW + 1, public_key_der=spki(ec.generate_private_key(ec.SECP256R1())),
                     hsm_id=b"\2" * 16)
    key = key.revoke(1, now=NOW + 2)
    key = key.rotate(now=NOW + 3, public_key_der=spki(ec.generate_private_key(ec.SECP256R1())),
                     hsm_id=b"\3" * 16)
    key = key.schedule_destroy(2, now=NOW + 4, waiting_seconds=0)
    key, _ = key.destroy_due(NOW + 5)
    region_key = online()
    document = json.loads(bundle([key], 42, region_key))
    assert document["etcd_revision"] == 42
    versions = {v["number"]: v for v in document["keys"][0]["versions"]}
    assert {n: (v["state"], v["revoked"]) for n, v in versions.items()} == {
        1: ("REVOKED", True), 2: ("DESTROYED", False), 3: ("ACTIVE", False)}
    assert versions[1]["not_after"] == "2027-01-15T08:00:02.000000Z"
    assert versions[3]["not_after"] is None
    assert versions[3]["primary"] is True
    assert versions[3]["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert document["keys"][0]["regions"] == ["local"]
    assert document["online_keys"]["local"]["key_id"] == region_key.key_id


def test_first_publication_then_versions_only_move_up() -> None:
    key = online()
    first = plan_publication(None, root_version=1, online_key_ids=[key.key_id],
                             bundle=bundle([], 5, key), bundle_etcd_revision=5, now=NOW,
                             expiry=EXPIRY)
    assert first is not None
    assert first.targets is not None
    assert first.snapshot is not None
    pub = first.publication
    assert (pub.timestamp_version, pub.snapshot_version, pub.targets_version) == (1, 1, 1)
    assert first.targets.signed.version == 1
    assert first.snapshot.signed.meta["targets.json"].version == 1
    signed_targets = b'{"signed": "targets bytes as signed"}'
    pin_targets(first.snapshot, signed_targets)
    pinned = first.snapshot.signed.meta["targets.json"]
    assert pinned.length == len(signed_targets)
    assert pinned.hashes == {"sha256": hashlib.sha256(signed_targets).hexdigest()}

    # Nothing changed and the timestamp is young: nothing to do.
    assert plan_publication(pub, root_version=1, online_key_ids=[key.key_id],
                            bundle=first.bundle, bundle_etcd_revision=5, now=NOW + 10,
                            expiry=EXPIRY) is None

    # Key state changed: all three roles move up by one.
    changed = plan_publication(pub, root_version=1, online_key_ids=[key.key_id],
                               bundle=bundle([a_key()], 6, key), bundle_etcd_revision=6,
                               now=NOW + 20, expiry=EXPIRY)
    assert changed is not None
    assert changed.targets is not None
    p2 = changed.publication
    assert (p2.timestamp_version, p2.snapshot_version, p2.targets_version) == (2, 2, 2)
    assert p2.bundle_etcd_revision == 6

    # The timestamp grew old: it alone is renewed, pointing at the same snapshot.
    renewed = plan_publication(p2, root_version=1, online_key_ids=[key.key_id],
                               bundle=changed.bundle, bundle_etcd_revision=6,
                               now=NOW + 20 + EXPIRY.timestamp_resign_seconds, expiry=EXPIRY)
    assert renewed is not None
    assert renewed.targets is None
    assert renewed.snapshot is None
    p3 = renewed.publication
    assert (p3.timestamp_version, p3.snapshot_version, p3.targets_version) == (3, 2, 2)
    assert p3.timestamp_expires == NOW + 20 + EXPIRY.timestamp_resign_seconds + 3600


def test_snapshot_and_targets_are_renewed_before_they_could_outlive_a_timestamp() -> None:
    key = online()
    first = plan_publication(None, root_version=1, online_key_ids=[key.key_id],
                             bundle=bundle([], 5, key), bundle_etcd_revision=5, now=NOW,
                             expiry=EXPIRY)
    assert first is not None
    # metadata expires at NOW+7200; at NOW+3601 less than one timestamp lifetime is left.
    late = plan_publication(first.publication, root_version=1, online_key_ids=[key.key_id],
                            bundle=first.bundle, bundle_etcd_revision=5, now=NOW + 3601,
                            expiry=EXPIRY)
    assert late is not None
    assert late.targets is not None
    assert late.publication.metadata_expires == NOW + 3601 + 7200


def test_a_new_root_or_online_key_set_republishes_everything() -> None:
    key, other = online(), online()
    first = plan_publication(None, root_version=1, online_key_ids=[key.key_id],
                             bundle=bundle([], 5, key), bundle_etcd_revision=5, now=NOW,
                             expiry=EXPIRY)
    assert first is not None
    for kwargs in ({"root_version": 2, "online_key_ids": [key.key_id]},
                   {"root_version": 1, "online_key_ids": [key.key_id, other.key_id]}):
        plan = plan_publication(first.publication, bundle=first.bundle, bundle_etcd_revision=5,
                                now=NOW + 1, expiry=EXPIRY, **kwargs)  # type: ignore[arg-type]
        assert plan is not None
        assert plan.targets is not None


def test_old_bundles_fall_out_of_retention() -> None:
    key = online()
    previous = None
    retired: list[str] = []
    for revision in range(1, RETAINED_VERSIONS + 3):
        plan = plan_publication(previous, root_version=1, online_key_ids=[key.key_id],
                                bundle=bundle([], revision, key), bundle_etcd_revision=revision,
                                now=NOW + revision, expiry=EXPIRY)
        assert plan is not None
        retired += plan.retired_bundles
        previous = plan.publication
    assert previous is not None
    assert len(previous.recent_bundles) == RETAINED_VERSIONS
    assert len(retired) == 2
    assert previous.bundle_sha256 == previous.recent_bundles[-1]


def test_expiry_policy_refuses_a_timestamp_that_would_expire_unrenewed() -> None:
    with pytest.raises(ValueError, match="resign"):
        ExpiryPolicy(timestamp_seconds=60, timestamp_resign_seconds=60)


def test_root_lists_custodians_with_threshold_and_online_keys_for_online_roles() -> None:
    custodians = [CryptoSigner.generate_ed25519() for _ in range(3)]
    key = online()
    root = init_root(custodians[:2], 2, [key.tuf_key()], expires=NOW + 86_400,
                     extra_custodian_keys=[custodians[2].public_key])
    signed = root.signed
    assert signed.version == 1
    assert signed.consistent_snapshot
    assert signed.roles["root"].threshold == 2
    assert len(signed.roles["root"].keyids) == 3
    for role in ("targets", "snapshot", "timestamp"):
        assert signed.roles[role].keyids == [key.key_id]
        assert signed.roles[role].threshold == 1
    with pytest.raises(InvalidArgument, match="threshold"):
        init_root(custodians[:1], 2, [key.tuf_key()], expires=NOW + 86_400,
                  extra_custodian_keys=[custodians[2].public_key])
    with pytest.raises(ValueError, match="between 1 and"):
        build_root(custodian_keys=[c.public_key for c in custodians], threshold=4,
                   online_keys=[key.tuf_key()], version=1, expires=NOW)


def test_root_rotation_needs_the_old_and_the_new_threshold() -> None:
    old = [CryptoSigner.generate_ed25519() for _ in range(3)]
    new = [CryptoSigner.generate_ed25519() for _ in range(2)]
    key = online()
    root = init_root(old, 2, [key.tuf_key()], expires=NOW + 86_400)
    rotated = rotate_root(root, old[:2], new, 2, [key.tuf_key()], expires=NOW + 86_400)
    assert rotated.signed.version == 2
    root.verify_delegate(Root.type, rotated)
    rotated.verify_delegate(Root.type, rotated)
    with pytest.raises(InvalidArgument, match="current root's threshold"):
        rotate_root(root, old[:1], new, 2, [key.tuf_key()], expires=NOW + 86_400)
    with pytest.raises(InvalidArgument, match="between 1 and the 1 custodian"):
        rotate_root(root, old[:2], new[:1], 2, [key.tuf_key()], expires=NOW + 86_400)


def test_two_publishers_never_interleave_versions() -> None:
    async def scenario() -> None:
        repo = TufRepositoryStore(MemoryRecordStore(), StateLayout())
        key = online()
        plan = plan_publication(None, root_version=1, online_key_ids=[key.key_id],
                                bundle=bundle([], 1, key), bundle_etcd_revision=1, now=NOW,
                                expiry=EXPIRY)
        assert plan is not None
        files = PublicationFiles(b"ts", b"snap", b"targets", plan.bundle)
        await repo.commit(0, plan.publication, files)
        publication, mod = await repo.publication()
        assert publication == plan.publication
        # A second publisher that read the pointer before the first wrote it loses.
        with pytest.raises(Conflict):
            await repo.commit(0, plan.publication, files)
        # Nobody publishes under root 1 once root 2 is stored.
        await repo.store_root(1, b"root1")
        await repo.store_root(2, b"root2")
        with pytest.raises(Conflict):
            await repo.commit(mod, plan.publication, files)
        assert await repo.read_file("1.snapshot.json") == b"snap"
        assert await repo.read_file("2.root.json") == b"root2"
        assert await repo.read_file("../keys/x") is None

    asyncio.run(scenario())


class CountingRecordStore(MemoryRecordStore):
    """Counts reads; each read takes a moment, as an etcd round trip does."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    async def read_records(self, paths: Sequence[str] = (), *,
                           prefixes: Sequence[str] = ()) -> RecordRead:
        self.reads.append((tuple(paths), tuple(prefixes)))
        read = await super().read_records(paths, prefixes=prefixes)
        await asyncio.sleep(0.01)
        return read


def test_concurrent_answers_share_one_fresh_read_and_roots_come_from_the_cache() -> None:
    async def scenario() -> None:
        records = CountingRecordStore()
        repo = TufRepositoryStore(records, StateLayout())
        key = online()
        plan = plan_publication(None, root_version=2, online_key_ids=[key.key_id],
                                bundle=bundle([], 1, key), bundle_etcd_revision=1, now=NOW,
                                expiry=EXPIRY)
        assert plan is not None
        await repo.store_root(1, b"root1")
        await repo.store_root(2, b"root2")
        await repo.commit(0, plan.publication, PublicationFiles(b"ts", b"snap", b"targets",
                                                                plan.bundle))
        first = await repo.current(0)
        assert first.roots == (b"root1", b"root2")
        records.reads.clear()

        views = await asyncio.gather(*(repo.current(known) for known in (0, 1, 2) * 4))
        # Twelve answers, one read of the pointer and timestamp, nothing else from the store.
        assert len(records.reads) == 1
        assert not records.reads[0][1]  # no prefix read (of every root)
        assert {view.revision for view in views} == {first.revision}
        assert [view.roots for view in views[:3]] == [(b"root1", b"root2"), (b"root2",), ()]

        # An answer asked for while a read is in flight waits for a read of its own, so it
        # sees what was published before it asked.
        records.reads.clear()
        early = asyncio.create_task(repo.current(2))
        await asyncio.sleep(0.001)  # the read for "early" is in flight
        revision = await repo._records.write_records({StateLayout().tuf_file("timestamp.json"):
                                                      b"ts2"})
        late = await repo.current(2)
        assert (await early).revision < revision <= late.revision
        assert late.timestamp == b"ts2"
        assert len(records.reads) == 2

    asyncio.run(scenario())


def test_a_client_many_roots_behind_gets_them_in_one_read() -> None:
    async def scenario() -> None:
        records = CountingRecordStore()
        repo = TufRepositoryStore(records, StateLayout())
        key = online()
        for version in range(1, 21):
            await repo.store_root(version, f"root{version}".encode())
        plan = plan_publication(None, root_version=20, online_key_ids=[key.key_id],
                                bundle=bundle([], 1, key), bundle_etcd_revision=1, now=NOW,
                                expiry=EXPIRY)
        assert plan is not None
        await repo.commit(0, plan.publication, PublicationFiles(b"ts", b"snap", b"targets",
                                                                plan.bundle))
        await repo.current(20)  # the snapshot, targets and bundle are cached now
        records.reads.clear()
        view = await repo.current(0)
        assert view.roots == tuple(f"root{v}".encode() for v in range(1, 21))
        # The pointer and timestamp, then every root in one prefix range: two reads, not 21.
        assert len(records.reads) == 2
        assert records.reads[1][1]

    asyncio.run(scenario())
