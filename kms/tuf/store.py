"""Where the TUF repository lives: records in the key-state store (etcd), under ``tuf/``.

Layout (``StateLayout``)::

    {prefix}/tuf/online-keys/<region>   OnlineKey JSON: public key, HSM id (never the key itself)
    {prefix}/tuf/root/<N>               N.root.json, exactly as signed by the custodians
    {prefix}/tuf/publication            Publication JSON: the pointer every publish swaps
    {prefix}/tuf/files/<name>           timestamp.json, N.snapshot.json, N.targets.json,
                                        targets/<sha256>.trust-bundle.json

A publication writes its files, deletes the versions that fell out of retention and swaps the
pointer in one transaction that compares the pointer's mod_revision and the absence of the
next root, so two publishers never interleave versions and nobody publishes under a root that
was just replaced.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kms.coalescing import Coalescer
from kms.errors import AlreadyExists, Conflict, StateStoreError, Unavailable
from kms.state.etcd import RecordRead, StateLayout
from kms.tuf.repository import OnlineKey, Publication, canonical_json, unused_versions

FILE_NAME = re.compile(
    r"^(?:timestamp\.json|[1-9][0-9]{0,9}\.(?:snapshot|targets|root)\.json"
    r"|targets/[0-9a-f]{64}\.trust-bundle\.json)$"
)
_ROOT_FILE = re.compile(r"^([1-9][0-9]{0,9})\.root\.json$")
_IMMUTABLE_CACHE = 64
_ROOTS_ONE_BY_ONE = 8  # more newer roots than this are read with one prefix range


class RecordStore(Protocol):
    """Plain records with transactional compare-and-swap (``EtcdKeyStateStore`` is one)."""

    async def read_records(
        self, paths: Sequence[str] = (), *, prefixes: Sequence[str] = ()
    ) -> RecordRead: ...

    async def write_records(
        self,
        puts: Mapping[str, bytes],
        *,
        deletes: Sequence[str] = (),
        expect: Mapping[str, int] | None = None,
    ) -> int: ...


class MemoryRecordStore:
    """``RecordStore`` in memory, for unit tests: a dict and a revision counter."""

    def __init__(self) -> None:
        self.revision = 1
        self.records: dict[str, tuple[bytes, int]] = {}

    async def read_records(
        self, paths: Sequence[str] = (), *, prefixes: Sequence[str] = ()
    ) -> RecordRead:
        found = {p: self.records[p] for p in paths if p in self.records}
        for prefix in prefixes:
            found.update({p: r for p, r in self.records.items() if p.startswith(prefix)})
        return RecordRead(self.revision, found)

    async def write_records(
        self,
        puts: Mapping[str, bytes],
        *,
        deletes: Sequence[str] = (),
        expect: Mapping[str, int] | None = None,
    ) -> int:
        for path, revision in (expect or {}).items():
            actual = self.records.get(path, (b"", 0))[1]
            if actual != revision:
                raise Conflict(f"{path} is at revision {actual}, expected {revision}")
        self.revision += 1
        for path in deletes:
            self.records.pop(path, None)
        for path, value in puts.items():
            self.records[path] = (value, self.revision)
        return self.revision


@dataclass(frozen=True)
class RepositoryView:
    """One consistent state of the repository, as GetTrustBundle returns it."""

    revision: int  # store revision it was read at
    publication: Publication
    roots: tuple[bytes, ...]  # versions known_root_version+1 .. publication.root_version
    timestamp: bytes
    snapshot: bytes
    targets: bytes
    bundle: bytes


@dataclass(frozen=True)
class PublicationFiles:
    """Signed files of one publication; ``snapshot``/``targets``/``bundle`` None when only the
    timestamp was renewed."""

    timestamp: bytes
    snapshot: bytes | None = None
    targets: bytes | None = None
    bundle: bytes | None = None


class TufRepositoryStore:
    """The repository's records in a ``RecordStore``. Raises ``StateStoreError`` when the
    store cannot be reached or holds a malformed record."""

    def __init__(self, records: RecordStore, layout: StateLayout) -> None:
        self._records = records
        self._layout = layout
        self._immutable: OrderedDict[str, bytes] = OrderedDict()
        # Concurrent answers share the read of the pointer and timestamp; one that arrives
        # while a read is in flight waits for the next, so what it gets was read after it came.
        self._heads: Coalescer[None, RecordRead] = Coalescer(
            self._read_heads, "trust repository reads",
            stopped="the trust repository reader stopped")

    # -- online keys ---------------------------------------------------------------------

    async def online_key(self, region: str) -> OnlineKey | None:
        path = self._layout.tuf_online_key(region)
        found = (await self._records.read_records([path])).records.get(path)
        return None if found is None else _decode_online_key(path, found[0])

    async def online_keys(self) -> list[OnlineKey]:
        """Every registered online key, ordered by region."""
        prefix = self._layout.tuf_online_key("")
        read = await self._records.read_records(prefixes=[prefix])
        return sorted((_decode_online_key(p, v) for p, (v, _) in read.records.items()),
                      key=lambda k: k.region)

    async def register_online_key(self, key: OnlineKey) -> None:
        """Record the region's online key if none is recorded. Raises ``AlreadyExists`` when
        another process registered one first (the caller adopts that one)."""
        path = self._layout.tuf_online_key(key.region)
        try:
            await self._records.write_records({path: canonical_json(key.to_dict())},
                                              expect={path: 0})
        except Conflict:
            raise AlreadyExists(f"region {key.region} has an online key already") from None

    # -- roots -----------------------------------------------------------------------------

    async def roots(self) -> dict[int, bytes]:
        """Every stored root by version."""
        prefix = self._layout.tuf_root(0)[:-1]
        read = await self._records.read_records(prefixes=[prefix])
        roots = {}
        for path, (value, _) in read.records.items():
            suffix = path[len(prefix):]
            if suffix.isdigit():
                roots[int(suffix)] = value
        return roots

    async def latest_root(self) -> tuple[int, bytes] | None:
        roots = await self.roots()
        if not roots:
            return None
        version = max(roots)
        return version, roots[version]

    async def store_root(self, version: int, data: bytes) -> None:
        """Store ``version.root.json`` if that version is new. Raises ``AlreadyExists`` when a
        root with that version is stored already (the caller must check it is the same), and
        ``Conflict`` when the previous version is missing."""
        path = self._layout.tuf_root(version)
        expect = {path: 0}
        if version > 1:
            previous = self._layout.tuf_root(version - 1)
            read = await self._records.read_records([previous])
            if previous not in read.records:
                raise Conflict(f"root version {version - 1} is not stored; store it first")
            expect[previous] = read.records[previous][1]
        try:
            await self._records.write_records({path: data}, expect=expect)
        except Conflict:
            raise AlreadyExists(f"root version {version} is stored already") from None

    # -- publications ----------------------------------------------------------------------

    async def publication(self) -> tuple[Publication | None, int]:
        """The current pointer and its mod_revision (0 when nothing was published)."""
        path = self._layout.tuf_publication
        found = (await self._records.read_records([path])).records.get(path)
        if found is None:
            return None, 0
        return _decode_publication(path, found[0]), found[1]

    async def commit(
        self,
        previous_mod_revision: int,
        publication: Publication,
        files: PublicationFiles,
        *,
        retired_bundles: Sequence[str] = (),
    ) -> int:
        """Write one publication atomically; see the module docstring.

        Raises ``Conflict`` when someone published (or stored a newer root) since
        ``previous_mod_revision`` was read.
        """
        file = self._layout.tuf_file
        puts = {file("timestamp.json"): files.timestamp,
                self._layout.tuf_publication: canonical_json(publication.to_dict())}
        deletes = []
        if files.snapshot is not None:
            puts[file(f"{publication.snapshot_version}.snapshot.json")] = files.snapshot
            old = unused_versions(publication.snapshot_version)
            if old is not None:
                deletes.append(file(f"{old}.snapshot.json"))
        if files.targets is not None:
            puts[file(f"{publication.targets_version}.targets.json")] = files.targets
            old = unused_versions(publication.targets_version)
            if old is not None:
                deletes.append(file(f"{old}.targets.json"))
        if files.bundle is not None:
            puts[file(f"targets/{publication.bundle_sha256}.trust-bundle.json")] = files.bundle
        deletes += [file(f"targets/{sha}.trust-bundle.json") for sha in retired_bundles]
        expect = {self._layout.tuf_publication: previous_mod_revision,
                  self._layout.tuf_root(publication.root_version + 1): 0}
        return await self._records.write_records(puts, deletes=deletes, expect=expect)

    # -- reading what is served ------------------------------------------------------------

    async def read_file(self, name: str) -> bytes | None:
        """A served file by its repository name (``FILE_NAME``), or None if absent.

        Everything but ``timestamp.json`` is immutable once written, so those are cached.
        """
        if not FILE_NAME.match(name):
            return None
        cached = self._immutable.get(name)
        if cached is not None:
            self._immutable.move_to_end(name)
            return cached
        root = _ROOT_FILE.match(name)
        path = self._layout.tuf_root(int(root.group(1))) if root else self._layout.tuf_file(name)
        found = (await self._records.read_records([path])).records.get(path)
        if found is None:
            return None
        if name != "timestamp.json":
            self._immutable[name] = found[0]
            while len(self._immutable) > _IMMUTABLE_CACHE:
                self._immutable.popitem(last=False)
        return found[0]

    async def _read_heads(self, waiting: list[None]) -> list[RecordRead]:
        paths = [self._layout.tuf_publication, self._layout.tuf_file("timestamp.json")]
        head = await self._records.read_records(paths)
        return [head] * len(waiting)

    async def current(self, known_root_version: int = 0) -> RepositoryView:
        """The published repository: pointer, timestamp, and what they name, plus the roots
        newer than ``known_root_version``. Raises ``Unavailable`` when nothing is published."""
        pointer, stamp = self._layout.tuf_publication, self._layout.tuf_file("timestamp.json")
        head = await self._heads(None)
        if pointer not in head.records or stamp not in head.records:
            raise Unavailable(
                "no trust bundle has been published yet: the cluster's root metadata may not "
                "be bootstrapped ('signet dev up' does it); retry shortly"
            )
        publication = _decode_publication(pointer, head.records[pointer][0])
        names = [f"{publication.snapshot_version}.snapshot.json",
                 f"{publication.targets_version}.targets.json",
                 f"targets/{publication.bundle_sha256}.trust-bundle.json"]
        found: list[bytes] = []
        for name in names:
            data = await self.read_file(name)
            if data is None:
                raise Unavailable(f"repository file {name} is missing (a publication is in "
                                  "progress or the store is damaged); retry")
            found.append(data)
        wanted = range(known_root_version + 1, publication.root_version + 1)
        if len(wanted) > _ROOTS_ONE_BY_ONE:
            # A client far behind: one read of every root beats a round trip per root.
            roots = await self.roots()
            newer = [roots[version] for version in wanted if version in roots]
        else:
            # Root files are immutable too (create-if-absent), so after the first answer
            # these come from the cache: one etcd round trip per answer, not one per root.
            newer = []
            for version in wanted:
                root = await self.read_file(f"{version}.root.json")
                if root is not None:
                    newer.append(root)
        return RepositoryView(head.revision, publication, tuple(newer), head.records[stamp][0],
                              found[0], found[1], found[2])


def _decode_online_key(path: str, value: bytes) -> OnlineKey:
    try:
        return OnlineKey.from_dict(json.loads(value))
    except (ValueError, KeyError, TypeError) as error:
        raise StateStoreError(f"{path} is not a valid online-key record: {error}") from error


def _decode_publication(path: str, value: bytes) -> Publication:
    try:
        return Publication.from_dict(json.loads(value))
    except (ValueError, KeyError, TypeError) as error:
        raise StateStoreError(f"{path} is not a valid publication record: {error}") from error
