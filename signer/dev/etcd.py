"""Start and stop real etcd members on loopback for development, tests and drills.

Each member gets its own data dir, log file and free loopback ports under one directory::

    directory/
      cluster.json            ports, names, token, TLS files, pids (read by ``EtcdCluster.load``)
      member-0/data/          etcd's data dir
      member-0/etcd.log       the member's stdout and stderr
      member-0/etcd.pid

Starting again on a directory that has ``cluster.json`` reuses its names, ports and data: etcd
ignores ``--initial-cluster*`` once a data dir holds a member, so the same flags restart it.
Never for production: no peer TLS, no auth, no tuning.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ETCD_BINARY = "etcd"
ETCDCTL_BINARY = "etcdctl"
STATE_FILE = "cluster.json"
DEFAULT_START_TIMEOUT = 30.0
# A leader told to stop while its peers are already gone can hang on leadership transfer;
# after this long it is killed (etcd fsyncs its WAL, so dev data survives a SIGKILL).
DEFAULT_STOP_TIMEOUT = 3.0


class EtcdLaunchError(RuntimeError):
    """An etcd member could not be started, or did not become healthy in time."""


@dataclass(frozen=True)
class EtcdTls:
    """Client TLS for every member: server cert/key, and the CA client certificates must chain to.

    With it, members serve ``https`` and require a client certificate (``--client-cert-auth``).
    The server certificate must carry ``127.0.0.1`` as an IP SAN and both server and client
    usages (health checks and ``etcdctl`` present it as the client certificate too).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that were free a moment ago. They are held
    open together while chosen: one at a time, the kernel may hand out a port it has just
    released again (a member once got the same port for its client and peer URLs)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                   for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _is_etcd(pid: int) -> bool:
    """Whether ``pid`` is alive and still an etcd process (guards against pid reuse).

    Read from ``/proc/<pid>/stat`` alone: while a process exits, its ``cmdline`` reads empty
    before it becomes a zombie, and a check on it would call an etcd that is still tearing
    down "gone" (a caller's ``poll()`` then still saw it running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name = stat[stat.find("(") + 1:stat.rfind(")")]
    state = stat[stat.rfind(")") + 1:].split()[0]
    return name == "etcd" and state not in ("Z", "X")  # a zombie no longer runs


@dataclass(eq=False)
class EtcdMember:
    """One etcd process. ``pid`` is None while it is not running."""

    name: str
    directory: Path
    client_port: int
    peer_port: int
    cluster: EtcdCluster = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.cluster.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "etcd.log"

    @property
    def pid_path(self) -> Path:
        return self.directory / "etcd.pid"

    @property
    def pid(self) -> int | None:
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._pid is not None and _is_etcd(self._pid)

    def argv(self) -> list[str]:
        argv = [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster.initial_cluster,
            "--initial-cluster-token", self.cluster.token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        tls = self.cluster.tls
        if tls is not None:
            argv += [
                "--cert-file", str(tls.cert_file),
                "--key-file", str(tls.key_file),
                "--trusted-ca-file", str(tls.ca_file),
                "--client-cert-auth",
            ]  # fmt: skip
        return argv

    def launch(self) -> None:
        """Start the process (without waiting for health). Raises ``EtcdLaunchError``."""
        if self.running:
            raise EtcdLaunchError(f"etcd member {self.name} is already running (pid {self.pid})")
        self.directory.mkdir(parents=True, exist_ok=True)
        # ETCD_* variables from the caller's environment would silently override our flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log_path.open("ab") as log:
            try:
                self._process = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=self.cluster.detach,
                )
            except OSError as e:
                raise EtcdLaunchError(
                    f"cannot run {ETCD_BINARY!r}: {e}; install etcd-server"
                ) from e
        self._pid = self._process.pid
        self.pid_path.write_text(f"{self._pid}\n")
        self.cluster.save()

    def healthy(self, timeout: float = 0.5) -> bool:
        """Whether the member answers ``/health`` with a leader and no alarm."""
        context: ssl.SSLContext | None = None
        tls = self.cluster.tls
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca_file))
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        try:
            with urllib.request.urlopen(  # noqa: S310  (our own loopback URL)
                f"{self.client_url}/health", timeout=timeout, context=context
            ) as response:
                body: Any = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def wait_healthy(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Wait until ``/health`` says true. Raises ``EtcdLaunchError`` with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise EtcdLaunchError(
                    f"etcd member {self.name} exited while starting; last lines of "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        raise EtcdLaunchError(
            f"etcd member {self.name} at {self.client_url} was not healthy after {timeout:g} s; "
            f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _signal(self, signum: int) -> None:
        pid = self.pid
        if pid is None:
            raise EtcdLaunchError(f"etcd member {self.name} is not running")
        os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the member and wait until it is gone (a crash, as far as etcd can tell)."""
        if self.running:
            self._signal(signal.SIGKILL)
            self._wait_exit(DEFAULT_STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, it answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Stopping a stopped member does nothing."""
        if not self.running:
            self._forget()
            return
        pid = self.pid
        if pid is None:  # exited between the two checks
            self._forget()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a paused member only acts on SIGTERM once resumed
        if not self._wait_exit(timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(timeout)
        self._forget()

    def restart(self, *, wait: bool = True, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Stop the member if it runs, start it again on the same data dir and ports."""
        self.stop()
        self.launch()
        if wait:
            self.wait_healthy(timeout)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        while time.monotonic() < deadline:
            if not self.running:
                return True
            time.sleep(0.02)
        return not self.running

    def _forget(self) -> None:
        self._process = None
        self._pid = None
        self.pid_path.unlink(missing_ok=True)
        self.cluster.save()


@dataclass(eq=False)
class EtcdCluster:
    """A set of etcd members on loopback, started by ``start`` or found again by ``load``."""

    directory: Path
    token: str
    tls: EtcdTls | None
    detach: bool
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """``127.0.0.1:port`` of every member's client URL, in member order."""
        return tuple(m.endpoint for m in self.members)

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def member(self, index: int) -> EtcdMember:
        return self.members[index]

    @classmethod
    def start(
        cls,
        directory: Path,
        members: int = 1,
        *,
        tls: EtcdTls | None = None,
        detach: bool = False,
        timeout: float = DEFAULT_START_TIMEOUT,
    ) -> EtcdCluster:
        """Start ``members`` etcd processes and wait until every one is healthy.

        If ``directory`` holds a cluster already (``cluster.json``), its members restart on
        their data, names and ports; ``members`` and ``tls`` must then match or be defaults.
        ``detach`` starts members in their own session so they outlive this process; find them
        again with ``load``. Raises ``EtcdLaunchError`` (and stops what it started) on failure.
        """
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / STATE_FILE).exists():
            cluster = cls.load(directory)
            if any(m.running for m in cluster.members):
                raise EtcdLaunchError(
                    f"an etcd cluster in {directory} is running already; stop it first"
                )
            if members not in (1, len(cluster.members)):
                raise EtcdLaunchError(
                    f"{directory} holds a {len(cluster.members)}-member cluster, not {members}"
                )
            cluster.detach = detach
            if tls is not None:
                cluster.tls = tls
        else:
            if members < 1:
                raise ValueError("an etcd cluster needs at least one member")
            cluster = cls(directory, f"signet-{secrets.token_hex(4)}", tls, detach)
            ports = free_ports(2 * members)
            for index in range(members):
                cluster.members.append(
                    EtcdMember(
                        name=f"member-{index}",
                        directory=directory / f"member-{index}",
                        client_port=ports[2 * index],
                        peer_port=ports[2 * index + 1],
                        cluster=cluster,
                    )
                )
        try:
            for m in cluster.members:
                m.launch()
            for m in cluster.members:
                m.wait_healthy(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def load(cls, directory: Path) -> EtcdCluster:
        """The cluster described by ``directory/cluster.json``; members keep their pids."""
        directory = directory.resolve()
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise EtcdLaunchError(f"no etcd cluster state in {directory}: {e}") from e
        tls = state.get("tls")
        cluster = cls(
            directory=directory,
            token=str(state["token"]),
            tls=EtcdTls(Path(tls["ca_file"]), Path(tls["cert_file"]), Path(tls["key_file"]))
            if tls
            else None,
            detach=bool(state.get("detach", False)),
        )
        for raw in state["members"]:
            cluster.members.append(
                EtcdMember(
                    name=str(raw["name"]),
                    directory=directory / str(raw["name"]),
                    client_port=int(raw["client_port"]),
                    peer_port=int(raw["peer_port"]),
                    cluster=cluster,
                    _pid=int(raw["pid"]) if raw.get("pid") else None,
                )
            )
        return cluster

    def save(self) -> None:
        """Write ``cluster.json`` (atomically) so ``load`` can find the members."""
        state = {
            "token": self.token,
            "detach": self.detach,
            "tls": {
                "ca_file": str(self.tls.ca_file),
                "cert_file": str(self.tls.cert_file),
                "key_file": str(self.tls.key_file),
            }
            if self.tls
            else None,
            "members": [
                {
                    "name": m.name,
                    "client_port": m.client_port,
                    "peer_port": m.peer_port,
                    "pid": m.pid,
                }
                for m in self.members
            ],
        }
        tmp = self.directory / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.directory / STATE_FILE)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every member: SIGTERM all, then SIGKILL whatever is left after ``timeout``."""
        for m in self.members:
            pid = m.pid  # read once: a member that dies meanwhile reports None
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    os.kill(pid, signal.SIGCONT)
        for m in self.members:
            m.stop(timeout)

    def etcdctl(self, *args: str, endpoints: tuple[str, ...] | None = None) -> str:
        """Run ``etcdctl`` (API v3) against the cluster; returns stdout.

        Raises ``EtcdLaunchError`` with etcdctl's stderr if it fails.
        """
        scheme = "https" if self.tls else "http"
        urls = ",".join(f"{scheme}://{e}" for e in (endpoints or self.endpoints))
        argv = [ETCDCTL_BINARY, f"--endpoints={urls}", "--command-timeout=5s"]
        if self.tls is not None:
            argv += [
                f"--cacert={self.tls.ca_file}",
                f"--cert={self.tls.cert_file}",
                f"--key={self.tls.key_file}",
            ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        env["ETCDCTL_API"] = "3"
        result = subprocess.run(
            [*argv, *args], capture_output=True, env=env, timeout=30, check=False
        )
        if result.returncode != 0:
            raise EtcdLaunchError(
                f"etcdctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode()
