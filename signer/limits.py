"""Per-identity rate and concurrency limits, counted once per signer (docs/adr/0012).

:class:`~signer.guard.GuardInterceptor` asks a limiter to ``admit`` each call and to
``release`` it when it ends. Two limiters keep the same books:

- :class:`LocalLimits`, for a signer that is one process: dicts on its event loop.
- :class:`SharedLimits`, for ``signet serve`` with several workers: one table that every worker
  of the signer reads and writes, so an identity gets ``per_identity_rps`` from the signer as a
  whole, however the kernel spreads its connections over the workers. The supervisor creates it
  before it forks (an anonymous ``memfd`` mapped shared); a POSIX record lock on that file
  serialises the updates, and the kernel releases the lock if a worker dies holding it. Each
  worker counts its calls in flight in its own column, and a worker started in a slot first
  clears that column, so calls of a killed worker do not stay counted.

Both forget identities beyond a bound (an identity forgotten starts again with a full bucket),
which only ever errs generous. An identity with neither limit (``limits: 0``, or a named
identity with both at 0) is not counted at all.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import os
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

MAX_TRACKED_IDENTITIES = 10_000
SHARED_SLOTS = 16_384
SHARED_PROBES = 32  # slots looked at per identity, from its hash on
CONCURRENCY_RETRY_SECONDS = 0.05


@dataclass(frozen=True)
class IdentityLimits:
    """One identity's limits: ``rps`` 0 turns its rate limit off, ``concurrency`` 0 its
    concurrency limit."""

    rps: float
    burst: int
    concurrency: int

    @property
    def unlimited(self) -> bool:
        """Neither limit applies: such an identity's calls are not counted at all."""
        return self.rps <= 0 and self.concurrency <= 0


@dataclass(frozen=True)
class LimitsConfig:
    """``limits:`` section. Defaults are generous: they stop a runaway client, not a busy
    one. ``per_identity_rps`` 0 turns the rate limit off, ``per_identity_concurrency`` 0 the
    concurrency limit. ``identities`` gives named identities other limits (a release
    pipeline that signs more, a probe that must never be refused)."""

    per_identity_rps: float = 2_000.0
    per_identity_burst: int = 4_000
    per_identity_concurrency: int = 256
    denial_audit_per_identity_rps: float = 2.0
    denial_audit_burst: int = 20
    denial_audit_total_rps: float = 50.0
    # Compared, not hashed: a dict cannot be (a config stays hashable).
    identities: Mapping[str, IdentityLimits] = field(default_factory=dict, hash=False)

    @functools.cached_property
    def defaults(self) -> IdentityLimits:
        """The limits of every identity not named in ``identities``."""
        return IdentityLimits(self.per_identity_rps, self.per_identity_burst,
                              self.per_identity_concurrency)

    def for_identity(self, identity: str) -> IdentityLimits:
        return self.identities.get(identity) or self.defaults


class TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is back."""
        self.tokens, wait = _take(self.rate, self.capacity, self.tokens, self.stamp, now)
        self.stamp = now
        return wait


def _take(rate: float, capacity: float, tokens: float, stamp: float, now: float
          ) -> tuple[float, float]:
    """Refill a bucket holding ``tokens`` at ``stamp`` up to ``now`` and take one token.
    Returns the tokens left and 0.0 when granted, else the seconds until one is back."""
    tokens = min(capacity, tokens + max(0.0, now - stamp) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate if rate > 0 else float("inf")


@dataclass(frozen=True)
class Refusal:
    limit: str  # "rate" or "concurrency"
    retry_after: float  # seconds
    limits: IdentityLimits  # the caller's, for the message


class Limiter(Protocol):
    def admit(self, identity: str, now: float) -> Refusal | None:
        """Count a call of ``identity`` in, or say which limit refuses it (nothing counted)."""
        ...

    def release(self, identity: str) -> None:
        """A call that ``admit`` let in has ended."""
        ...


def _check(limits: IdentityLimits, in_flight: int, take: Callable[[], float]
           ) -> Refusal | None:
    """The concurrency limit first (a refused call takes no token), then the rate:
    ``take`` takes a token and returns 0.0, or the seconds until one is back."""
    if limits.concurrency and in_flight >= limits.concurrency:
        return Refusal("concurrency", CONCURRENCY_RETRY_SECONDS, limits)
    wait = take() if limits.rps > 0 else 0.0
    return Refusal("rate", wait, limits) if wait else None


class Buckets:
    """Token buckets by identity, the least recently used forgotten beyond a bound (a
    forgotten identity starts again with a full bucket, which only ever errs generous)."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, identity: str, now: float) -> float:
        return self.bucket(identity, now).take(now)

    def bucket(self, identity: str, now: float, rate: float | None = None,
               capacity: float | None = None) -> TokenBucket:
        """``identity``'s bucket, made full (with ``rate`` and ``capacity`` when given) if it
        had none."""
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = self._buckets[identity] = TokenBucket(
                self.rate if rate is None else rate,
                self.capacity if capacity is None else capacity, now)
            if len(self._buckets) > MAX_TRACKED_IDENTITIES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(identity)
        return bucket


class LocalLimits:
    """The books of one process."""

    def __init__(self, config: LimitsConfig) -> None:
        self._config = config
        self._buckets = Buckets(config.per_identity_rps, config.per_identity_burst)
        self._in_flight: dict[str, int] = {}

    def admit(self, identity: str, now: float) -> Refusal | None:
        limits = self._config.for_identity(identity)
        if limits.unlimited:
            return None
        in_flight = self._in_flight.get(identity, 0)
        refusal = _check(limits, in_flight, lambda: self._buckets.bucket(
            identity, now, limits.rps, limits.burst).take(now))
        if refusal is None:
            self._in_flight[identity] = in_flight + 1
        return refusal

    def release(self, identity: str) -> None:
        if self._config.for_identity(identity).unlimited:
            return
        left = self._in_flight.get(identity, 0) - 1
        if left > 0:
            self._in_flight[identity] = left
        else:
            self._in_flight.pop(identity, None)


# A slot: identity hash (0: free), tokens, refill stamp, last use (monotonic seconds, which are
# the same clock in every process), then calls in flight per worker.
_HEAD = struct.Struct("<Qddd")


class SharedLimits:
    """The books of every worker of one signer, in shared memory (module docstring).

    Create it in the supervisor before forking; each worker calls :meth:`for_worker` with its
    slot number once, before serving."""

    def __init__(self, config: LimitsConfig, workers: int, *, slots: int = SHARED_SLOTS) -> None:
        if workers < 1 or slots < 1:
            raise ValueError("workers and slots must be 1 or more")
        self._config = config
        self._workers = workers
        self._slots = slots
        self._counts = struct.Struct(f"<{workers}i")
        self._stride = _HEAD.size + self._counts.size
        # Keyed: which slot an identity lands in is not something a client can aim for.
        self._hash_key = secrets.token_bytes(16)
        self._fd = os.memfd_create("signet-limits", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, slots * self._stride)
        self._map = mmap.mmap(self._fd, slots * self._stride)
        self._worker: int | None = None

    def for_worker(self, worker: int) -> SharedLimits:
        """Be worker ``worker`` (0-based) from now on, in this process: clear what an earlier
        process in that slot left counted in flight."""
        if not 0 <= worker < self._workers:
            raise ValueError(f"worker {worker} is not one of {self._workers}")
        self._worker = worker
        offset = _HEAD.size + 4 * worker
        with self._locked():
            for slot in range(self._slots):
                struct.pack_into("<i", self._map, slot * self._stride + offset, 0)
        return self

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def admit(self, identity: str, now: float) -> Refusal | None:
        worker = self._require_worker()
        limits = self._config.for_identity(identity)
        if limits.unlimited:  # no books to keep: not even the table's lock (every call)
            return None
        with self._locked():
            slot = self._find(self._hash(identity), now, claim=True, burst=limits.burst)
            if slot is None:  # every candidate slot busy: let it in uncounted (errs generous)
                return None
            offset = slot * self._stride
            key, tokens, stamp, _ = _HEAD.unpack_from(self._map, offset)
            counts = list(self._counts.unpack_from(self._map, offset + _HEAD.size))

            def take() -> float:
                nonlocal tokens, stamp
                tokens, wait = _take(limits.rps, limits.burst, tokens, stamp, now)
                stamp = now
                return wait

            refusal = _check(limits, sum(counts), take)
            if refusal is None:
                counts[worker] += 1
                self._counts.pack_into(self._map, offset + _HEAD.size, *counts)
            _HEAD.pack_into(self._map, offset, key, tokens, stamp, now)
            return refusal

    def release(self, identity: str) -> None:
        worker = self._require_worker()
        if self._config.for_identity(identity).unlimited:
            return
        with self._locked():
            slot = self._find(self._hash(identity), 0.0, claim=False)
            if slot is None:
                return
            at = slot * self._stride + _HEAD.size + 4 * worker
            (count,) = struct.unpack_from("<i", self._map, at)
            struct.pack_into("<i", self._map, at, max(0, count - 1))

    def in_flight(self, identity: str) -> int:
        """Calls of ``identity`` in flight in every worker (for tests and metrics)."""
        with self._locked():
            slot = self._find(self._hash(identity), 0.0, claim=False)
            if slot is None:
                return 0
            return sum(self._counts.unpack_from(self._map, slot * self._stride + _HEAD.size))

    def _require_worker(self) -> int:
        if self._worker is None:
            raise RuntimeError("SharedLimits.for_worker was not called in this process")
        return self._worker

    def _hash(self, identity: str) -> int:
        digest = hashlib.blake2b(identity.encode(), digest_size=8, key=self._hash_key).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks a free slot

    def _find(self, key: int, now: float, *, claim: bool, burst: int = 0) -> int | None:
        """The slot of ``key``; with ``claim``, else a free one or the least recently used
        idle one, made ``key``'s with a full bucket. None when there is none."""
        free = idle = None
        idle_used = float("inf")
        for probe in range(SHARED_PROBES):
            slot = (key + probe) % self._slots
            offset = slot * self._stride
            held, _, _, used = _HEAD.unpack_from(self._map, offset)
            if held == key:
                return slot
            if not claim:
                continue
            if held == 0:
                if free is None:
                    free = slot
            elif used < idle_used and not any(
                    self._counts.unpack_from(self._map, offset + _HEAD.size)):
                idle, idle_used = slot, used
        chosen = free if free is not None else idle
        if chosen is not None:
            _HEAD.pack_into(self._map, chosen * self._stride, key, float(burst), now, now)
            self._counts.pack_into(self._map, chosen * self._stride + _HEAD.size,
                                   *([0] * self._workers))
        return chosen

    def _locked(self) -> _RecordLock:
        return _RecordLock(self._fd)


class _RecordLock:
    """A POSIX record lock on the whole file: one holder among processes, released by the
    kernel when the holder dies."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
