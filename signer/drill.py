"""Failover drills on a development cluster: take one region down under signing load and prove
that nothing acknowledged was lost or signed twice (``signet drill failover``).

What a drill does, in order:

1. Makes sure a multi-region drill key exists and signs in every region.
2. Runs ``load`` client threads, each preferring another home region (round robin), each
   request with a fresh request id and digest. A request that fails over is retried with the
   *same* request id until it is acknowledged or ``request_give_up`` seconds pass.
3. Takes region R down: ``kill`` (SIGKILL to R's signer process groups and its etcd member),
   ``pause`` (SIGSTOP to the same) or ``partition`` (see below), keeps it down for
   ``down_seconds``, then brings it back and keeps the load running.
4. Checks every acknowledged request: exactly one ``sign`` entry with its request id in the
   audit logs of the region that answered (every audit folder of every region is read), a
   signature that verifies under the version's public key, and no request id acknowledged
   twice. Signatures audited but never returned (a region died between its audit record and
   its reply; ADR 0005 allows the log to hold more than was returned) are counted apart.
5. Writes ``drill-report.json``, ``drill-summary.txt`` and ``drill-timeline.png`` (matplotlib,
   optional dependency group ``drill``) and signs the report: SHA-256 of the JSON file, signed
   through Signet itself with the drill key (an HSM key, audited like any signature); the
   signature and key id are in ``drill-report.sig.json``, the public key comes from
   ``signet public-key``.

Partition on one machine, without network namespaces: before the load starts, R's signers are
restarted with their region's etcd member as their only endpoint (as if that member were their
only path to the quorum); the cut is then a SIGSTOP of that member, which isolates the member
from its peers and R's signers from etcd at once. Unlike a real partition, R's member does not
keep running on its own side; etcd's behaviour for a minority member is the same (no leader,
no writes), and the signers see exactly what they would: etcd out of reach. After the drill the
signers get their full endpoint list back.

Drills need the cluster's state directory (the folder of ``cluster.json`` written by
``signet dev up``): they start and stop its processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import secrets
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm, Replication
from signer.client import SignetClient
from signer.cluster import ClusterFile
from signer.dev.cluster import DevCluster
from signer.dev.etcd import EtcdCluster, EtcdMember
from signer.errors import SignetError

MODES = ("kill", "pause", "partition")
REPORT_NAME = "drill-report.json"


class DrillError(RuntimeError):
    """The drill could not run (not a failed check: those are in the report)."""


@dataclass(frozen=True)
class DrillSettings:
    cluster_path: Path
    region: str
    mode: str
    load: int = 8
    duration: float = 20.0
    down_seconds: float | None = None  # default: 40 % of the duration
    key: str = "drill"
    report_dir: Path | None = None
    request_timeout: float = 1.0
    request_give_up: float = 30.0
    revoke_during: bool = False  # revoke a second key's version while the region is down

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DrillError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.load < 1 or self.duration < 3:
            raise DrillError("a drill needs at least one client and three seconds")


@dataclass
class RequestOutcome:
    client: int
    home: str
    request_id: str
    key: str
    digest: str
    started: float
    finished: float
    attempts: int
    status: str  # "ok" or the final gRPC status name
    region: str = ""
    version: int = 0
    key_id: str = ""
    signature: str = ""  # hex


@dataclass
class DrillReport:
    settings: dict[str, Any]
    events: list[dict[str, Any]]
    totals: dict[str, int]
    rto_seconds: float
    rto_by_home_region: dict[str, float]
    latency_ms: dict[str, float]
    fail_closed_seconds: float | None
    rejoin_seconds: float | None
    checks: dict[str, bool]
    problems: list[str]
    revocation: dict[str, Any] | None = None
    signature: dict[str, Any] | None = None
    outcomes: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def summary(self) -> str:
        lines = [
            f"failover drill: region {self.settings['region']} {self.settings['mode']} under "
            f"{self.settings['load']} clients for {self.settings['duration']:g} s",
            f"  requests acknowledged {self.totals['acknowledged']}, failed "
            f"{self.totals['failed']}, retried after failover {self.totals['retried']}",
            f"  RTO (longest client-observed gap) {self.rto_seconds:.2f} s; by home region: "
            + ", ".join(f"{r} {s:.2f} s" for r, s in self.rto_by_home_region.items()),
            f"  latency p50 {self.latency_ms['p50']:.1f} ms, p99 {self.latency_ms['p99']:.1f} ms",
        ]
        if self.fail_closed_seconds is not None:
            lines.append(f"  region {self.settings['region']} stopped signing "
                         f"{self.fail_closed_seconds:.2f} s after the cut")
        if self.rejoin_seconds is not None:
            lines.append(f"  region {self.settings['region']} signed again "
                         f"{self.rejoin_seconds:.2f} s after it came back")
        if self.revocation is not None:
            lines.append(f"  revocation during the drill: fenced in "
                         f"{self.revocation['fence_seconds'] * 1000:.0f} ms; signatures by the "
                         f"revoked version requested after it returned: "
                         f"{self.revocation['violations']}")
        lines.append(f"  audit: lost {self.totals['lost']}, duplicated "
                     f"{self.totals['duplicated']}, bad signatures "
                     f"{self.totals['bad_signatures']}, audited but never returned "
                     f"{self.totals['audited_not_returned']}")
        lines.append("  RESULT: " + ("PASS (RPO 0, no duplicates)" if self.passed else
                                     "FAIL: " + "; ".join(self.problems)))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


# -- region control ---------------------------------------------------------------------------


class RegionControl:
    """The processes of one region of a development cluster."""

    def __init__(self, dev: DevCluster, cluster: ClusterFile, region: str) -> None:
        if region not in cluster.regions:
            raise DrillError(f"region {region!r} is not in {cluster.path}; known: "
                             f"{', '.join(cluster.regions)}")
        self.dev = dev
        self.cluster = cluster
        self.region = region
        self.signers = [s for s in dev.signers()
                        if s.directory.name.removeprefix("signer-").rsplit("-", 1)[0] == region]
        if not self.signers:
            raise DrillError(f"no signer of region {region!r} in {dev.state_dir}")
        self.etcd = EtcdCluster.load(dev.state_dir / "etcd")
        local = yaml.safe_load(self.signers[0].config_path.read_text())["etcd"]["endpoints"][0]
        members = [m for m in self.etcd.members if m.endpoint == local]
        self.member: EtcdMember | None = members[0] if members else None

    def _groups(self, sig: signal.Signals) -> None:
        for signer in self.signers:
            pid = signer.pid
            if pid is not None:
                # The signer runs in its own session (start_new_session): its process group
                # holds any worker processes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)

    def kill(self) -> None:
        self._groups(signal.SIGKILL)
        if self.member is not None:
            self.member.kill()

    def pause(self) -> None:
        self._groups(signal.SIGSTOP)
        if self.member is not None:
            self.member.pause()

    def resume(self) -> None:
        if self.member is not None:
            self.member.resume()
        self._groups(signal.SIGCONT)

    def cut(self) -> None:
        if self.member is not None:
            self.member.pause()

    def heal(self) -> None:
        if self.member is not None:
            self.member.resume()

    def restart_signers(self, *, pinned: bool) -> None:
        """Restart the region's signers, with only their local etcd member (``pinned``) or
        with every member, local first."""
        for signer in self.signers:
            config = yaml.safe_load(signer.config_path.read_text())
            endpoints = config["etcd"].setdefault("all_endpoints", config["etcd"]["endpoints"])
            config["etcd"]["endpoints"] = endpoints[:1] if pinned else endpoints
            config["etcd"].pop("all_endpoints")
            if pinned:
                config["etcd"]["all_endpoints_before_drill"] = endpoints
            signer.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            signer.stop()
        self.start_signers()

    def start_signers(self) -> None:
        if self.member is not None and not self.member.running:
            self.member.launch()
            self.member.wait_healthy()
        for signer in self.signers:
            config = yaml.safe_load(signer.config_path.read_text())
            config["etcd"].pop("all_endpoints_before_drill", None)
            signer.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            if not signer.running:
                signer.launch(_signer_env(self.dev, config))
        admin = self.cluster.identity("admin")
        for signer in self.signers:
            signer.wait_healthy(ca=self.cluster.ca, cert=admin.cert, key=admin.key, timeout=60)


def _signer_env(dev: DevCluster, config: dict[str, Any]) -> dict[str, str]:
    region = str(config["region"])
    hsm_dir = dev.state_dir / ("hsm" if region == "local" else f"hsm-{region}")
    env = dict(os.environ, SOFTHSM2_CONF=str(hsm_dir / "softhsm2.conf"))
    env["SIGNET_PKCS11_MODULE"] = str(config["hsm"]["module"])
    return env


# -- the drill --------------------------------------------------------------------------------


class _Load:
    """Client threads signing until told to stop."""

    def __init__(self, settings: DrillSettings, cluster: ClusterFile, keys: list[str],
                 epoch: float) -> None:
        self.settings = settings
        self.cluster = cluster
        self.keys = keys
        self.epoch = epoch
        self.outcomes: list[RequestOutcome] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.regions = list(cluster.regions)
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True,
                                         name=f"drill-client-{i}")
                        for i in range(settings.load)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.settings.request_give_up + 5)

    def _client(self, index: int) -> None:
        home = self.regions[index % len(self.regions)]
        client = SignetClient.from_cluster(self.cluster, "pipeline", region=home,
                                           timeout=self.settings.request_timeout)
        n = 0
        with client:
            while not self.stop.is_set():
                key = self.keys[1] if len(self.keys) > 1 and n % 4 == 3 else self.keys[0]
                n += 1
                self._one(client, index, home, key)

    def _one(self, client: SignetClient, index: int, home: str, key: str) -> None:
        request_id = str(uuid.uuid4())
        digest = Digest(DigestAlgorithm.SHA256, secrets.token_bytes(32))
        started = time.monotonic() - self.epoch
        attempts = 0
        while True:
            attempts += 1
            try:
                sig = client.sign_digest(key, digest, request_id=request_id)
            except SignetError as error:
                # Same request id on every retry: the server answers a retry of a request it
                # already signed with that signature, so nothing is signed twice.
                retryable = error.code in (grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED,
                                           grpc.StatusCode.ABORTED)
                elapsed = time.monotonic() - self.epoch - started
                if retryable and elapsed <= self.settings.request_give_up:
                    time.sleep(0.05)
                    continue
                outcome = RequestOutcome(index, home, request_id, key, str(digest), started,
                                         time.monotonic() - self.epoch, attempts,
                                         error.code.name)
            else:
                outcome = RequestOutcome(index, home, request_id, key, str(digest), started,
                                         time.monotonic() - self.epoch, attempts, "ok",
                                         sig.region, sig.version, sig.key_id,
                                         sig.signature.hex())
            break
        with self._lock:
            self.outcomes.append(outcome)


def _prober(cluster: ClusterFile, region: str, key: str, *, epoch: float,
            stop: threading.Event, successes: list[float]) -> None:
    """Sign directly in ``region`` (no failover) every 100 ms; record when it worked."""
    who = cluster.identity("pipeline")
    client = SignetClient(cluster.regions[region].grpc_endpoints, ca=cluster.ca, cert=who.cert,
                          key=who.key, timeout=0.5, attempts_per_endpoint=1)
    with client:
        while not stop.is_set():
            with contextlib.suppress(SignetError):
                client.sign_digest(key, Digest(DigestAlgorithm.SHA256, secrets.token_bytes(32)),
                                   request_id=f"probe-{uuid.uuid4()}")
                successes.append(time.monotonic() - epoch)
            time.sleep(0.1)


def _ensure_key(cluster: ClusterFile, name: str) -> None:
    with SignetClient.from_cluster(cluster, "admin", timeout=5.0) as admin:
        try:
            admin.get_key(name)
        except SignetError as error:
            if error.code is not grpc.StatusCode.NOT_FOUND:
                raise
            try:
                admin.create_key(name, Algorithm.ECDSA_P256_SHA256,
                                 replication=Replication.MULTI_REGION)
            except SignetError as create_error:
                raise DrillError(
                    f"the drill key {name!r} does not exist and cannot be created here "
                    f"({create_error}); create it as a multi-region ECDSA key through a "
                    "ceremony and pass --key") from None
    who = cluster.identity("pipeline")
    deadline = time.monotonic() + 30
    for region, entry in cluster.regions.items():
        with SignetClient(entry.grpc_endpoints, ca=cluster.ca, cert=who.cert, key=who.key,
                          timeout=2.0, attempts_per_endpoint=1) as client:
            while True:
                try:
                    client.sign_digest(name, Digest(DigestAlgorithm.SHA256, bytes(32)),
                                       request_id=f"warm-{uuid.uuid4()}")
                    break
                except SignetError as error:
                    if time.monotonic() > deadline:
                        raise DrillError(f"key {name!r} does not sign in region {region}: "
                                         f"{error}") from None
                    time.sleep(0.1)


def run_failover_drill(  # noqa: PLR0915 - the drill's script, read top to bottom
    settings: DrillSettings, *, log: Callable[[str], None] = print,
) -> DrillReport:
    """Run one drill and write its report. Raises ``DrillError`` when the drill cannot run;
    failed checks are reported (``DrillReport.passed``), not raised."""
    cluster = ClusterFile.load(settings.cluster_path)
    dev = DevCluster(settings.cluster_path.parent.resolve())
    control = RegionControl(dev, cluster, settings.region)
    report_dir = settings.report_dir or (dev.state_dir / "drills" / time.strftime(
        "%Y%m%d-%H%M%S"))
    report_dir.mkdir(parents=True, exist_ok=True)
    keys = [settings.key]
    _ensure_key(cluster, settings.key)
    fence_key = f"{settings.key}-fence"
    if settings.revoke_during:
        _ensure_key(cluster, fence_key)
        keys.append(fence_key)
    if settings.mode == "partition":
        log(f"pinning region {settings.region}'s signers to their local etcd member")
        control.restart_signers(pinned=True)

    down_for = settings.down_seconds or settings.duration * 0.4
    t_down_at = settings.duration * 0.25
    epoch = time.monotonic()
    events: list[dict[str, Any]] = []

    def event(what: str, **fields: Any) -> None:
        events.append({"t": round(time.monotonic() - epoch, 3), "event": what, **fields})
        log(f"drill: {what}")

    load = _Load(settings, cluster, keys, epoch)
    probe_ok: list[float] = []
    stop_probe = threading.Event()
    prober = threading.Thread(target=_prober, daemon=True, args=(
        cluster, settings.region, settings.key),
        kwargs={"epoch": epoch, "stop": stop_probe, "successes": probe_ok})
    load.start()
    prober.start()
    event("load started", clients=settings.load)
    revocation: dict[str, Any] | None = None
    try:
        time.sleep(t_down_at)
        t_down = time.monotonic() - epoch
        {"kill": control.kill, "pause": control.pause, "partition": control.cut}[settings.mode]()
        event(f"region {settings.region} down ({settings.mode})")
        if settings.revoke_during:
            time.sleep(down_for / 3)
            revocation = _revoke(cluster, fence_key, epoch)
            event("revoked", key=fence_key, version=1, **revocation)
            time.sleep(max(0.0, down_for - (time.monotonic() - epoch - t_down)))
        else:
            time.sleep(down_for)
        t_up = time.monotonic() - epoch
        if settings.mode == "kill":
            control.start_signers()
        elif settings.mode == "pause":
            control.resume()
        else:
            control.heal()
        event(f"region {settings.region} back")
        time.sleep(max(1.0, settings.duration - (time.monotonic() - epoch)))
    finally:
        load.join()
        stop_probe.set()
        prober.join(5)
        event("load stopped")
        if settings.mode == "pause":
            control.resume()  # harmless when already resumed
        if settings.mode == "partition":
            control.heal()
            control.restart_signers(pinned=False)
        elif settings.mode == "kill":
            control.start_signers()
    report = _evaluate(settings, cluster, dev, outcomes=load.outcomes, events=events,
                       t_down=t_down, t_up=t_up, probe_ok=probe_ok, revocation=revocation)
    _write(report, report_dir, cluster, settings.key)
    log(report.summary())
    log(f"report in {report_dir}")
    return report


def _revoke(cluster: ClusterFile, key: str, epoch: float) -> dict[str, Any]:
    with SignetClient.from_cluster(cluster, "admin", timeout=30.0) as admin:
        started = time.monotonic() - epoch
        result = admin.revoke_version(key, 1)
        returned = time.monotonic() - epoch
    return {"requested_at": round(started, 3), "returned_at": round(returned, 3),
            "fence_seconds": result.fence_seconds,
            "signers_lapsed": list(result.signers_lapsed),
            "signers_acknowledged": list(result.signers_acknowledged)}


# -- checks -----------------------------------------------------------------------------------


def read_audit_entries(state_dir: Path) -> list[dict[str, Any]]:
    """Every ``sign`` entry of every audit log of every signer of the cluster."""
    entries = []
    for path in sorted(state_dir.glob("signer-*/**/entries.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("kind") == "sign":
                    entries.append(entry)
    return entries


def _verify(public_pem: str, algorithm: Algorithm, digest: bytes, signature: bytes) -> bool:
    key = serialization.load_pem_public_key(public_pem.encode())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, digest, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                       Prehashed(hashes.SHA256()))
        else:  # Ed25519 drill keys cannot exist: they are never multi-region
            return False
    except InvalidSignature:
        return False
    return True


def _evaluate(  # noqa: PLR0912, PLR0915 - one pass over every check, in report order
    settings: DrillSettings, cluster: ClusterFile, dev: DevCluster, *,
    outcomes: list[RequestOutcome], events: list[dict[str, Any]], t_down: float,
    t_up: float, probe_ok: list[float], revocation: dict[str, Any] | None,
) -> DrillReport:
    acked = [o for o in outcomes if o.status == "ok"]
    audit = read_audit_entries(dev.state_dir)
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in audit:
        by_request[str(entry.get("request_id", ""))].append(entry)
    public: dict[tuple[str, int], tuple[str, Algorithm]] = {}
    with SignetClient.from_cluster(cluster, "pipeline", timeout=5.0) as client:
        for o in acked:
            if (o.key, o.version) not in public:
                pk = client.public_key(o.key, o.version)
                public[(o.key, o.version)] = (pk.pem, pk.algorithm)
    lost = bad = extra = 0
    problems: list[str] = []
    ids = Counter(o.request_id for o in acked)
    twice = [r for r, n in ids.items() if n > 1]
    duplicated = len(twice) + _replays_differ(cluster, acked, by_request)
    for o in acked:
        entries = by_request.get(o.request_id, [])
        here = [e for e in entries if e.get("region") == o.region]
        if not here:
            lost += 1
        # More than one entry: a signer signed and audited, then could not store the result
        # (its region was cut off or paused) and never returned it; the retry was signed
        # again and that one was returned. Audit entries name no signature, so which entry
        # was returned cannot be told apart; ADR 0005 allows entries never returned.
        extra += len(entries) - min(1, len(here))
        pem, algorithm = public[(o.key, o.version)]
        digest = bytes.fromhex(o.digest.partition(":")[2])
        if not _verify(pem, algorithm, digest, bytes.fromhex(o.signature)):
            bad += 1
    if lost:
        problems.append(f"{lost} acknowledged signatures have no audit entry")
    if bad:
        problems.append(f"{bad} acknowledged signatures do not verify")
    if twice:
        problems.append(f"{len(twice)} request ids were acknowledged twice")
    checks = {"rpo_zero": lost == 0, "no_duplicates": duplicated == 0,
              "signatures_valid": bad == 0}
    if revocation is not None:
        violations = sum(1 for o in acked if o.key == f"{settings.key}-fence" and o.version == 1
                         and o.started > revocation["returned_at"])
        revocation["violations"] = violations
        checks["fencing_holds"] = violations == 0
        if violations:
            problems.append(f"{violations} signatures by the revoked version were returned "
                            "for requests made after the revocation returned")
    rto_by_home = {}
    for home in cluster.regions:
        times = sorted(o.finished for o in acked if o.home == home)
        rto_by_home[home] = round(_longest_gap(times, t_down), 3)
    latencies = sorted((o.finished - o.started) * 1000 for o in acked if o.attempts == 1)
    fail_closed = rejoin = None
    if probe_ok:
        last_before = max((t for t in probe_ok if t < t_up), default=None)
        if last_before is not None and last_before >= t_down - 1:
            fail_closed = round(max(0.0, last_before - t_down), 3)
        first_after = min((t for t in probe_ok if t >= t_up), default=None)
        if first_after is not None:
            rejoin = round(first_after - t_up, 3)
    ttl = _lease_ttl(dev)
    if settings.mode == "partition":
        checks["minority_stops_within_lease_ttl"] = fail_closed is not None and \
            fail_closed <= ttl
        if not checks["minority_stops_within_lease_ttl"]:
            problems.append(f"region {settings.region} kept signing {fail_closed} s after the "
                            f"cut (lease TTL {ttl} s)")
    return DrillReport(
        settings={"region": settings.region, "mode": settings.mode, "load": settings.load,
                  "duration": settings.duration, "key": settings.key,
                  "down_seconds": round(t_up - t_down, 3), "lease_ttl_seconds": ttl,
                  "regions": list(cluster.regions)},
        events=events,
        totals={"requests": len(outcomes), "acknowledged": len(acked),
                "failed": len(outcomes) - len(acked),
                "retried": sum(1 for o in acked if o.attempts > 1 or o.region != o.home),
                "lost": lost, "duplicated": duplicated, "bad_signatures": bad,
                "audited_not_returned": extra},
        rto_seconds=max(rto_by_home.values(), default=0.0),
        rto_by_home_region=rto_by_home,
        latency_ms={"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99)},
        fail_closed_seconds=fail_closed, rejoin_seconds=rejoin, checks=checks,
        problems=problems, revocation=revocation,
        outcomes=[asdict(o) for o in sorted(outcomes, key=lambda o: o.started)],
    )


def _replays_differ(cluster: ClusterFile, acked: list[RequestOutcome],
                    by_request: dict[str, list[dict[str, Any]]]) -> int:
    """Ask again, with the same request id, for every acknowledged request that failed over,
    was retried or has more than one audit entry: the cluster must answer with the very
    signature the client got (one authoritative signature per request id). Returns how many
    differ."""
    suspects = [o for o in acked if o.attempts > 1 or o.region != o.home
                or len(by_request.get(o.request_id, [])) > 1]
    differ = 0
    with SignetClient.from_cluster(cluster, "pipeline", timeout=5.0) as client:
        for o in suspects:
            digest = Digest.parse(o.digest)
            try:
                again = client.sign_digest(o.key, digest, request_id=o.request_id)
            except SignetError:
                continue  # e.g. its version was revoked since: the replay is refused (I2)
            if again.signature.hex() != o.signature:
                differ += 1
    return differ


def _lease_ttl(dev: DevCluster) -> float:
    signer = dev.signers()[0]
    return float(yaml.safe_load(signer.config_path.read_text()).get("lease_ttl_seconds", 5))


def _longest_gap(times: list[float], since: float) -> float:
    """The longest time without an acknowledgement, from ``since`` on."""
    points = [since, *[t for t in times if t >= since]]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    return round(values[min(len(values) - 1, int(len(values) * pct / 100))], 2)


# -- report -----------------------------------------------------------------------------------


def _write(report: DrillReport, directory: Path, cluster: ClusterFile, key: str) -> None:
    path = directory / REPORT_NAME
    path.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True) + "\n")
    (directory / "drill-summary.txt").write_text(report.summary() + "\n")
    _plot(report, directory / "drill-timeline.png")
    digest = hashlib.sha256(path.read_bytes()).digest()
    with SignetClient.from_cluster(cluster, "pipeline", timeout=5.0) as client:
        sig = client.sign_digest(key, Digest(DigestAlgorithm.SHA256, digest),
                                 request_id=f"drill-report-{uuid.uuid4()}")
    (directory / f"{REPORT_NAME}.sig").write_bytes(sig.signature)
    report.signature = {"file": REPORT_NAME, "sha256": digest.hex(), "key": sig.key,
                        "version": sig.version, "key_id": sig.key_id, "region": sig.region,
                        "signature_file": f"{REPORT_NAME}.sig",
                        "verify": f"signet public-key {sig.key} --version {sig.version} > "
                                  "drill.pem && openssl dgst -sha256 -verify drill.pem "
                                  f"-signature {REPORT_NAME}.sig {REPORT_NAME}"}
    (directory / "drill-report.sig.json").write_text(json.dumps(report.signature, indent=1)
                                                     + "\n")


def _plot(report: DrillReport, path: Path) -> None:
    """The timeline: every request's latency at its completion time, by answering region,
    with the drill's events. Skipped (noted in the summary) without matplotlib."""
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path.with_suffix(".txt").write_text("matplotlib is not installed (pip install "
                                            "'signet[drill]'); no timeline plot\n")
        return
    figure, axis = plt.subplots(figsize=(10, 4.5))
    by_region: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for o in report.outcomes:
        label = o["region"] if o["status"] == "ok" else f"failed ({o['status']})"
        by_region[label].append((o["finished"], (o["finished"] - o["started"]) * 1000))
    for label, points in sorted(by_region.items()):
        axis.scatter([p[0] for p in points], [p[1] for p in points], s=6, label=label)
    for e in report.events:
        axis.axvline(e["t"], color="grey", linestyle="--", linewidth=0.8)
        axis.text(e["t"], axis.get_ylim()[1] * 0.95, e["event"], rotation=90, fontsize=7,
                  va="top")
    axis.set_yscale("log")
    axis.set_xlabel("seconds since the load started")
    axis.set_ylabel("request latency (ms), incl. failover")
    axis.set_title(f"failover drill: {report.settings['region']} {report.settings['mode']}, "
                   f"RTO {report.rto_seconds:.2f} s, "
                   + ("PASS" if report.passed else "FAIL"))
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
