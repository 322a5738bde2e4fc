"""Start, find and stop signer processes (for ``signet dev`` and the tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer.channels import open_channels
from signer.dev.etcd import free_port


class SignerLaunchError(RuntimeError):
    """A signer process did not start or did not become healthy; says why, with its log."""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def health_status(
    endpoint: str, *, ca: Path | None, cert: Path | None, key: Path | None,
    insecure: bool = False, timeout: float = 1.0,
) -> str:
    """The overall gRPC health status of a signer ('SERVING', 'NOT_SERVING', or
    'UNREACHABLE: …')."""
    [channel] = open_channels([endpoint], ca=ca, cert=cert, key=key, insecure=insecure)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as error:
            return f"UNREACHABLE: {error.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@dataclass
class SignerProcess:
    """One ``signet serve`` process, its config, log and pid file in ``directory``."""

    directory: Path
    endpoint: str

    @property
    def config_path(self) -> Path:
        return self.directory / "signer.yaml"

    @property
    def log_path(self) -> Path:
        return self.directory / "signer.log"

    @property
    def pid_path(self) -> Path:
        return self.directory / "signer.pid"

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie child of ours still "exists"; reap it if it is one.
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        return True

    def launch(self, env: dict[str, str], *, detach: bool = True) -> None:
        """Start ``signet serve`` on ``config_path``, logging to ``log_path``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "signer.cli.main", "serve", "--config",
                 str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=detach, close_fds=True,
            )
        self.pid_path.write_text(f"{process.pid}\n")

    def wait_healthy(
        self, *, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Wait until the signer reports SERVING; raises ``SignerLaunchError`` with its log."""
        deadline = time.monotonic() + timeout
        status = "not started"
        while time.monotonic() < deadline:
            if not self.running:
                raise SignerLaunchError(
                    f"signer in {self.directory} exited during start-up; its log ends:\n"
                    f"{_tail(self.log_path)}"
                )
            status = health_status(self.endpoint, ca=ca, cert=cert, key=key, insecure=insecure)
            if status == "SERVING":
                return
            time.sleep(0.2)
        raise SignerLaunchError(
            f"signer in {self.directory} not healthy after {timeout:.0f}s ({status}); its log "
            f"ends:\n{_tail(self.log_path)}"
        )

    def send(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (drain), then SIGKILL after ``timeout``."""
        if not self.running:
            return
        self.send(signal.SIGCONT)
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running:
            self.send(signal.SIGKILL)
            while self.running:
                time.sleep(0.05)


def new_endpoint() -> str:
    return f"127.0.0.1:{free_port()}"


def persistent_endpoint(directory: Path, name: str) -> str:
    """A loopback ``host:port`` chosen once and kept in ``directory/name``, so a restarted
    process listens where clients and cluster.json already point."""
    path = directory / name
    if path.exists():
        return path.read_text().strip()
    directory.mkdir(parents=True, exist_ok=True)
    endpoint = new_endpoint()
    path.write_text(endpoint + "\n")
    return endpoint
