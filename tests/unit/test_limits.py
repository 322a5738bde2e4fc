"""signer.limits: the books of per-identity limits, in one process and shared by forked
workers (real processes, shared memory and record locks; no server)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from signer.limits import IdentityLimits, LimitsConfig, LocalLimits, Refusal, SharedLimits

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

A, B = "spiffe://test/a", "spiffe://test/b"


def refused(refusal: Refusal | None) -> tuple[str, float] | None:
    return None if refusal is None else (refusal.limit, refusal.retry_after)


CONCURRENCY = ("concurrency", 0.05)


def in_child(work: Callable[[], int], timeout: float = 10.0) -> int:
    """Run ``work`` in a forked child; return its result (0 to 255), or fail after ``timeout``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 255
        try:
            code = work()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child did not finish within {timeout} s")


def admitted(limits: LocalLimits | SharedLimits, identity: str, calls: int, now: float) -> int:
    return sum(limits.admit(identity, now) is None for _ in range(calls))


def test_one_process_refuses_by_concurrency_first_then_by_rate() -> None:
    limits = LocalLimits(LimitsConfig(per_identity_rps=10, per_identity_burst=3,
                                      per_identity_concurrency=2))
    assert limits.admit(A, 0.0) is None
    assert limits.admit(A, 0.0) is None
    assert refused(limits.admit(A, 0.0)) == CONCURRENCY
    limits.release(A)
    assert limits.admit(A, 0.0) is None  # the third token
    limits.release(A)
    refusal = limits.admit(A, 0.0)
    assert refusal is not None
    assert refusal.limit == "rate"
    assert refusal.retry_after == pytest.approx(0.1)
    assert limits.admit(B, 0.0) is None  # another identity has its own books


def test_workers_share_one_bucket_per_identity() -> None:
    shared = SharedLimits(LimitsConfig(per_identity_rps=0.001, per_identity_burst=10,
                                       per_identity_concurrency=0), workers=2)
    now = time.monotonic()
    # Worker 1, in its own process, spends 6 of A's 10 tokens; worker 0 gets the other 4.
    assert in_child(lambda: admitted(shared.for_worker(1), A, 6, now)) == 6
    worker0 = shared.for_worker(0)
    assert admitted(worker0, A, 8, now) == 4
    assert admitted(worker0, B, 3, now) == 3
    shared.close()


def test_calls_in_flight_count_across_workers_and_a_restarted_slot_forgets_its_own() -> None:
    shared = SharedLimits(LimitsConfig(per_identity_rps=0, per_identity_concurrency=3),
                          workers=2)
    now = time.monotonic()
    # Worker 1 takes two of A's three slots and dies with them in flight.
    assert in_child(lambda: admitted(shared.for_worker(1), A, 2, now)) == 2
    worker0 = shared.for_worker(0)
    assert shared.in_flight(A) == 2
    assert worker0.admit(A, now) is None
    assert refused(worker0.admit(A, now)) == CONCURRENCY
    # The worker started again in slot 1 clears what its predecessor left counted.
    assert in_child(lambda: shared.for_worker(1).in_flight(A)) == 1
    assert worker0.admit(A, now) is None
    worker0.release(A)
    worker0.release(A)
    assert shared.in_flight(A) == 0
    shared.close()


def test_a_worker_killed_inside_the_lock_does_not_stop_the_others() -> None:
    shared = SharedLimits(LimitsConfig(), workers=2)
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        shared._locked().__enter__()
        os.write(ready_write, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(ready_read, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert in_child(lambda: int(shared.for_worker(0).admit(A, time.monotonic()) is None)) == 1
    shared.close()


def test_a_full_table_reuses_idle_slots_and_never_refuses_for_want_of_one() -> None:
    shared = SharedLimits(LimitsConfig(per_identity_rps=0.001, per_identity_burst=1,
                                       per_identity_concurrency=0), workers=1, slots=4)
    worker = shared.for_worker(0)
    now = time.monotonic()
    for n in range(4):
        assert worker.admit(f"spiffe://test/{n}", now + n) is None
    # Identity 0 has spent its one token; a fifth identity then takes the least recently used
    # idle slot, which was identity 0's, so 0 starts again with a full bucket (errs generous).
    assert worker.admit("spiffe://test/0", now + 4) is not None
    for n in range(1, 4):
        worker.release(f"spiffe://test/{n}")
    assert worker.admit("spiffe://test/new", now + 5) is None
    assert shared.in_flight("spiffe://test/new") == 1
    shared.close()


def test_every_slot_busy_admits_uncounted() -> None:
    shared = SharedLimits(LimitsConfig(per_identity_rps=0, per_identity_concurrency=1),
                          workers=1, slots=2)
    worker = shared.for_worker(0)
    now = time.monotonic()
    assert worker.admit(A, now) is None
    assert worker.admit(B, now) is None
    assert worker.admit("spiffe://test/c", now) is None  # no slot to count it in
    assert shared.in_flight("spiffe://test/c") == 0
    worker.release("spiffe://test/c")  # harmless
    assert refused(worker.admit(A, now)) == CONCURRENCY
    shared.close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_named_identity_has_its_own_limits(shared: bool) -> None:
    c = "spiffe://test/c"
    config = LimitsConfig(per_identity_rps=0.001, per_identity_burst=2, identities={
        A: IdentityLimits(rps=0, burst=0, concurrency=0),
        B: IdentityLimits(rps=0.001, burst=5, concurrency=0),
        c: IdentityLimits(rps=0, burst=0, concurrency=1)})
    limits = SharedLimits(config, workers=1).for_worker(0) if shared else LocalLimits(config)
    now = time.monotonic()
    assert admitted(limits, A, 50, now) == 50  # no limit at all
    assert admitted(limits, B, 10, now) == 5
    assert admitted(limits, "spiffe://test/other", 10, now) == 2  # the defaults
    assert limits.admit(c, now) is None
    refusal = limits.admit(c, now)
    assert refused(refusal) == CONCURRENCY
    assert refusal is not None
    assert refusal.limits.concurrency == 1  # the message names the caller's own limit


def test_an_unlimited_identity_is_not_counted_and_takes_no_slot() -> None:
    """An identity with neither limit keeps no books: with a one-slot table, its calls in
    flight leave the slot to a limited identity, whose own limit then holds."""
    config = LimitsConfig(per_identity_rps=0, per_identity_concurrency=1, identities={
        A: IdentityLimits(rps=0, burst=0, concurrency=0)})
    shared = SharedLimits(config, workers=1, slots=1).for_worker(0)
    now = time.monotonic()
    assert admitted(shared, A, 3, now) == 3
    assert shared.in_flight(A) == 0
    assert shared.admit(B, now) is None
    assert refused(shared.admit(B, now)) == CONCURRENCY  # B got the slot: A never held it
    shared.release(A)  # matches an admit that counted nothing
    assert shared.in_flight(B) == 1
    shared.close()
