"""The worker supervisor with stand-in workers (no gRPC, no HSM): restart after a crash, exit
when a first start fails, SIGTERM forwarded and waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SCRIPT = """
import logging, os, sys, time
from pathlib import Path
from signer.config import ServerConfig
from signer.workers import WorkerSupervisor

logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")
mode, out = sys.argv[1], Path(sys.argv[2])
config = ServerConfig.from_dict({"listen": "127.0.0.1:7443", "insecure": True,
    "etcd": {"endpoints": ["127.0.0.1:1"]}, "hsm": {"token_label": "t", "pin_env": "P"}},
    base=Path("."))

def runner(config, on_ready, limits):
    if mode == "fail":
        raise RuntimeError("cannot reach etcd")
    (out / str(os.getpid())).write_text(config.trust.http_listen)
    on_ready(7443)
    while True:
        time.sleep(1)

sys.exit(WorkerSupervisor(config, 2, runner=runner, stop_timeout=5).run())
"""


def start(mode: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])


def running_workers(out: Path) -> set[int]:
    pids = set()
    for entry in out.iterdir():
        try:
            os.kill(int(entry.name), 0)
            pids.add(int(entry.name))
        except ProcessLookupError:
            pass
    return pids


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_crashed_worker_is_restarted_and_sigterm_stops_all(tmp_path: Path) -> None:
    supervisor = start("run", tmp_path)
    try:
        wait_for(lambda: len(running_workers(tmp_path)) == 2)
        first = running_workers(tmp_path)
        # Only worker 0 keeps the /tuf/ listener (the default "127.0.0.1:0" here).
        assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["", "127.0.0.1:0"]
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(running_workers(tmp_path)) == 2 and victim not in
                 running_workers(tmp_path))
        workers = running_workers(tmp_path)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=10) == 0
        assert not running_workers(tmp_path), workers
    finally:
        supervisor.kill()
        _, log = supervisor.communicate()
    assert "killed by SIGKILL" in log
    assert "restarting in 0.5 s" in log
    assert "all workers stopped" in log


def test_a_worker_that_fails_its_first_start_stops_the_signer(tmp_path: Path) -> None:
    supervisor = start("fail", tmp_path)
    try:
        assert supervisor.wait(timeout=10) == 1
    finally:
        supervisor.kill()
        _, log = supervisor.communicate()
    assert "before it was ready" in log
    assert "cannot reach etcd" in log


def test_sigint_also_stops_the_workers(tmp_path: Path) -> None:
    supervisor = start("run", tmp_path)
    try:
        wait_for(lambda: len(running_workers(tmp_path)) == 2)
        supervisor.send_signal(signal.SIGINT)
        assert supervisor.wait(timeout=10) == 0
        assert not running_workers(tmp_path)
    finally:
        supervisor.kill()
        supervisor.communicate()
