"""The signer's append-only, fail-closed audit log with group commit (invariant I3).

A log lives in one directory and belongs to one signer process (``log_id`` is
``<region>/<signer-id>``)::

    entries.jsonl      one canonical JSON object per line: index, time, kind, kind's fields
    checkpoints.jsonl  one signed ``Checkpoint`` per line (see ``kms.audit.checkpoint``)

``append`` queues an entry into the current batch and waits. One committer task writes the
whole batch with one ``write`` and one ``fsync`` (in a thread the log owns, so new appends keep
queueing meanwhile), folds the leaf hashes into an O(log n) ``CompactRange``, and only then
resolves every waiter with its index. If the write or fsync fails, every waiter in the batch
gets ``AuditUnavailable``, the file is cut back to its last durable length, and later batches
first re-check the file and keep failing until it is usable again. An acknowledged index is
therefore always a complete line on disk, and a failed append never leaves a counted line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kms.audit.checkpoint import (
    Checkpoint,
    CheckpointSigner,
    canonical_json,
    format_time,
    sign_checkpoint,
    validate_log_id,
)
from kms.audit.errors import AuditLogCorrupt, AuditUnavailable
from kms.audit.merkle import CompactRange, leaf_hash
from kms.errors import InvalidArgument
from kms.ports import Clock

ENTRIES_FILE = "entries.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
RESERVED_FIELDS = frozenset({"index", "time"})

Anchor = Callable[[Checkpoint], Awaitable[None]]

logger = logging.getLogger(__name__)


class _StoreProblem(Exception):
    """The entries file is not safe to append to (removed, replaced, shorter than we wrote)."""


@dataclass
class _Pending:
    """One queue operation: a single entry (``future`` gets its index) or, from
    ``append_many``, several that are written together (``future`` gets their indices)."""

    entries: list[dict[str, Any]] | SignatureLines
    future: asyncio.Future[Any]
    many: bool = False

    def encode(self, start: int) -> list[bytes]:
        """The entries' lines, numbered from ``start``. Raises ``TypeError``/``ValueError``
        for what JSON cannot hold."""
        if isinstance(self.entries, SignatureLines):
            return self.entries.encode(start)
        lines = []
        for index, record in enumerate(self.entries, start=start):
            record["index"] = index
            lines.append(canonical_json(record))
        return lines


@dataclass
class _LoadedLog:
    fd: int
    size: int
    offset: int
    tree: CompactRange
    last_checkpoint: Checkpoint | None
    repairs: list[str] = field(default_factory=list)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return f"{os.strerror(error.errno)} ({errno.errorcode.get(error.errno, error.errno)})"
    return str(error)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path) -> tuple[list[bytes], int, bytes]:
    """Complete lines (without newline), their total length, and any unterminated tail."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, b""
    end = data.rfind(b"\n") + 1
    complete = data[:end]
    lines = complete.split(b"\n")[:-1] if complete else []
    return lines, end, data[end:]


def _load_checkpoints(directory: Path, log_id: str, repairs: list[str]) -> Checkpoint | None:
    path = directory / CHECKPOINTS_FILE
    lines, length, tail = _read_lines(path)
    if tail:
        # A checkpoint is only anchored after it is durable, so a torn one was never used.
        repairs.append(f"dropped {len(tail)} bytes of an unterminated last line in {path}")
        with path.open("r+b") as handle:
            handle.truncate(length)
            os.fsync(handle.fileno())
    last: Checkpoint | None = None
    for number, line in enumerate(lines, start=1):
        try:
            checkpoint = Checkpoint.from_line(line)
        except (TypeError, ValueError) as error:
            raise AuditLogCorrupt(
                f"{path} line {number} is not a valid checkpoint ({error}); move the log "
                "directory aside and run 'signet audit verify' on it"
            ) from None
        if checkpoint.log_id != log_id:
            raise AuditLogCorrupt(
                f"{path} line {number} belongs to log {checkpoint.log_id!r}, not {log_id!r}: "
                "each signer needs its own audit directory"
            )
        last = checkpoint
    return last


def _load(directory: Path, log_id: str) -> _LoadedLog:
    """Open (creating if needed) and lock the log, recompute its tree, and check it against
    its last checkpoint. Runs in the log's thread."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / ENTRIES_FILE
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return _scan(fd, directory, path, log_id, created=created)
    except BaseException:
        os.close(fd)
        raise


def _scan(fd: int, directory: Path, path: Path, log_id: str, *, created: bool) -> _LoadedLog:
    repairs: list[str] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AuditLogCorrupt(
            f"{path} is locked by another process: each signer needs its own audit directory"
        ) from None
    if created:
        _fsync_directory(directory)
    last_checkpoint = _load_checkpoints(directory, log_id, repairs)
    if last_checkpoint is not None and last_checkpoint.tree_size == 0:
        _check_against(CompactRange(), last_checkpoint, path)
    tree = CompactRange()
    length = 0
    with os.fdopen(os.dup(fd), "rb") as handle:
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                # A batch is acknowledged only after its last newline is fsynced, so an
                # unterminated tail was never acknowledged to anyone: safe to drop.
                repairs.append(
                    f"dropped {len(raw)} bytes of an unterminated last line (an interrupted "
                    f"write that was never acknowledged) at offset {length} of {path}"
                )
                os.ftruncate(fd, length)
                os.fsync(fd)
                break
            line = raw[:-1]
            problem = _entry_problem(line, number - 1)
            if problem:
                raise AuditLogCorrupt(
                    f"{path} line {number}: {problem}; the log cannot be extended safely — "
                    "move it aside and run 'signet audit verify' on it"
                )
            tree.append(leaf_hash(line))
            length += len(raw)
            if last_checkpoint is not None and tree.size == last_checkpoint.tree_size:
                _check_against(tree, last_checkpoint, path)
    if last_checkpoint is not None and tree.size < last_checkpoint.tree_size:
        raise AuditLogCorrupt(
            f"{path} has {tree.size} entries but its last checkpoint covers "
            f"{last_checkpoint.tree_size}: entries were removed; restore the file"
        )
    return _LoadedLog(fd, tree.size, length, tree, last_checkpoint, repairs)


def _check_against(tree: CompactRange, checkpoint: Checkpoint, path: Path) -> None:
    if tree.root() != checkpoint.root:
        raise AuditLogCorrupt(
            f"the first {checkpoint.tree_size} entries of {path} do not match the root hash of "
            "its last checkpoint: an entry was edited; run 'signet audit verify' on it"
        )


# Stands for a field that differs between the entries of one batch (SignatureLines).
_VARIES = "\x00varies:{}\x00"


class SignatureLines:
    """The ``sign`` entries of one batch: one caller, key version, revision, region and time;
    only the digest, request id and index differ. They are encoded straight to their lines
    from a template, the same bytes ``canonical_json`` gives each entry (tested), without a dict
    and a sort per entry: a batch of 256 signatures spent most of its audit time there."""

    def __init__(self, shared: Mapping[str, Any], digests: Sequence[str],
                 request_ids: Sequence[str]) -> None:
        """``digests`` and ``request_ids`` pair up by position. Raises ``TypeError`` /
        ``ValueError`` for what JSON cannot hold, like ``canonical_json``."""
        for value in (*digests, *request_ids):
            if not isinstance(value, str):
                raise TypeError(f"digest and request id must be strings, not {value!r}")
        self.digests, self.request_ids = digests, request_ids
        # Canonical lines sort their keys, so these three come in this order.
        varying = ("digest", "index", "request_id")
        template = canonical_json({**shared, **{name: _VARIES.format(name) for name in varying}})
        pieces = [template]
        for name in varying:
            marker = json.encoder.encode_basestring(_VARIES.format(name)).encode()
            head, found, tail = pieces[-1].partition(marker)
            if not found or marker in tail:
                raise ValueError(f"the shared audit fields hold the placeholder for {name!r}")
            pieces[-1:] = [head, tail]
        self._pieces = [piece.decode() for piece in pieces]

    def __len__(self) -> int:
        return len(self.digests)

    def encode(self, start: int) -> list[bytes]:
        """The lines of entries ``start``, ``start + 1``… in order."""
        first, between, last, end = self._pieces
        quote = json.encoder.encode_basestring  # what canonical_json uses for strings
        return [
            f"{first}{quote(digest)}{between}{index}{last}{quote(request_id)}{end}".encode()
            for index, (digest, request_id) in enumerate(
                zip(self.digests, self.request_ids, strict=True), start=start)]


def _checked(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``entry`` to queue; raises ``InvalidArgument`` when it cannot be one."""
    kind = entry.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InvalidArgument("an audit entry needs a non-empty string 'kind'")
    if "index" in entry or "time" in entry:
        reserved = sorted(RESERVED_FIELDS & set(entry))
        raise InvalidArgument(f"audit entry fields {reserved} are set by the log")
    return dict(entry)


def _entry_problem(line: bytes, expected_index: int) -> str | None:
    """What is wrong with one stored entry line, or None."""
    try:
        document = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(document, dict):
        return "not a JSON object"
    if canonical_json(document) != line:
        return "not in canonical form (sorted keys, no spaces)"
    if document.get("index") != expected_index:
        return f"index {document.get('index')!r} where {expected_index} was expected"
    if not isinstance(document.get("kind"), str) or not isinstance(document.get("time"), str):
        return "kind and time must be strings"
    return None


class AuditLog:
    """One signer's audit log. Create it with ``await AuditLog.open(...)``; always ``close``."""

    def __init__(
        self,
        *,
        directory: Path,
        log_id: str,
        loaded: _LoadedLog,
        signer: CheckpointSigner,
        clock: Clock,
        anchor: Anchor | None,
        checkpoint_every_entries: int,
        checkpoint_every_seconds: float,
        max_batch: int,
        executor: ThreadPoolExecutor,
    ) -> None:
        self._directory = directory
        self._path = directory / ENTRIES_FILE
        self._log_id = log_id
        self._fd = loaded.fd
        self._size = loaded.size
        self._offset = loaded.offset  # bytes known durable: what a failed write is cut back to
        self._tree = loaded.tree
        self._last_checkpoint = loaded.last_checkpoint
        self._signer = signer
        self._clock = clock
        self._anchor = anchor
        self._every_entries = checkpoint_every_entries
        self._every_seconds = checkpoint_every_seconds
        self._max_batch = max_batch
        self._executor = executor
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._failure: str | None = None
        self._closing = False
        self._closed = False
        self._last_checkpoint_at = clock.monotonic()
        self._checkpoint_retry_at = 0.0
        self._checkpoint_lock = asyncio.Lock()
        # Anchoring is an etcd write that may stall for seconds when etcd is unreachable; it
        # runs in its own task so it never holds up appends. Only the newest checkpoint
        # waiting to be anchored matters (the anchor is overwritten each time).
        self._to_anchor: Checkpoint | None = None
        self._anchoring: asyncio.Task[None] | None = None
        self._committer = asyncio.get_running_loop().create_task(
            self._run(), name=f"audit-committer {log_id}"
        )

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        log_id: str,
        *,
        signer: CheckpointSigner,
        clock: Clock,
        anchor: Anchor | None = None,
        checkpoint_every_entries: int = 10_000,
        checkpoint_every_seconds: float = 10.0,
        max_batch: int = 8192,
    ) -> AuditLog:
        """Open the log in ``directory`` (created if missing) and start its committer on the
        running loop. Existing entries are re-hashed and checked against the last checkpoint;
        an unterminated last line (an interrupted, never acknowledged write) is dropped with a
        warning. Raises ``AuditLogCorrupt`` when the log is damaged or locked by another
        process, ``AuditUnavailable`` when the directory cannot be used, ``ValueError`` for a
        malformed ``log_id`` or cadence."""
        validate_log_id(log_id)
        if checkpoint_every_entries < 1 or checkpoint_every_seconds <= 0 or max_batch < 1:
            raise ValueError("checkpoint cadence and max_batch must be positive")
        path = Path(directory)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-log")
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(
                executor, _load, path, log_id
            )
        except OSError as error:
            executor.shutdown(wait=False)
            raise AuditUnavailable(
                f"cannot open audit log in {path}: {_describe(error)}"
            ) from error
        except BaseException:
            executor.shutdown(wait=False)
            raise
        for repair in loaded.repairs:
            logger.warning("audit log %s: %s", log_id, repair)
        return cls(
            directory=path,
            log_id=log_id,
            loaded=loaded,
            signer=signer,
            clock=clock,
            anchor=anchor,
            checkpoint_every_entries=checkpoint_every_entries,
            checkpoint_every_seconds=checkpoint_every_seconds,
            max_batch=max_batch,
            executor=executor,
        )

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def size(self) -> int:
        """Durable entries: every index below this is a complete line on disk."""
        return self._size

    def root_hash(self) -> bytes:
        """The Merkle root over the durable entries."""
        return self._tree.root()

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self._last_checkpoint

    @property
    def failure(self) -> str | None:
        """Why the last batch failed, or None while the log is healthy (for health checks)."""
        return self._failure

    async def append(self, entry: Mapping[str, Any]) -> int:
        """Record ``entry`` and return its index once it is durable (written and fsynced).

        ``entry`` needs a non-empty string ``kind`` and JSON-serialisable values; ``index``
        and ``time`` are set by the log. Never put secrets in it. Raises ``InvalidArgument``
        for a malformed entry and ``AuditUnavailable`` when it could not be made durable —
        then the caller must not return whatever the entry records."""
        self._require_open()
        record = _checked(entry)
        record["time"] = format_time(self._clock.now())
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending([record], future))
        self._wakeup.set()
        return await future

    async def append_many(self, entries: Sequence[Mapping[str, Any]]) -> list[int]:
        """Record every entry of ``entries`` and return their indices, in order, once all are
        durable: one queue operation and one wake-up for the lot, written in one batch with
        consecutive indices. All or nothing: raises ``InvalidArgument`` (nothing queued) for a
        malformed entry and ``AuditUnavailable`` when they could not be made durable — then
        the caller must return none of what they record. An empty sequence returns ``[]``."""
        self._require_open()
        if not entries:
            return []
        now = format_time(self._clock.now())
        records = [_checked(entry) for entry in entries]
        for record in records:
            record["time"] = now
        return await self._append_together(records)

    async def _append_together(self, entries: list[dict[str, Any]] | SignatureLines
                               ) -> list[int]:
        """Queue ``entries`` as one operation and wait until they are durable."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(entries, future, many=True))
        self._wakeup.set()
        return await future

    def _require_open(self) -> None:
        if self._closing or self._committer.done():
            raise AuditUnavailable(f"audit log {self._log_id} is closed; nothing was recorded")

    async def record_signature(
        self,
        *,
        identity: str,
        key: str,
        version: int,
        key_id: str,
        digest: str,
        request_id: str,
        revision: int,
        region: str,
    ) -> int:
        """Append a ``sign`` entry: who (``identity``) had which key version sign what
        (``digest``, e.g. ``sha256:HEX``, or the hash of the signed payload) under which etcd
        ``revision``. Returns the entry's index once durable; raises like ``append``."""
        return await self.append(
            {
                "kind": "sign",
                "identity": identity,
                "key": key,
                "version": version,
                "key_id": key_id,
                "digest": digest,
                "request_id": request_id,
                "revision": revision,
                "region": region,
            }
        )

    async def record_signatures(
        self,
        *,
        identity: str,
        key: str,
        version: int,
        key_id: str,
        revision: int,
        region: str,
        digests: Sequence[str],
        request_ids: Sequence[str],
    ) -> list[int]:
        """Append one ``sign`` entry per digest (with the request id at the same position),
        all by one caller with one key version, like ``append_many``: durable together or
        not at all. Returns their indices in order; raises like ``append_many``."""
        if len(digests) != len(request_ids):
            raise InvalidArgument("record_signatures needs one request id per digest")
        self._require_open()
        if not digests:
            return []
        shared = {"kind": "sign", "identity": identity, "key": key, "version": version,
                  "key_id": key_id, "revision": revision, "region": region}
        try:
            lines = SignatureLines({**shared, "time": format_time(self._clock.now())},
                                   digests, request_ids)
        except (TypeError, ValueError):  # not for a template: the general path says why
            return await self.append_many([
                {**shared, "digest": digest, "request_id": request_id}
                for digest, request_id in zip(digests, request_ids, strict=True)])
        return await self._append_together(lines)

    async def record_event(self, kind: str, fields: Mapping[str, Any]) -> int:
        """Append an ``admin``, ``ceremony``, ``security``… entry with ``fields``."""
        return await self.append({**fields, "kind": kind})

    async def checkpoint(self) -> Checkpoint:
        """Sign, store and anchor a checkpoint of the current tree now (outside the cadence).
        Raises what the signer raises, or ``AuditUnavailable`` if it cannot be stored."""
        checkpoint = await self._make_checkpoint()
        if checkpoint is None:
            raise AuditUnavailable("the checkpoint could not be stored; see the log")
        return checkpoint

    async def close(self) -> None:
        """Commit what is queued, write a final checkpoint if the tree grew since the last
        one, and release the file. Appends after this raise ``AuditUnavailable``."""
        if self._closed:
            return
        self._closing = True
        self._wakeup.set()
        await asyncio.wait([self._committer])  # its own failures were reported to callers
        try:
            if self._last_checkpoint is None or self._last_checkpoint.tree_size != self._size:
                await self._make_checkpoint()
            if self._anchoring is not None:
                # Bounded: a stopping signer must not hang on an unreachable etcd.
                await asyncio.wait([self._anchoring], timeout=5.0)
        finally:
            self._closed = True
            os.close(self._fd)
            self._executor.shutdown(wait=True)

    # -- the committer ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self._seconds_to_due())
                self._wakeup.clear()
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if self._pending:
                    self._wakeup.set()
                if batch:
                    await self._commit(batch)
                if self._checkpoint_due():
                    await self._make_checkpoint()
                if self._closing and not self._pending:
                    return
        except BaseException as error:
            # A bug or cancellation must not leave callers waiting for a record that will
            # never be written: fail them, and every later append (committer is done).
            reason = f"audit committer stopped: {_describe(error)}"
            self._failure = reason
            for pending in self._pending:
                if not pending.future.done():
                    pending.future.set_exception(AuditUnavailable(reason))
            self._pending.clear()
            if not isinstance(error, asyncio.CancelledError):
                logger.exception("audit log %s: committer failed", self._log_id)
            raise

    def _seconds_to_due(self) -> float | None:
        """How long the committer may sleep before a time-based checkpoint is due."""
        covered = self._last_checkpoint.tree_size if self._last_checkpoint else 0
        if self._size == covered:
            return None
        due_at = max(self._last_checkpoint_at + self._every_seconds, self._checkpoint_retry_at)
        return max(0.0, due_at - self._clock.monotonic())

    def _checkpoint_due(self) -> bool:
        covered = self._last_checkpoint.tree_size if self._last_checkpoint else 0
        if self._size == covered or self._clock.monotonic() < self._checkpoint_retry_at:
            return False
        return (
            self._size - covered >= self._every_entries
            or self._clock.monotonic() - self._last_checkpoint_at >= self._every_seconds
        )

    async def _commit(self, batch: list[_Pending]) -> None:
        lines: list[bytes] = []
        waiters: list[tuple[_Pending, int]] = []
        index = self._size
        for pending in batch:
            if pending.future.done():  # the caller gave up (cancelled) before we wrote
                continue
            try:
                encoded = pending.encode(index)
            except (TypeError, ValueError) as error:
                # All or nothing per queue operation: none of an append_many's lines is kept.
                pending.future.set_exception(
                    InvalidArgument(f"audit entry is not JSON-serialisable: {error}")
                )
                continue
            lines += encoded
            waiters.append((pending, index))
            index += len(encoded)
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write_durably, data)
        except (OSError, _StoreProblem) as error:
            self._failure = f"cannot write {self._path}: {_describe(error)}"
            # The reason is in the message; a traceback of os.write adds nothing.
            logger.error(  # noqa: TRY400
                "audit log %s: %s; failing %d appends closed", self._log_id, self._failure,
                len(waiters),
            )
            for pending, _ in waiters:
                if not pending.future.done():
                    pending.future.set_exception(AuditUnavailable(
                        f"the audit record could not be made durable ({self._failure}); "
                        "nothing was returned"
                    ))
            return
        if self._failure is not None:
            logger.warning("audit log %s: writing again after: %s", self._log_id, self._failure)
            self._failure = None
        self._offset += len(data)
        self._size = index
        self._tree.extend(leaf_hash(line) for line in lines)
        for pending, first in waiters:
            if not pending.future.done():
                pending.future.set_result(
                    list(range(first, first + len(pending.entries))) if pending.many else first)

    def _write_durably(self, data: bytes) -> None:
        """Append ``data`` and fsync, or leave the file at its durable length and raise.
        Runs in the log's thread, which alone touches the file descriptor."""
        if self._failure is not None:
            self._check_store()
        try:
            self._require_linked()
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            # Data written to a file someone unlinked meanwhile is not durable anywhere.
            self._require_linked()
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._offset)
                os.fsync(self._fd)
            raise

    def _require_linked(self) -> None:
        if os.fstat(self._fd).st_nlink == 0:
            raise _StoreProblem(f"{self._path} was removed or replaced; restore it")

    def _check_store(self) -> None:
        """After a failure: the file must still be ours and hold everything acknowledged;
        cut off whatever a failed write left behind."""
        try:
            at_path = os.stat(self._path)
        except FileNotFoundError:
            raise _StoreProblem(f"{self._path} was removed; restore it") from None
        ours = os.fstat(self._fd)
        if (at_path.st_dev, at_path.st_ino) != (ours.st_dev, ours.st_ino) or ours.st_nlink == 0:
            raise _StoreProblem(f"{self._path} was replaced; restore the original")
        if ours.st_size < self._offset:
            raise _StoreProblem(
                f"{self._path} is shorter ({ours.st_size} bytes) than what was acknowledged "
                f"({self._offset} bytes); restore it"
            )
        if ours.st_size > self._offset:
            os.ftruncate(self._fd, self._offset)
            os.fsync(self._fd)

    # -- checkpoints -----------------------------------------------------------------------

    async def _make_checkpoint(self) -> Checkpoint | None:
        """Sign the current tree, store the checkpoint durably, then anchor it. Failures are
        logged and retried later: entries stay durable without checkpoints, so a missing
        checkpoint must not fail signing."""
        # One at a time, so checkpoints are stored and anchored in tree-size order.
        async with self._checkpoint_lock:
            return await self._make_checkpoint_locked()

    async def _make_checkpoint_locked(self) -> Checkpoint | None:
        size, root = self._size, self._tree.root()
        self._last_checkpoint_at = self._clock.monotonic()
        try:
            checkpoint = await sign_checkpoint(
                self._signer, self._log_id, size, root, format_time(self._clock.now())
            )
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._store_checkpoint, checkpoint.to_line() + b"\n"
            )
        except Exception as error:
            self._checkpoint_retry_at = self._clock.monotonic() + 1.0
            logger.warning("audit log %s: checkpoint at size %d failed: %s",
                           self._log_id, size, _describe(error))
            return None
        self._last_checkpoint = checkpoint
        if self._anchor is not None:
            self._to_anchor = checkpoint
            if self._anchoring is None or self._anchoring.done():
                self._anchoring = asyncio.get_running_loop().create_task(
                    self._anchor_latest(), name=f"audit-anchor-{self._log_id}")
        return checkpoint

    async def _anchor_latest(self) -> None:
        """Anchor the newest stored checkpoint until none is waiting. Failures are logged:
        the checkpoint is durable in the log folder either way."""
        while self._to_anchor is not None and self._anchor is not None:
            checkpoint, self._to_anchor = self._to_anchor, None
            try:
                await self._anchor(checkpoint)
            except Exception as error:
                logger.warning("audit log %s: anchoring checkpoint at size %d failed: %s",
                               self._log_id, checkpoint.tree_size, _describe(error))

    def _store_checkpoint(self, line: bytes) -> None:
        path = self._directory / CHECKPOINTS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            durable = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, durable)
                    os.fsync(fd)
                raise
        finally:
            os.close(fd)
