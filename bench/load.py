"""The load generator: ``python -m bench.load SPEC_JSON`` prints one JSON result line.

It runs in its own process (one asyncio loop, grpc.aio), so its CPU is measured apart from the
signer's: it reports its own CPU seconds (``resource.getrusage``) and the signer workers' (from
``/proc/<pid>/stat``) over the measured window only, after a warm-up.

``callers`` coroutines each keep one call in flight. They share ``channels`` channels, each its
own HTTP/2 connection (a local subchannel pool), so the kernel's SO_REUSEPORT hashing spreads
them across the signer's workers; one connection always lands on one worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer._pb.signet.v1 import (
    common_pb2,
    signing_pb2,
    signing_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadSpec:
    endpoint: str
    ca: str
    cert: str
    key: str
    mode: str  # "digest", "batch", "trust" or "health" (the gRPC floor: a trivial call)
    key_name: str = ""
    callers: int = 1
    channels: int = 1
    batch_size: int = 1
    seconds: float = 5.0
    warmup: float = 1.0
    server_pids: tuple[int, ...] = ()
    etcd_pids: tuple[int, ...] = ()  # the etcd members share the same cores: reported too
    # Like the client library, send a fresh request id with every call (the signer then
    # records it in its etcd request ledger, kms/requests.py); False sends none.
    request_ids: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadSpec:
        return cls(**{**data, "server_pids": tuple(data.get("server_pids", ())),
                      "etcd_pids": tuple(data.get("etcd_pids", ()))})

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "server_pids": list(self.server_pids),
                "etcd_pids": list(self.etcd_pids)}


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is fields[0]; utime and stime are stat fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


async def run(spec: LoadSpec, credentials: grpc.ChannelCredentials) -> dict[str, Any]:
    channels = [
        grpc.aio.secure_channel(spec.endpoint, credentials,
                                options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, spec.channels))
    ]
    await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 10) for ch in channels))
    digests = [os.urandom(32) for _ in range(4096)]
    latencies: list[float] = []
    items = 0
    errors: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    start_at = loop.time() + spec.warmup
    end_at = start_at + spec.seconds
    window: dict[str, float] = {}

    async def measure_window() -> None:
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        window["own0"], window["wall0"] = _own_cpu_seconds(), time.perf_counter()
        window["server0"] = sum(process_cpu_seconds(p) for p in spec.server_pids)
        window["etcd0"] = sum(process_cpu_seconds(p) for p in spec.etcd_pids)
        await asyncio.sleep(max(0.0, end_at - loop.time()))
        window["own1"], window["wall1"] = _own_cpu_seconds(), time.perf_counter()
        window["server1"] = sum(process_cpu_seconds(p) for p in spec.server_pids)
        window["etcd1"] = sum(process_cpu_seconds(p) for p in spec.etcd_pids)

    async def caller(number: int) -> None:
        nonlocal items
        call = _call_maker(spec, channels[number % len(channels)], digests, errors, number)
        n = 0
        while (now := loop.time()) < end_at:
            n += 1
            sent = time.perf_counter()
            try:
                count = await call(n)
            except grpc.aio.AioRpcError as error:
                if now >= start_at:
                    errors[error.code().name] += 1
                continue
            # Counted when it completes inside the window (throughput), whenever it started.
            if start_at <= loop.time() <= end_at:
                latencies.append(time.perf_counter() - sent)
                items += count

    await asyncio.gather(measure_window(), *(caller(i) for i in range(spec.callers)))
    await asyncio.gather(*(ch.close() for ch in channels))
    wall = window["wall1"] - window["wall0"]
    latencies.sort()
    return {
        "mode": spec.mode, "callers": spec.callers, "channels": len(channels),
        "batch_size": spec.batch_size, "seconds": round(wall, 3),
        "calls": len(latencies), "items": items,
        "items_per_second": items / wall,
        "calls_per_second": len(latencies) / wall,
        "latency_ms": {
            "p50": _percentile(latencies, 0.50) * 1000,
            "p90": _percentile(latencies, 0.90) * 1000,
            "p99": _percentile(latencies, 0.99) * 1000,
            "max": (latencies[-1] if latencies else float("nan")) * 1000,
        },
        "errors": dict(errors),
        "load_generator_cpu_seconds": window["own1"] - window["own0"],
        "load_generator_cores": (window["own1"] - window["own0"]) / wall,
        "server_cpu_seconds": window["server1"] - window["server0"],
        "server_cores": (window["server1"] - window["server0"]) / wall,
        "etcd_cpu_seconds": window["etcd1"] - window["etcd0"],
        "etcd_cores": (window["etcd1"] - window["etcd0"]) / wall,
        "cpu_ms_per_item": _cpu_per_item(window, items),
    }


def _cpu_per_item(window: dict[str, float], items: int) -> dict[str, float] | None:
    """Where one item's CPU went: the signer's workers, the load generator and etcd, which
    all share the machine's cores (None when nothing completed)."""
    if not items:
        return None
    parts = {"server": window["server1"] - window["server0"],
             "load_generator": window["own1"] - window["own0"],
             "etcd": window["etcd1"] - window["etcd0"]}
    per_item = {name: round(seconds / items * 1000, 3) for name, seconds in parts.items()}
    per_item["total"] = round(sum(parts.values()) / items * 1000, 3)
    return per_item


def _call_maker(spec: LoadSpec, channel: grpc.aio.Channel, digests: list[bytes],
                errors: Counter[str], number: int) -> Callable[[int], Awaitable[int]]:
    """One call of ``spec.mode``; the returned coroutine function gives the items done."""
    signing = signing_pb2_grpc.SigningStub(channel)
    trust = trust_pb2_grpc.TrustStub(channel)
    health = health_pb2_grpc.HealthStub(channel)

    def digest(n: int) -> common_pb2.Digest:
        return common_pb2.Digest(algorithm=common_pb2.SHA256, value=digests[n % len(digests)])

    run = os.urandom(6).hex()  # request ids never repeat across runs

    def request_id(n: int) -> str:
        return f"bench-{run}-{number}-{n}" if spec.request_ids else ""

    # Each id is generated here and sent once, as the client library's first attempt does.
    async def sign_digest(n: int) -> int:
        await signing.SignDigest(signing_pb2.SignDigestRequest(
            key=spec.key_name, request_id=request_id(n), new_request_id=spec.request_ids,
            digest=digest(n)), timeout=10)
        return 1

    # This caller's batch of digests, built once: each call copies it (6 µs for 256 digests,
    # against 180 µs to build 256 Digest messages again) and sets its own request id.
    batch = signing_pb2.SignBatchRequest(
        key=spec.key_name, new_request_id=spec.request_ids,
        digests=[digest(number * spec.batch_size + i) for i in range(spec.batch_size)])

    async def sign_batch(n: int) -> int:
        request = signing_pb2.SignBatchRequest()
        request.CopyFrom(batch)
        request.request_id = request_id(n)
        response = await signing.SignBatch(request, timeout=60)
        count = sum(1 for r in response.results if r.HasField("signature"))
        if count != spec.batch_size:
            errors["batch item error"] += spec.batch_size - count
        return count

    async def get_trust_bundle(_n: int) -> int:
        await trust.GetTrustBundle(trust_pb2.GetTrustBundleRequest(nonce=os.urandom(32)),
                                   timeout=10)
        return 1

    async def check_health(_n: int) -> int:
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        return 1

    calls = {"digest": sign_digest, "batch": sign_batch, "trust": get_trust_bundle,
             "health": check_health}
    return calls[spec.mode]


def main() -> None:
    spec = LoadSpec.from_dict(json.loads(sys.argv[1]))
    credentials = grpc.ssl_channel_credentials(
        Path(spec.ca).read_bytes(), Path(spec.key).read_bytes(), Path(spec.cert).read_bytes())
    print(json.dumps(asyncio.run(run(spec, credentials))), flush=True)


if __name__ == "__main__":
    main()
