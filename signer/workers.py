"""``signet serve`` with several worker processes sharing one port (docs/adr/0008).

The parent (the supervisor) binds nothing and initialises no gRPC, asyncio or PKCS#11 state: it
forks the workers first, then only waits for signals and for children to exit. Each worker runs
the ordinary single-process signer (``signer.server.serve``): its own PKCS#11 session, etcd
client, lease and fence registration, audit log folder. The workers bind the same listen port
with ``SO_REUSEPORT`` (grpc's default on Linux) and the kernel spreads new connections across
them.

- A worker that exits is started again, after 0.5 s doubling to 10 s while it keeps dying
  young; a worker that ran for a minute starts again at 0.5 s.
- If a worker exits before it was ever ready on its first start (bad config, HSM or etcd out of
  reach), the whole signer stops with an error, as a single process would.
- Worker 0 starts first and alone; the others start once it is ready, so they never race to
  create the region's keys.
- SIGTERM or SIGINT to the parent is forwarded to every worker, which drains; after
  ``stop_timeout`` seconds the rest are killed.
- Only worker 0 serves the ``/tuf/`` HTTP port (``trust.http_listen``); the others turn it off.
  A restarted worker 0 serves it again.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from signer.config import ServerConfig
from signer.limits import Limiter, SharedLimits

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0
HEALTHY_RUN_SECONDS = 60.0
POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_WATCHED = {*_STOP_SIGNALS, signal.SIGCHLD}

# What a worker runs: its config, the callback for "ready", and the limits it shares with its
# siblings.
Runner = Callable[[ServerConfig, Callable[[int], None], Limiter | None], None]


class WorkerStartError(RuntimeError):
    """A worker exited before it became ready on its first start."""


def worker_config(config: ServerConfig, slot: int) -> ServerConfig:
    """The config worker ``slot`` runs: only slot 0 keeps the ``/tuf/`` HTTP listener, since a
    second bind of that port would fail; worker ``slot`` serves Prometheus metrics on the
    configured port + ``slot`` (each process has its own counters)."""
    if slot == 0:
        return config
    trust = dataclasses.replace(config.trust, http_listen="")
    telemetry = config.telemetry
    if telemetry.metrics_listen:
        host, _, port = telemetry.metrics_listen.rpartition(":")
        if int(port):  # port 0 stays 0: the kernel picks one per worker
            telemetry = dataclasses.replace(telemetry,
                                            metrics_listen=f"{host}:{int(port) + slot}")
    return dataclasses.replace(config, trust=trust, telemetry=telemetry)


def _run_signer(config: ServerConfig, on_ready: Callable[[int], None],
                limits: Limiter | None) -> None:
    import asyncio

    from signer.server import serve

    asyncio.run(serve(config, on_ready=on_ready, listen_when_ready=True, limits=limits))


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    ready_fd: int | None = None
    ready: bool = False
    ever_ready: bool = False
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = MIN_BACKOFF
    exits: list[int] = field(default_factory=list)


class WorkerSupervisor:
    """Forks ``count`` workers and keeps them running until SIGTERM/SIGINT.

    ``run()`` returns the exit status for the parent: 0 after a clean stop, 1 when a worker
    could not start. ``runner`` is what a worker executes (tests pass a stand-in).
    """

    def __init__(
        self, config: ServerConfig, count: int, *, runner: Runner = _run_signer,
        stop_timeout: float = 30.0,
    ) -> None:
        if count < 1:
            raise ValueError("count must be 1 or more")
        self._config = config
        self._runner = runner
        self._stop_timeout = stop_timeout
        self._slots = [_Slot(i) for i in range(count)]
        self._parent = os.getpid()
        # Created before any fork, so every worker maps the same table (signer/limits.py).
        self._limits = SharedLimits(config.limits, count) if count > 1 else None

    # -- the parent ---------------------------------------------------------------------------

    def run(self) -> int:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            # Worker 0 first, alone until ready: it creates whatever the region still lacks
            # (audit and online TUF keys in the HSM, their records in etcd), which siblings
            # starting at the same moment would race for.
            first = self._slots[0]
            self._fork(first, previous)
            status = self._supervise(previous, until_ready=first)
            if status is None:
                for slot in self._slots[1:]:
                    self._fork(slot, previous)
                log.info("supervising %d workers: %s", len(self._slots),
                         ", ".join(str(s.pid) for s in self._slots))
                status = self._supervise(previous)
            self._stop_all()
            return status if status is not None else 0
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def worker_pids(self) -> list[int]:
        return [s.pid for s in self._slots if s.pid is not None]

    def _supervise(self, mask: set[int | signal.Signals], *,
                   until_ready: _Slot | None = None) -> int | None:
        """Restart exited workers until a stop signal (0) or a failed first start (1); with
        ``until_ready``, return None as soon as that worker is ready."""
        while True:
            if until_ready is not None and until_ready.ready:
                return None
            received = signal.sigtimedwait(_WATCHED, POLL_SECONDS)
            if received is not None and received.si_signo in _STOP_SIGNALS:
                log.info("received %s: stopping %d workers",
                         signal.Signals(received.si_signo).name, len(self.worker_pids()))
                return 0
            self._collect_ready()
            failure = self._reap()
            if failure is not None:
                log.error("%s; stopping", failure)
                return 1
            now = time.monotonic()
            for slot in self._slots:
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._fork(slot, mask)

    def _fork(self, slot: _Slot, mask: set[int | signal.Signals]) -> None:
        read_fd, write_fd = os.pipe()
        config = worker_config(self._config, slot.index)
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_fd)
            self._become_worker(config, slot.index, write_fd, mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.pid, slot.ready_fd, slot.ready = pid, read_fd, False
        slot.started_at, slot.restart_at = time.monotonic(), None
        log.info("worker %d started (pid %d)", slot.index, pid)

    def _become_worker(self, config: ServerConfig, index: int, ready_fd: int,
                       mask: set[int | signal.Signals]) -> None:
        status = 1
        try:
            for other in self._slots:
                if other.ready_fd is not None:
                    os.close(other.ready_fd)
            for sig in _WATCHED:
                signal.signal(sig, signal.SIG_DFL)
            _stop_with_parent(self._parent)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

            def on_ready(_port: int) -> None:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, b"r")
                    os.close(ready_fd)

            limits = self._limits.for_worker(index) if self._limits is not None else None
            self._runner(config, on_ready, limits)
            status = 0
        except BaseException:
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(status)

    def _collect_ready(self) -> None:
        for slot in self._slots:
            if slot.ready_fd is None or slot.ready:
                continue
            with contextlib.suppress(BlockingIOError):
                if os.read(slot.ready_fd, 1):
                    slot.ready = slot.ever_ready = True
                    log.info("worker %d (pid %d) is ready", slot.index, slot.pid)

    def _reap(self) -> str | None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is None:
                continue
            self._collect_ready()
            if slot.ready_fd is not None:
                os.close(slot.ready_fd)
            code = os.waitstatus_to_exitcode(wait_status)
            slot.pid, slot.ready_fd = None, None
            slot.exits.append(code)
            if not slot.ever_ready:
                return f"worker {slot.index} exited ({_describe_exit(code)}) before it was ready"
            lived = time.monotonic() - slot.started_at
            if lived >= HEALTHY_RUN_SECONDS:
                slot.backoff = MIN_BACKOFF
            delay, slot.backoff = slot.backoff, min(slot.backoff * 2, MAX_BACKOFF)
            slot.restart_at = time.monotonic() + delay
            slot.ready = False
            log.warning("worker %d (pid %d) exited (%s) after %.1f s; restarting in %.1f s",
                        slot.index, pid, _describe_exit(code), lived, delay)

    def _stop_all(self) -> None:
        """SIGTERM every worker (each drains), wait, then SIGKILL what is left."""
        for slot in self._slots:
            slot.restart_at = None
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        while self.worker_pids() and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, POLL_SECONDS)
            self._reap_stopping()
        for slot in self._slots:
            if slot.pid is not None:
                log.warning("worker %d (pid %d) did not stop in %.0f s; killing it",
                            slot.index, slot.pid, self._stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
        while self.worker_pids():
            self._reap_stopping(block=True)
        log.info("all workers stopped")

    def _reap_stopping(self, *, block: bool = False) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                for slot in self._slots:
                    slot.pid = None
                return
            if pid == 0:
                return
            for slot in self._slots:
                if slot.pid == pid:
                    slot.pid = None
                    if slot.ready_fd is not None:
                        os.close(slot.ready_fd)
                        slot.ready_fd = None
                    log.info("worker %d (pid %d) stopped (%s)", slot.index, pid,
                             _describe_exit(os.waitstatus_to_exitcode(wait_status)))
            if block:
                return


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies (Linux), so a killed
    supervisor leaves no orphaned signer holding the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def serve_workers(config: ServerConfig, count: int) -> int:
    """Run ``count`` workers of ``config`` until SIGTERM/SIGINT; returns the exit status."""
    return WorkerSupervisor(config, count).run()
