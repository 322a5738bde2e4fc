"""Attacks on python-tuf's ngclient, unmodified, with a real dev cluster's repository.

Real metadata is captured from a running signer's /tuf/ at three points in time (A, B, C; a key
change between each, so every role's version moves). An unmodified ``tuf.ngclient.Updater``
then talks to a man in the middle — a ``FetcherInterface`` (python-tuf's documented extension
point) serving bytes we choose — and must refuse each attack with the python-tuf exception
named in the table, leaving its metadata folder byte for byte as it was.

Nobody here can sign with the HSM's online key, so every attack uses captured, genuinely signed
bytes: older files (rollback, replay), files from different points (mix-and-match), bytes with
a flipped signature or signed by a custodian key that root does not name for the role (wrong
key), a flipped bundle byte (tampered target), a stream that never ends (endless data). The
freeze attack serves a never-seen, genuine timestamp after its expiry: ngclient takes no clock,
so the test moves the reference time of its ``TrustedMetadataSet`` (patched ``datetime``).

TUF itself has no nonce: a replay of the metadata the client already trusts is accepted as "no
news" until it expires (the freeze case). Signet's GetTrustBundle adds nonce-bound freshness
for that; tests/unit/test_trust_client.py covers it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Snapshot, Timestamp
from tuf.ngclient import FetcherInterface, Updater
from tuf.ngclient._internal import trusted_metadata_set

from kms.tuf.signing import load_custodian_signer
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e

BUNDLE = "trust-bundle.json"
Files = dict[str, bytes]  # path under the /tuf/ URL -> bytes


class HttpsFetcher(FetcherInterface):
    """Plain HTTPS to the signer, trusting the dev CA (to capture genuine metadata)."""

    def __init__(self, ca: Path, base_url: str) -> None:
        self._context = ssl.create_default_context(cafile=str(ca))
        self._base = base_url
        self.seen: Files = {}

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            with urllib.request.urlopen(url, context=self._context, timeout=10) as answer:  # noqa: S310 - https to the test's own signer
                data: bytes = answer.read()
        except urllib.error.HTTPError as error:
            raise tuf_errors.DownloadHTTPError(str(error), error.code) from None
        self.seen[url.removeprefix(self._base)] = data
        return iter([data])


class ManInTheMiddle(FetcherInterface):
    """Serves the chosen files (404 for any other); ``endless`` names files streamed forever."""

    def __init__(self, base_url: str, files: Files, *, endless: frozenset[str] = frozenset(),
                 unreachable: frozenset[str] = frozenset()) -> None:
        self._base = base_url
        self._files = files
        self._endless = endless
        self._unreachable = unreachable
        self.requested: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = url.removeprefix(self._base)
        self.requested.append(path)
        if path in self._endless:
            return _forever()
        if path in self._unreachable:
            raise tuf_errors.DownloadError(f"connection reset while fetching {path}")
        if path not in self._files:
            raise tuf_errors.DownloadHTTPError(f"{path} not found", 404)
        return iter([self._files[path]])


def _forever() -> Iterator[bytes]:
    chunk = b"{" * 65_536
    while True:
        yield chunk


@dataclasses.dataclass(frozen=True)
class Capture:
    """One point in time of the repository: the files a fresh client downloaded."""

    files: Files

    def metadata_version(self, role: str) -> int:
        if role == "timestamp":
            return self._timestamp().signed.version
        if role == "snapshot":
            return self._snapshot().signed.version
        return self.targets_version

    @property
    def targets_version(self) -> int:
        return self._snapshot().signed.meta["targets.json"].version

    def _timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_bytes(self.files["timestamp.json"])

    def _snapshot(self) -> Metadata[Snapshot]:
        version = self._timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_bytes(self.files[f"{version}.snapshot.json"])

    def path(self, role: str) -> str:
        """Where ngclient asks for ``role`` of this point (consistent snapshots)."""
        if role == "timestamp":
            return "timestamp.json"
        if role == "bundle":
            return next(p for p in self.files if p.endswith("." + BUNDLE))
        return f"{self.metadata_version(role)}.{role}.json"

    def file(self, role: str) -> bytes:
        return self.files[self.path(role)]

    @property
    def timestamp_expires(self) -> datetime.datetime:
        return self._timestamp().signed.expires


@dataclasses.dataclass
class Repository:
    cluster: RunningCluster
    url: str
    root: bytes
    a: Capture
    b: Capture
    c: Capture


def _capture(cluster: RunningCluster, url: str, root: bytes, workdir: Path) -> Capture:
    assert cluster.cluster.ca is not None
    fetcher = HttpsFetcher(cluster.cluster.ca, url)
    updater = Updater(str(workdir / "metadata"), url, str(workdir / "targets"), url + "targets/",
                      fetcher=fetcher, bootstrap=root)
    updater.refresh()
    info = updater.get_targetinfo(BUNDLE)
    assert info is not None
    updater.download_target(info)
    return Capture(dict(fetcher.seen))


def _published_timestamp(cluster: RunningCluster, url: str) -> int:
    assert cluster.cluster.ca is not None
    context = ssl.create_default_context(cafile=str(cluster.cluster.ca))
    with urllib.request.urlopen(url + "timestamp.json", context=context,  # noqa: S310 - https to the test's own signer
                                timeout=10) as answer:
        return int(json.loads(answer.read())["signed"]["version"])


def _after_publication(cluster: RunningCluster, url: str, change: Callable[[], object]) -> None:
    before = _published_timestamp(cluster, url)
    change()
    deadline = time.monotonic() + 15
    while _published_timestamp(cluster, url) <= before:
        assert time.monotonic() < deadline, "the key change was never published"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def repository(dev_cluster: RunningCluster,
               tmp_path_factory: pytest.TempPathFactory) -> Repository:
    url = str(dev_cluster.cluster.extra["tuf_url"])
    root = (dev_cluster.dev.state_dir / str(dev_cluster.cluster.extra["tuf_root"])).read_bytes()
    workdir = tmp_path_factory.mktemp("captures")
    a = _capture(dev_cluster, url, root, workdir / "a")
    _after_publication(dev_cluster, url, lambda: dev_cluster.create_key("ngclient-attack"))
    b = _capture(dev_cluster, url, root, workdir / "b")
    _after_publication(dev_cluster, url, lambda: dev_cluster.rotate_key("ngclient-attack"))
    c = _capture(dev_cluster, url, root, workdir / "c")
    for role in ("timestamp", "snapshot", "targets"):
        assert a.metadata_version(role) < b.metadata_version(role) < c.metadata_version(role)
    return Repository(dev_cluster, url, root, a, b, c)


# -- the client ------------------------------------------------------------------------------


def _updater(repo: Repository, folder: Path, fetcher: FetcherInterface) -> Updater:
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    return Updater(str(folder / "metadata"), repo.url, str(folder / "targets"),
                   repo.url + "targets/", fetcher=fetcher, bootstrap=repo.root)


def _trust(repo: Repository, folder: Path, capture: Capture) -> None:
    """Bring the client in ``folder`` honestly up to ``capture``."""
    updater = _updater(repo, folder, ManInTheMiddle(repo.url, capture.files))
    updater.refresh()
    info = updater.get_targetinfo(BUNDLE)
    assert info is not None
    updater.download_target(info)


def _interrupted(repo: Repository, folder: Path, capture: Capture, before: str) -> None:
    """A refresh towards ``capture`` cut off (connection reset) before ``before`` arrived:
    ngclient keeps what it verified so far, e.g. the newer timestamp."""
    fetcher = ManInTheMiddle(repo.url, capture.files,
                             unreachable=frozenset({capture.path(before)}))
    with pytest.raises(tuf_errors.DownloadError):
        _updater(repo, folder, fetcher).refresh()


def _files(folder: Path) -> Files:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# The snapshot pins targets.json by length and SHA-256 (kms.tuf.repository.pin_targets): any
# other targets file is refused on those before its version is looked at — as a length
# overrun when it is longer (signatures vary in length), else as a hash mismatch.
NOT_THE_PINNED_BYTES = (tuf_errors.LengthOrHashMismatchError,
                        tuf_errors.DownloadLengthMismatchError)


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    trusted: Callable[[Repository, Path], None]  # brings the client to its trusted state
    served: Callable[[Repository], Files]  # what the man in the middle serves
    expected: type[Exception] | tuple[type[Exception], ...]
    endless: Callable[[Repository], frozenset[str]] = lambda _: frozenset()
    target: bool = False  # the attack is on the target download, after an honest refresh
    reference_time: Callable[[Repository], datetime.datetime] | None = None


def _at_b(repo: Repository, folder: Path) -> None:
    _trust(repo, folder, repo.b)


def _b_then_timestamp_c(repo: Repository, folder: Path) -> None:
    _trust(repo, folder, repo.b)
    _interrupted(repo, folder, repo.c, "snapshot")


def _b_then_snapshot_c(repo: Repository, folder: Path) -> None:
    _trust(repo, folder, repo.b)
    _interrupted(repo, folder, repo.c, "targets")


def _with(capture: Capture, **replacements: bytes) -> Files:
    """``capture``'s files with some roles' bytes replaced, at that capture's paths."""
    files = dict(capture.files)
    for role, data in replacements.items():
        files[capture.path(role)] = data
    return files


def _flip_signature(data: bytes) -> bytes:
    """The same bytes but one hex digit of the signature (same length)."""
    sig = json.loads(data)["signatures"][0]["sig"]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    return data.replace(sig.encode(), flipped.encode(), 1)


def _signed_by_custodian(repo: Repository, data: bytes) -> bytes:
    metadata = Metadata[Timestamp].from_bytes(data)
    metadata.signatures.clear()
    metadata.sign(load_custodian_signer(repo.cluster.custodian_keys()[0]))
    return metadata.to_bytes()


def _tampered(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


# The timestamp pins the snapshot's length and SHA-256: a longer file is cut off while it
# downloads, one of the same length fails the hash (captures differ by a few bytes, if at all).
PINNED_BY_TIMESTAMP = (tuf_errors.DownloadLengthMismatchError,
                       tuf_errors.LengthOrHashMismatchError)

ATTACKS = [
    Attack("rollback: an older timestamp than trusted", _at_b,
           lambda r: r.a.files, tuf_errors.BadVersionNumberError),
    Attack("rollback: an older snapshot under the newer timestamp", _b_then_timestamp_c,
           lambda r: _with(r.c, snapshot=r.a.file("snapshot")), PINNED_BY_TIMESTAMP),
    Attack("rollback: an older targets under the newer snapshot", _b_then_snapshot_c,
           lambda r: _with(r.c, targets=r.a.file("targets")),
           NOT_THE_PINNED_BYTES),
    Attack("replay: a whole captured older response", _at_b,
           lambda r: r.a.files, tuf_errors.BadVersionNumberError),
    Attack("replay: the trusted response again, after it expired (freeze)", _at_b,
           lambda r: r.b.files, tuf_errors.ExpiredMetadataError,
           reference_time=lambda r: r.b.timestamp_expires + datetime.timedelta(seconds=1)),
    Attack("freeze: a never-seen genuine timestamp, served after its expiry", _at_b,
           lambda r: r.c.files, tuf_errors.ExpiredMetadataError,
           reference_time=lambda r: r.c.timestamp_expires + datetime.timedelta(seconds=1)),
    Attack("mix-and-match: the trusted snapshot under a newer timestamp", _b_then_timestamp_c,
           lambda r: _with(r.c, snapshot=r.b.file("snapshot")), PINNED_BY_TIMESTAMP),
    Attack("mix-and-match: the trusted targets under a newer snapshot", _b_then_snapshot_c,
           lambda r: _with(r.c, targets=r.b.file("targets")),
           NOT_THE_PINNED_BYTES),
    Attack("wrong key: a newer timestamp with its signature bytes altered", _at_b,
           lambda r: _with(r.c, timestamp=_flip_signature(r.c.file("timestamp"))),
           tuf_errors.UnsignedMetadataError),
    Attack("wrong key: a newer timestamp signed by a custodian key (root-only)", _at_b,
           lambda r: _with(r.c, timestamp=_signed_by_custodian(r, r.c.file("timestamp"))),
           tuf_errors.UnsignedMetadataError),
    Attack("wrong key: a newer snapshot with its signature bytes altered", _b_then_timestamp_c,
           lambda r: _with(r.c, snapshot=_flip_signature(r.c.file("snapshot"))),
           tuf_errors.LengthOrHashMismatchError),
    # The snapshot pins targets.json by length and SHA-256: altered bytes are refused by hash
    # before their signature is looked at, as for the snapshot under the timestamp.
    Attack("wrong key: newer targets with its signature bytes altered", _b_then_snapshot_c,
           lambda r: _with(r.c, targets=_flip_signature(r.c.file("targets"))),
           tuf_errors.LengthOrHashMismatchError),
    Attack("tampered target: one bundle byte flipped", _at_b,
           lambda r: _with(r.b, bundle=_tampered(r.b.file("bundle"))),
           tuf_errors.LengthOrHashMismatchError, target=True),
    Attack("endless data: timestamp.json never ends", _at_b,
           lambda r: r.c.files, tuf_errors.DownloadLengthMismatchError,
           endless=lambda r: frozenset({"timestamp.json"})),
    Attack("endless data: the snapshot never ends", _b_then_timestamp_c,
           lambda r: r.c.files, tuf_errors.DownloadLengthMismatchError,
           endless=lambda r: frozenset({r.c.path("snapshot")})),
    Attack("endless data: the targets metadata never ends", _b_then_snapshot_c,
           lambda r: r.c.files, tuf_errors.DownloadLengthMismatchError,
           endless=lambda r: frozenset({r.c.path("targets")})),
    Attack("endless data: the bundle never ends", _at_b,
           lambda r: r.b.files, tuf_errors.DownloadLengthMismatchError,
           endless=lambda r: frozenset({r.b.path("bundle")}), target=True),
]


def _refresh_and_download(updater: Updater, *, target: bool) -> None:
    updater.refresh()
    assert target, "the refresh should have been refused"
    info = updater.get_targetinfo(BUNDLE)
    assert info is not None
    updater.download_target(info)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_ngclient_refuses_the_attack_and_keeps_its_trusted_state(
    repository: Repository, tmp_path: Path, attack: Attack
) -> None:
    attack.trusted(repository, tmp_path)
    before = _files(tmp_path)
    fetcher = ManInTheMiddle(repository.url, attack.served(repository),
                             endless=attack.endless(repository))
    with contextlib.ExitStack() as stack:
        if attack.reference_time is not None:
            # ngclient takes no clock: its TrustedMetadataSet reads datetime.now() once.
            clock = stack.enter_context(mock.patch.object(
                trusted_metadata_set, "datetime", mock.Mock(wraps=datetime)))
            clock.datetime.now.return_value = attack.reference_time(repository)
        updater = _updater(repository, tmp_path, fetcher)
        with pytest.raises(attack.expected) as refused:
            _refresh_and_download(updater, target=attack.target)
    expected = attack.expected if isinstance(attack.expected, tuple) else (attack.expected,)
    assert type(refused.value) in expected, repr(refused.value)
    # Metadata and the downloaded bundle (under targets/), byte for byte.
    assert _files(tmp_path) == before, "the trusted state changed"


def test_a_replay_of_the_trusted_metadata_is_no_news_to_ngclient(
    repository: Repository, tmp_path: Path
) -> None:
    """Not an attack TUF can see (no nonce): ngclient accepts it as unchanged. Signet's
    nonce-bound GetTrustBundle closes this; the freeze case above bounds it in TUF."""
    _at_b(repository, tmp_path)
    before = _files(tmp_path)
    updater = _updater(repository, tmp_path, ManInTheMiddle(repository.url, repository.b.files))
    updater.refresh()
    assert _files(tmp_path) == before


def test_the_captures_are_what_an_honest_client_follows(repository: Repository,
                                                        tmp_path: Path) -> None:
    """The man in the middle, serving the captures in order, is an honest repository."""
    for capture in (repository.a, repository.b, repository.c):
        _trust(repository, tmp_path, capture)
        stored = Metadata[Timestamp].from_file(str(tmp_path / "metadata" / "timestamp.json"))
        assert stored.signed.version == capture.metadata_version("timestamp")
