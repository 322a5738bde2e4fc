"""The group-commit audit log: dense indexes under concurrency, checkpoints, reopen, repair.

These tests write to a temporary directory: the log's promise is about what is on disk."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.audit.checkpoint import Checkpoint, SoftwareCheckpointSigner, canonical_json
from kms.audit.errors import AuditLogCorrupt, AuditUnavailable
from kms.audit.log import CHECKPOINTS_FILE, ENTRIES_FILE, AuditLog, SignatureLines
from kms.audit.merkle import leaf_hash, root_hash
from kms.audit.verify import verify_log
from kms.errors import InvalidArgument
from kms.ports import SystemClock

LOG_ID = "eu-west/signer-1"
SIGNER = SoftwareCheckpointSigner.generate()


async def open_log(directory: Path, **kwargs: object) -> AuditLog:
    return await AuditLog.open(directory, LOG_ID, signer=SIGNER, clock=SystemClock(),
                               **kwargs)  # type: ignore[arg-type]


def entry_lines(directory: Path) -> list[bytes]:
    return (directory / ENTRIES_FILE).read_bytes().splitlines()


def checkpoints(directory: Path) -> list[Checkpoint]:
    path = directory / CHECKPOINTS_FILE
    if not path.exists():
        return []
    return [Checkpoint.from_line(line) for line in path.read_bytes().splitlines()]


def sign_entry(n: int) -> dict[str, object]:
    return {"kind": "sign", "identity": "spiffe://ci/pipeline", "key": "release",
            "digest": f"sha256:{n:064x}", "request_id": f"r-{n}"}


def test_concurrent_appends_get_dense_unique_indexes(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        log = await open_log(tmp_path)
        try:
            return await asyncio.gather(*(log.append(sign_entry(n)) for n in range(5000)))
        finally:
            await log.close()

    indexes = asyncio.run(scenario())
    assert sorted(indexes) == list(range(5000))
    lines = entry_lines(tmp_path)
    assert len(lines) == 5000
    by_index = {json.loads(line)["index"]: json.loads(line) for line in lines}
    # Each caller got the index of its own entry, not just some index.
    for n, index in enumerate(indexes):
        assert by_index[index]["request_id"] == f"r-{n}"
    report = verify_log(tmp_path, trusted_public_key_pem=SIGNER.public_key_pem)
    assert report.entries == 5000
    assert report.unsigned_entries == 0


def test_group_commit_uses_few_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kms.audit.log as log_module

    calls = 0
    real_fsync = log_module.os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        real_fsync(fd)

    async def scenario() -> None:
        log = await open_log(tmp_path, checkpoint_every_entries=10**9)
        monkeypatch.setattr(log_module.os, "fsync", counting_fsync)
        await asyncio.gather(*(log.append(sign_entry(n)) for n in range(2000)))
        appended_fsyncs = calls
        await log.close()
        assert appended_fsyncs < 50, appended_fsyncs

    asyncio.run(scenario())


def test_entries_are_canonical_and_carry_index_time_kind(tmp_path: Path) -> None:
    async def scenario() -> int:
        log = await open_log(tmp_path)
        try:
            return await log.record_signature(
                identity="spiffe://ci/pipeline", key="release", version=2, key_id="ab" * 32,
                digest="sha256:" + "cd" * 32, request_id="req-1", revision=17, region="eu-west",
            )
        finally:
            await log.close()

    assert asyncio.run(scenario()) == 0
    (line,) = entry_lines(tmp_path)
    document = json.loads(line)
    assert line == json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert document["index"] == 0
    assert document["kind"] == "sign"
    assert document["time"].endswith("Z")
    assert document["revision"] == 17


def test_malformed_entries_are_refused_without_using_an_index(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await open_log(tmp_path)
        try:
            with pytest.raises(InvalidArgument, match="kind"):
                await log.append({"identity": "x"})
            with pytest.raises(InvalidArgument, match="set by the log"):
                await log.append({"kind": "sign", "index": 7})
            with pytest.raises(InvalidArgument, match="JSON"):
                await log.append({"kind": "sign", "blob": object()})
            assert await log.append({"kind": "admin"}) == 0
        finally:
            await log.close()

    asyncio.run(scenario())
    assert len(entry_lines(tmp_path)) == 1


def test_checkpoint_every_n_entries_and_at_close(tmp_path: Path) -> None:
    anchored: list[Checkpoint] = []

    async def anchor(checkpoint: Checkpoint) -> None:
        anchored.append(checkpoint)

    async def scenario() -> None:
        log = await open_log(tmp_path, anchor=anchor, checkpoint_every_entries=10)
        try:
            for n in range(25):
                await log.append(sign_entry(n))
        finally:
            await log.close()

    asyncio.run(scenario())
    stored = checkpoints(tmp_path)
    assert [c.tree_size for c in stored] == [10, 20, 25]  # the last one written by close
    assert anchored == stored
    leaves = [leaf_hash(line) for line in entry_lines(tmp_path)]
    for checkpoint in stored:
        checkpoint.verify(SIGNER.public_key_pem)
        assert checkpoint.root == root_hash(leaves[: checkpoint.tree_size])


def test_checkpoint_after_quiet_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await open_log(tmp_path, checkpoint_every_entries=1000,
                             checkpoint_every_seconds=0.2)
        try:
            await log.append(sign_entry(0))
            await asyncio.sleep(0.6)
            assert [c.tree_size for c in checkpoints(tmp_path)] == [1]
        finally:
            await log.close()

    asyncio.run(scenario())
    # Close adds nothing when the last checkpoint already covers the whole log.
    assert [c.tree_size for c in checkpoints(tmp_path)] == [1]


def test_a_failing_anchor_does_not_fail_appends(tmp_path: Path) -> None:
    async def anchor(checkpoint: Checkpoint) -> None:
        raise ConnectionError("etcd is down")

    async def scenario() -> None:
        log = await open_log(tmp_path, anchor=anchor, checkpoint_every_entries=2)
        try:
            assert [await log.append(sign_entry(n)) for n in range(5)] == [0, 1, 2, 3, 4]
        finally:
            await log.close()

    asyncio.run(scenario())
    assert checkpoints(tmp_path)[-1].tree_size == 5


def test_reopen_continues_indexes_and_tree(tmp_path: Path) -> None:
    async def write(start: int, count: int) -> tuple[int, bytes]:
        log = await open_log(tmp_path, checkpoint_every_entries=7)
        try:
            for n in range(start, start + count):
                assert await log.append(sign_entry(n)) == n
            return log.size, log.root_hash()
        finally:
            await log.close()

    asyncio.run(write(0, 10))
    size, root = asyncio.run(write(10, 15))
    assert size == 25
    leaves = [leaf_hash(line) for line in entry_lines(tmp_path)]
    assert root == root_hash(leaves)
    report = verify_log(tmp_path, trusted_public_key_pem=SIGNER.public_key_pem)
    assert (report.entries, report.last_checkpoint and report.last_checkpoint.tree_size) == (25, 25)


def test_appends_after_close_fail_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await open_log(tmp_path)
        await log.close()
        with pytest.raises(AuditUnavailable, match="closed"):
            await log.append(sign_entry(0))

    asyncio.run(scenario())


def test_torn_last_line_is_dropped_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def write() -> None:
        log = await open_log(tmp_path)
        for n in range(3):
            await log.append(sign_entry(n))
        await log.close()

    async def reopen_and_append() -> int:
        log = await open_log(tmp_path)
        try:
            return await log.append(sign_entry(3))
        finally:
            await log.close()

    asyncio.run(write())
    with (tmp_path / ENTRIES_FILE).open("ab") as handle:
        handle.write(b'{"digest":"sha256:00","ind')  # a write cut short by a crash
    with caplog.at_level(logging.WARNING, logger="kms.audit.log"):
        assert asyncio.run(reopen_and_append()) == 3
    assert "unterminated last line" in caplog.text
    assert len(entry_lines(tmp_path)) == 4
    verify_log(tmp_path, trusted_public_key_pem=SIGNER.public_key_pem)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: [lines[0], b"not json", *lines[2:]], "line 2: not JSON"),
        (lambda lines: [lines[0], *lines[2:]], "line 2: index 2 where 1"),
        (lambda lines: lines[:2], "entries were removed"),
        (lambda lines: [lines[0].replace(b"r-0", b"r-X"), *lines[1:]], "an entry was edited"),
    ],
    ids=["garbage", "deleted", "truncated", "edited"],
)
def test_damaged_log_is_refused_on_open(tmp_path: Path, damage: object, message: str) -> None:
    async def write() -> None:
        log = await open_log(tmp_path)
        for n in range(4):
            await log.append(sign_entry(n))
        await log.close()

    asyncio.run(write())
    path = tmp_path / ENTRIES_FILE
    lines = damage(path.read_bytes().splitlines())  # type: ignore[operator]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(AuditLogCorrupt, match=message):
        asyncio.run(open_log(tmp_path))


def test_second_process_cannot_open_the_same_log(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = await open_log(tmp_path)
        try:
            with pytest.raises(AuditLogCorrupt, match="locked by another process"):
                await open_log(tmp_path)
        finally:
            await first.close()

    asyncio.run(scenario())


def test_write_failure_fails_the_batch_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import kms.audit.log as log_module

    real_write = log_module.os.write
    broken = True

    def flaky_write(fd: int, data: memoryview) -> int:
        if broken and len(data) > 10:
            real_write(fd, bytes(data[:10]))  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    async def scenario() -> None:
        nonlocal broken
        log = await open_log(tmp_path)
        try:
            assert await log.append(sign_entry(0)) == 0
            monkeypatch.setattr(log_module.os, "write", flaky_write)
            results = await asyncio.gather(*(log.append(sign_entry(n)) for n in range(1, 50)),
                                           return_exceptions=True)
            assert all(isinstance(r, AuditUnavailable) for r in results)
            assert "No space left" in str(results[0])
            assert log.failure is not None
            assert len(entry_lines(tmp_path)) == 1  # the partial line was cut back
            broken = False
            assert await log.append(sign_entry(99)) == 1
            assert log.failure is None
        finally:
            await log.close()

    asyncio.run(scenario())
    assert len(entry_lines(tmp_path)) == 2
    verify_log(tmp_path, trusted_public_key_pem=SIGNER.public_key_pem)


def test_removed_file_fails_closed_until_restored(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = await open_log(tmp_path)
        try:
            await log.append(sign_entry(0))
            saved = (tmp_path / ENTRIES_FILE).read_bytes()
            (tmp_path / ENTRIES_FILE).unlink()
            with pytest.raises(AuditUnavailable, match="removed"):
                await log.append(sign_entry(1))
            with pytest.raises(AuditUnavailable, match="removed"):
                await log.append(sign_entry(2))
            # Restoring a copy is not restoring *the* file this process holds open: still no.
            (tmp_path / ENTRIES_FILE).write_bytes(saved)
            with pytest.raises(AuditUnavailable, match="replaced"):
                await log.append(sign_entry(3))
        finally:
            await log.close()

    asyncio.run(scenario())


def test_append_many_gets_consecutive_indexes_among_single_appends(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        log = await open_log(tmp_path)
        try:
            batch = asyncio.ensure_future(log.append_many([sign_entry(n) for n in range(100, 356)]))
            singles = await asyncio.gather(*(log.append(sign_entry(n)) for n in range(10)))
            many = await batch
            assert await log.append_many([]) == []
            return many, singles
        finally:
            await log.close()

    many, singles = asyncio.run(scenario())
    assert many == list(range(many[0], many[0] + 256))
    assert sorted([*many, *singles]) == list(range(266))
    by_index = {json.loads(line)["index"]: json.loads(line) for line in entry_lines(tmp_path)}
    for n, index in zip(range(100, 356), many, strict=True):
        assert by_index[index]["request_id"] == f"r-{n}"
    assert verify_log(tmp_path, trusted_public_key_pem=SIGNER.public_key_pem).entries == 266


def test_append_many_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import kms.audit.log as log_module

    def full_disk(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        log = await open_log(tmp_path)
        try:
            with pytest.raises(InvalidArgument, match="set by the log"):
                await log.append_many([sign_entry(1), {"kind": "sign", "time": "now"}])
            with pytest.raises(InvalidArgument, match="JSON"):
                await log.append_many([sign_entry(1), {"kind": "sign", "blob": object()}])
            assert await log.append_many([sign_entry(2), sign_entry(3)]) == [0, 1]
            monkeypatch.setattr(log_module.os, "write", full_disk)
            with pytest.raises(AuditUnavailable, match="No space left"):
                await log.append_many([sign_entry(n) for n in range(4, 20)])
        finally:
            monkeypatch.undo()
            await log.close()

    asyncio.run(scenario())
    assert [json.loads(line)["request_id"] for line in entry_lines(tmp_path)] == ["r-2", "r-3"]


def test_record_signatures_writes_one_sign_entry_per_digest(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        log = await open_log(tmp_path)
        try:
            with pytest.raises(InvalidArgument, match="one request id per digest"):
                await log.record_signatures(
                    identity="i", key="k", version=1, key_id="ab", revision=3, region="r",
                    digests=["sha256:00"], request_ids=[])
            return await log.record_signatures(
                identity="spiffe://ci/pipeline", key="release", version=2, key_id="ab" * 32,
                revision=17, region="eu-west", digests=["sha256:01", "sha256:02"],
                request_ids=["b#0", "b#1"])
        finally:
            await log.close()

    assert asyncio.run(scenario()) == [0, 1]
    first, second = (json.loads(line) for line in entry_lines(tmp_path))
    assert (first["digest"], first["request_id"], second["request_id"]) == (
        "sha256:01", "b#0", "b#1")
    assert first["kind"] == second["kind"] == "sign"
    assert first["revision"] == 17
    assert first["time"] == second["time"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(identity=st.text(max_size=30), key=st.text(max_size=20), version=st.integers(0, 2**40),
       revision=st.integers(0, 2**62), items=st.lists(
           st.tuples(st.text(max_size=30), st.text(max_size=30)), min_size=1, max_size=5),
       start=st.integers(0, 2**40))
def test_batch_sign_lines_are_the_canonical_lines_of_their_entries(
    *, identity: str, key: str, version: int, revision: int, items: list[tuple[str, str]],
    start: int,
) -> None:
    shared = {"kind": "sign", "identity": identity, "key": key, "version": version,
              "key_id": "ab" * 32, "revision": revision, "region": "eu-west",
              "time": "2026-11-26T16:00:00.000000Z"}
    digests, request_ids = [d for d, _ in items], [r for _, r in items]
    lines = SignatureLines(shared, digests, request_ids).encode(start)
    assert lines == [
        canonical_json({**shared, "digest": digest, "request_id": request_id, "index": index})
        for index, (digest, request_id) in enumerate(items, start=start)]


def test_batch_sign_lines_refuse_shared_fields_holding_their_placeholder() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        SignatureLines({"kind": "sign", "identity": "\x00varies:digest\x00"}, ["d"], ["r"])


def test_record_signatures_with_an_odd_identity_takes_the_general_path(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        log = await open_log(tmp_path)
        try:
            return await log.record_signatures(
                identity="\x00varies:index\x00", key="k", version=1, key_id="ab", revision=3,
                region="r", digests=["sha256:01", "sha256:02"], request_ids=["a", "b"])
        finally:
            await log.close()

    assert asyncio.run(scenario()) == [0, 1]
    assert [json.loads(line)["identity"] for line in entry_lines(tmp_path)] == [
        "\x00varies:index\x00"] * 2
    assert verify_log(tmp_path).entries == 2
