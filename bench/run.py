"""``make bench`` (``python -m bench.run``): measure a real dev cluster, write
``bench/results/latest.json`` and ``latest.png``. See ``bench/README.md``.

One signer with one worker process per core serves the throughput phases; a second small
cluster with three single-process signers serves the revocation-fence phase. The load generator
(``bench.load``) is a separate process; nothing is pinned, so the kernel shares the cores
between the workers and the load generator, and both CPU times are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench import batch_path
from bench.admin import BenchAdmin
from bench.ceiling import openssl_speed, softhsm_ceiling
from bench.load import LoadSpec
from kms.domain.keys import Algorithm
from signer.client import SignetClient
from signer.cluster import ClusterFile
from signer.dev.cluster import DevCluster
from signer.dev.etcd import EtcdCluster
from signer.dev.processes import SignerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEYS = {"ecdsa-p256": Algorithm.ECDSA_P256_SHA256, "ed25519": Algorithm.ED25519,
        "rsa-pss-3072": Algorithm.RSA_PSS_3072_SHA256}
TARGETS = {
    "sign_batch_fraction_of_softhsm_ceiling": 0.70,
    "sign_digest_per_second_at_64_callers": 4000.0,
    "sign_digest_p99_ms_at_64_callers": 20.0,
    "fence_p99_ms": 100.0,
    "memory_growth_allowed": "max(5 MiB, 5%) between the first and last tenth of the run",
}

# One load-generator identity at thousands of calls/s: the per-identity limits (signer.guard)
# would measure the quota, not the service.
BENCH_LIMITS = {"limits": {"per_identity_rps": 0, "per_identity_concurrency": 0}}


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


# -- processes and memory ------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the signer's worker processes)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(found)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemorySampler:
    """Samples the RSS of every worker of the signer every ``interval`` seconds."""

    def __init__(self, parent: int, interval: float = 0.5) -> None:
        self._parent = parent
        self._interval = interval
        self._stop = threading.Event()
        self._began = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []  # (seconds, pid, kib)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic() - self._began
            for pid in children(self._parent):
                kib = rss_kib(pid)
                if kib is not None:
                    self.samples.append((now, pid, kib))

    def elapsed(self) -> float:
        return time.monotonic() - self._began

    def summary(self, since: float = 0.0) -> dict[str, Any]:
        by_pid: dict[int, list[tuple[float, int]]] = {}
        for t, pid, kib in self.samples:
            if t >= since:
                by_pid.setdefault(pid, []).append((t, kib))
        workers = {}
        flat = True
        for pid, series in by_pid.items():
            tenth = max(1, len(series) // 10)
            first = statistics.median(k for _, k in series[:tenth]) / 1024
            last = statistics.median(k for _, k in series[-tenth:]) / 1024
            allowed = max(5.0, 0.05 * first)
            worker_flat = last - first <= allowed
            flat = flat and worker_flat
            workers[str(pid)] = {
                "samples": len(series), "seconds": round(series[-1][0] - series[0][0], 1),
                "rss_mib_first_tenth": round(first, 1), "rss_mib_last_tenth": round(last, 1),
                "rss_mib_max": round(max(k for _, k in series) / 1024, 1),
                "growth_mib": round(last - first, 1), "flat": worker_flat,
            }
        return {"workers": workers, "flat": flat and bool(workers)}


# -- phases ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cluster: ClusterFile, signer: SignerProcess, workers: list[int],
                 etcd_pids: list[int]) -> None:
        self.cluster = cluster
        self.signer = signer
        self.workers = workers
        self.etcd_pids = etcd_pids
        pipeline = cluster.identity("pipeline")
        self._base = {"endpoint": signer.endpoint, "ca": str(cluster.ca),
                      "cert": str(pipeline.cert), "key": str(pipeline.key)}

    def load(self, mode: str, *, key_name: str = "", callers: int = 1, batch_size: int = 1,
             seconds: float = 5.0, warmup: float = 1.0,
             request_ids: bool = True) -> dict[str, Any]:
        spec = LoadSpec(**self._base, mode=mode, key_name=key_name, callers=callers,
                        channels=min(callers, 16), batch_size=batch_size, seconds=seconds,
                        warmup=warmup, server_pids=tuple(children(self.signer.pid or 0)),
                        etcd_pids=tuple(self.etcd_pids),
                        request_ids=request_ids)
        run = subprocess.run([sys.executable, "-m", "bench.load", json.dumps(spec.to_dict())],
                             capture_output=True, text=True, cwd=ROOT, timeout=seconds + 120,
                             check=False)
        if run.returncode != 0:
            raise RuntimeError(f"load generator failed:\n{run.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
        latency = result["latency_ms"]
        label = mode if request_ids else f"{mode} (no request id)"
        say(f"{label:6} {key_name:14} callers={callers:<3} batch={batch_size:<4} "
            f"{result['items_per_second']:9.0f}/s  p50={latency['p50']:.2f} ms "
            f"p99={latency['p99']:.2f} ms  cpu: server {result['server_cores']:.2f} cores, "
            f"load generator {result['load_generator_cores']:.2f}, "
            f"etcd {result['etcd_cores']:.2f}"
            + (f"  errors {result['errors']}" if result["errors"] else ""))
        return result


def hsm_settings(signer: SignerProcess, state_dir: Path) -> dict[str, str]:
    config = yaml.safe_load(signer.config_path.read_text())
    return {"conf": str(state_dir / "hsm" / "softhsm2.conf"), "module": config["hsm"]["module"],
            "label": config["hsm"]["token_label"],
            "pin": Path(config["hsm"]["pin_file"]).read_text().strip()}


def etcd_pids(dev: DevCluster) -> list[int]:
    """The dev cluster's running etcd members."""
    return [pid for member in EtcdCluster.load(dev.state_dir / "etcd").members
            if (pid := member.pid) is not None]


def wait_for_workers(signer: SignerProcess, count: int, timeout: float = 60.0) -> list[int]:
    """Wait until the signer's log says ``count`` workers are ready; returns their pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = children(signer.pid or 0)
        ready = signer.log_path.read_text(errors="replace").count(") is ready")
        if len(pids) == count and ready >= count:
            return pids
        time.sleep(0.2)
    raise RuntimeError(f"the signer did not start {count} workers in {timeout:.0f} s")


def measure_fence(state_dir: Path, revocations: int) -> dict[str, Any]:
    """Revoke-and-rotate ``revocations`` times on a cluster of three single-process signers."""
    dev = DevCluster(state_dir)
    try:
        cluster = dev.up(signers=3, log=False)
        server_ms, client_ms = [], []
        signers = 0
        with SignetClient.from_cluster(cluster, "admin", timeout=30.0) as client:
            admin = BenchAdmin(client, state_dir)
            admin.create_key("bench-fence", "ecdsa-p256")
            time.sleep(0.5)
            for version in range(1, revocations + 1):
                began = time.perf_counter()
                fence_seconds, acknowledged = admin.revoke("bench-fence", version)
                server_ms.append(fence_seconds * 1000)
                signers = max(signers, len(acknowledged))
                client_ms.append((time.perf_counter() - began) * 1000)
                admin.rotate("bench-fence")
                time.sleep(0.1)
    finally:
        dev.down()
    return {
        "signer_processes": 3, "signers_acknowledged": signers, "revocations": revocations,
        "fence_ms": _quantiles(server_ms),
        "revoke_call_ms": _quantiles(client_ms),
        "revoke_call_note": "client wall time of the revoke (through a custodian ceremony "
                            "when the cluster requires one), fence included",
        "fence_ms_all": [round(x, 2) for x in server_ms],
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))], 2)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2)}


def machine_info() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "model_name": model,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg())}


# -- the whole run -----------------------------------------------------------------------------


def run(soak_seconds: float, quick: bool) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    seconds = 2.0 if quick else 5.0
    results: dict[str, Any] = {
        "issue": 8, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
        "setup": {
            "workers": cores,
            "load_generator": "one separate process (grpc.aio, mTLS), up to 16 HTTP/2 "
                              "connections spread over the workers by SO_REUSEPORT; no CPU "
                              "pinning: the kernel shares the cores between the workers and "
                              "the load generator, whose CPU time is reported per phase",
            "audit_log": "on in every cluster phase: a signer cannot run without it (I3); "
                         "'audit_log_off' measures its cost in process (bench.batch_path, "
                         "SignBatch 256 with a fake HSM, with and without the audit log)",
            "opentelemetry": "on: the telemetry interceptor (a span and Prometheus metrics per "
                             "call) and the HSM/audit tracing wrappers run on every call, trace "
                             "export off; 'telemetry_off' repeats the reference points on a "
                             "cluster with telemetry.enabled: false",
            "limits": "per-identity rate and concurrency limits off (limits: 0): the load "
                      "generator is one identity, and the benchmark measures capacity",
        },
        "targets": TARGETS,
    }
    tmp = Path(tempfile.mkdtemp(prefix="signet-bench-"))
    try:
        dev = DevCluster(tmp / "cluster")
        try:
            say(f"starting a dev cluster: one signer with {cores} workers")
            cluster = dev.up(log=False, signer_settings={"workers": cores, **BENCH_LIMITS})
            signer = dev.signers()[0]
            workers = wait_for_workers(signer, cores)
            with MemorySampler(signer.pid or 0) as memory:
                # (a) on the cluster's own token, while its workers idle.
                results["ceilings"] = ceilings(hsm_settings(signer, dev.state_dir), cores, quick)
                bench = Bench(cluster, signer, workers, etcd_pids(dev))
                throughput(bench, cluster, dev.state_dir, results, seconds,
                           hsm=hsm_settings(signer, dev.state_dir))
                soak_from = memory.elapsed()
                if soak_seconds:
                    say(f"soak: SignDigest at 16 callers for {soak_seconds:.0f} s")
                    results["soak"] = {
                        "seconds": soak_seconds,
                        "load": bench.load("digest", key_name="bench-ecdsa-p256", callers=16,
                                           seconds=soak_seconds, warmup=1.0),
                    }
            results["memory"] = memory.summary()
            results["memory"]["series"] = _series(memory.samples)
            if soak_seconds:
                results["soak"]["memory"] = memory.summary(since=soak_from)
                results["soak"]["memory_series"] = results["memory"]["series"]
        finally:
            dev.down()
        say("telemetry off: the reference points again on a cluster with "
            "telemetry.enabled: false")
        results["telemetry_off"] = measure_cluster(tmp / "telemetry-off", telemetry=False,
                                                   seconds=seconds)
        revocations = 10 if quick else 20
        say(f"revocation fence: {revocations} revocations, three signer processes")
        results["fence"] = measure_fence(tmp / "fence", revocations)
        say(f"fence p50 {results['fence']['fence_ms']['p50']} ms, "
            f"p99 {results['fence']['fence_ms']['p99']} ms")
        results["audit_log_off"] = batch_path.audit_cost()
        say("audit log, in process: {cpu_us_per_signature_with_audit_log} µs of CPU per "
            "SignBatch signature outside the HSM with it, "
            "{cpu_us_per_signature_without_audit_log} µs without".format(
                **results["audit_log_off"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["ratios"] = ratios(results)
    results["targets_met"] = targets_met(results)
    return results


def ceilings(hsm: dict[str, Any], cores: int, quick: bool) -> dict[str, Any]:
    """(a): raw openssl on one core, and SoftHSM via python-pkcs11 on every core."""
    out: dict[str, Any] = {}
    for algorithm in KEYS:
        primary = algorithm == "ecdsa-p256"
        span = (4.0 if primary else 3.0) if not quick else 1.5
        openssl = openssl_speed(algorithm, 3 if not quick else 1)
        softhsm = softhsm_ceiling(**hsm, algorithm=algorithm, processes=cores, seconds=span)
        one = softhsm_ceiling(**hsm, algorithm=algorithm, processes=1, seconds=span) \
            if primary else None
        # The stricter ceiling: the same loop with the signer's own one-C_Sign binding.
        direct = softhsm_ceiling(**hsm, algorithm=algorithm, processes=cores, seconds=span,
                                 direct=True) if algorithm != "rsa-pss-3072" else None
        say(f"ceiling {algorithm}: openssl {openssl['signatures_per_second']:.0f}/s per core; "
            f"SoftHSM {softhsm['signatures_per_second']:.0f}/s on {cores} processes"
            + (f", {one['signatures_per_second']:.0f}/s on one" if one else "")
            + (f"; one C_Sign per signature {direct['signatures_per_second']:.0f}/s"
               if direct else ""))
        out[algorithm] = {"openssl_one_core": openssl, "softhsm_all_cores": softhsm,
                          "softhsm_one_process": one, "softhsm_all_cores_direct": direct}
    return out


def throughput(bench: Bench, cluster: ClusterFile, state_dir: Path, results: dict[str, Any],
               seconds: float, *, hsm: dict[str, Any]) -> None:
    with SignetClient.from_cluster(cluster, "admin", timeout=60.0) as client:
        admin = BenchAdmin(client, state_dir)
        for name in KEYS:
            admin.create_key(f"bench-{name}", name)
    time.sleep(1.0)  # every worker has the keys from its watch
    for name in KEYS:
        primary = name == "ecdsa-p256"
        span = seconds if primary else max(1.5, seconds / 2)
        key = f"bench-{name}"
        callers_levels = (1, 16, 64) if primary else (64,)
        digest = {str(c): bench.load("digest", key_name=key, callers=c, seconds=span)
                  for c in callers_levels}
        # RSA-PSS-3072 signs ~400/s per core: 256-digest batches from 8 callers would take
        # longer than the window, so its pass uses 16-digest batches from 4 callers.
        sizes, batch_callers = ((1, 16, 256), 8) if primary else (
            ((16,), 4) if name == "rsa-pss-3072" else ((256,), 8))
        batch = {}
        for size in sizes:
            bracket = primary and size == 256
            before = _adjacent_ceiling(hsm, name, quick=seconds < 5) if bracket else None
            batch[str(size)] = bench.load("batch", key_name=key, callers=batch_callers,
                                          batch_size=size, seconds=span)
            if before is not None:
                results["sign_batch_adjacent_ceiling"] = _bracket(
                    before, _adjacent_ceiling(hsm, name, quick=seconds < 5), batch[str(size)])
        results.setdefault("sign_digest", {})[name] = digest
        if primary:
            results["sign_digest_without_request_id"] = {
                "note": "SignDigest with an empty request id: the signer skips its etcd "
                        "request ledger (two etcd transactions per call); the client library "
                        "always sends one, so the numbers above are the realistic ones",
                "64": bench.load("digest", key_name=key, callers=64, seconds=span,
                                 request_ids=False),
                "health_check_64": bench.load("health", callers=64, seconds=span),
            }
        results.setdefault("sign_batch", {})[name] = batch
    trust = bench.load("trust", callers=16, seconds=max(1.5, seconds / 2))
    results["trust_bundle"] = {"available": True, "calls_per_second":
                               trust["calls_per_second"], "load": trust}


def _adjacent_ceiling(hsm: dict[str, Any], algorithm: str, *, quick: bool) -> dict[str, Any]:
    """The SoftHSM ceiling again, right next to a SignBatch phase (the workers idle)."""
    return softhsm_ceiling(**hsm, algorithm=algorithm, processes=os.cpu_count() or 1,
                           seconds=1.5 if quick else 3.0)


def _bracket(before: dict[str, Any], after: dict[str, Any], batch: dict[str, Any]
             ) -> dict[str, Any]:
    """SignBatch 256 against the ceiling measured just before and just after it: this VM's
    speed drifts by about a tenth over minutes, and the run's first ceiling is minutes old by
    the time SignBatch runs (bench/README.md, round 5)."""
    mean = (before["signatures_per_second"] + after["signatures_per_second"]) / 2
    ratio = round(batch["items_per_second"] / mean, 3)
    say(f"ceiling around SignBatch 256: {before['signatures_per_second']:.0f}/s before, "
        f"{after['signatures_per_second']:.0f}/s after; SignBatch 256 = {ratio} of their mean")
    return {"before": before, "after": after, "mean_signatures_per_second": round(mean, 1),
            "sign_batch_256_over_adjacent_ceiling": ratio}


def probe_phases(bench: Bench, seconds: float) -> dict[str, Any]:
    """The reference points of one configuration: what a change to a hot path moves."""
    key = "bench-ecdsa-p256"
    return {
        "sign_digest_64": bench.load("digest", key_name=key, callers=64, seconds=seconds),
        "sign_digest_64_without_request_id": bench.load(
            "digest", key_name=key, callers=64, seconds=seconds, request_ids=False),
        "health_check_64": bench.load("health", callers=64, seconds=seconds),
        "sign_batch_256": bench.load("batch", key_name=key, callers=8, batch_size=256,
                                     seconds=seconds),
    }


def measure_cluster(state_dir: Path, *, telemetry: bool, seconds: float,
                    hsm_signing: str = "auto") -> dict[str, Any]:
    """Start a cluster with telemetry on or off and measure ``probe_phases`` on it."""
    cores = os.cpu_count() or 1
    dev = DevCluster(state_dir)
    try:
        cluster = dev.up(log=False, signer_settings={
            "workers": cores,
            # Off means off: no interceptor, wrappers or metrics endpoint.
            "telemetry": {"enabled": True} if telemetry else {"enabled": False,
                                                               "metrics_listen": ""},
            "hsm": {"signing": hsm_signing}, **BENCH_LIMITS})
        signer = dev.signers()[0]
        workers = wait_for_workers(signer, cores)
        with SignetClient.from_cluster(cluster, "admin", timeout=60.0) as client:
            BenchAdmin(client, state_dir).create_key("bench-ecdsa-p256", "ecdsa-p256")
        time.sleep(1.0)
        return probe_phases(Bench(cluster, signer, workers, etcd_pids(dev)), seconds)
    finally:
        dev.down()


def probe(*, telemetry: bool, hsm_signing: str) -> None:
    say(f"probe, telemetry {'on' if telemetry else 'off'}, hsm.signing {hsm_signing}, "
        f"load average {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="signet-bench-"))
    try:
        measure_cluster(tmp / "cluster", telemetry=telemetry, seconds=5.0,
                        hsm_signing=hsm_signing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"load average at the end {os.getloadavg()}")


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ceiling in results["ceilings"].items():
        softhsm = ceiling["softhsm_all_cores"]["signatures_per_second"]
        openssl = ceiling["openssl_one_core"]["signatures_per_second"] or float("nan")
        cores = results["machine"]["nproc"]
        out[name] = {
            "sign_digest_over_softhsm_ceiling": {
                c: round(r["items_per_second"] / softhsm, 3)
                for c, r in results["sign_digest"][name].items()},
            "sign_batch_over_softhsm_ceiling": {
                s: round(r["items_per_second"] / softhsm, 3)
                for s, r in results["sign_batch"][name].items()},
            "softhsm_ceiling_over_openssl_all_cores": round(softhsm / (openssl * cores), 3),
        }
        direct = (ceiling.get("softhsm_all_cores_direct") or {}).get("signatures_per_second")
        if direct:
            out[name]["sign_batch_over_direct_ceiling"] = {
                s: round(r["items_per_second"] / direct, 3)
                for s, r in results["sign_batch"][name].items()}
    return out


def targets_met(results: dict[str, Any]) -> dict[str, Any]:
    p256 = results["ratios"]["ecdsa-p256"]
    best_batch = max(p256["sign_batch_over_softhsm_ceiling"].values())
    digest64 = results["sign_digest"]["ecdsa-p256"]["64"]
    health = results.get("sign_digest_without_request_id", {}).get("health_check_64", {})
    fence_p99 = results["fence"]["fence_ms"]["p99"]
    return {
        "sign_batch_at_least_70pct_of_softhsm_ceiling": {
            "met": best_batch >= 0.70, "measured": best_batch,
            # Context, not the verdict: the same SignBatch 256 against the ceiling measured
            # just before and after it.
            "against_adjacent_ceiling": results.get("sign_batch_adjacent_ceiling", {}).get(
                "sign_batch_256_over_adjacent_ceiling")},
        "sign_digest_4000_per_second_at_64_callers": {
            "met": digest64["items_per_second"] >= 4000,
            "measured": round(digest64["items_per_second"], 1),
            # Context: the CPU one call may cost if 4,000/s are to fit on this machine's
            # cores, against what a signature and a bare health check cost here (server,
            # load generator and etcd together).
            "cpu_ms_per_call_allowed": round((os.cpu_count() or 1) / 4000 * 1000, 3),
            "cpu_ms_per_signature": (digest64.get("cpu_ms_per_item") or {}).get("total"),
            "cpu_ms_per_health_check": (health.get("cpu_ms_per_item") or {}).get("total")},
        "sign_digest_p99_under_20ms_at_64_callers": {
            "met": digest64["latency_ms"]["p99"] < 20,
            "measured": round(digest64["latency_ms"]["p99"], 2)},
        "fence_p99_under_100ms": {"met": fence_p99 < 100, "measured": fence_p99},
        "memory_flat": _memory_target(results),
    }


def _memory_target(results: dict[str, Any]) -> dict[str, Any]:
    """Judged over the soak only: the other phases change the load every few seconds and
    start from idle workers, so their first tenth is not a baseline."""
    soak = results.get("soak")
    if soak is None:
        return {"met": None, "over": None,
                "why": "judged over a soak only: python -m bench.run --soak 300 (make bench)"}
    memory = soak["memory"]
    return {"met": memory["flat"], "over": f"soak of {soak['seconds']:.0f} s",
            "growth_mib": {p: w["growth_mib"] for p, w in memory["workers"].items()}}


def _series(samples: list[tuple[float, int, int]]) -> dict[str, list[list[float]]]:
    series: dict[str, list[list[float]]] = {}
    for t, pid, kib in samples:
        series.setdefault(str(pid), []).append([round(t, 1), round(kib / 1024, 1)])
    return series


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="also run SignDigest for this long and check memory stays flat")
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.* go")
    parser.add_argument("--probe", action="store_true",
                        help="only ECDSA P-256 SignDigest at 64 callers (with and without "
                             "request ids), the health-check floor and SignBatch 256; prints, "
                             "writes nothing (for measuring one change quickly, ~40 s)")
    parser.add_argument("--telemetry", choices=("on", "off"), default="on",
                        help="with --probe: the signer's telemetry.enabled setting")
    parser.add_argument("--hsm-signing", choices=("auto", "inline", "thread"), default="auto",
                        help="with --probe: the signer's hsm.signing setting (docs/adr/0013)")
    args = parser.parse_args(argv)
    if args.probe:
        probe(telemetry=args.telemetry == "on", hsm_signing=args.hsm_signing)
        return
    began = time.monotonic()
    results = run(args.soak, args.quick)
    results["bench_seconds"] = round(time.monotonic() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    from bench.plot import plot

    plot(results, args.out / "latest.png")
    say(f"wrote {args.out / 'latest.json'} and latest.png in {results['bench_seconds']} s")
    for name, target in results["targets_met"].items():
        verdict = {True: "met", False: "MISSED", None: "not judged"}[target["met"]]
        say(f"target {name}: {verdict} ({target})")


if __name__ == "__main__":
    main()
