"""``latest.png``: throughput against the ceilings, latency, memory per worker, fence times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # (after choosing the backend)


def plot(results: dict[str, Any], path: Path) -> None:
    figure, ((rates, latency), (memory, fence)) = plt.subplots(2, 2, figsize=(13, 9))
    machine = results["machine"]
    figure.suptitle(f"Signet bench (issue 8): ECDSA P-256, {machine['nproc']} cores "
                    f"({machine['model_name']}), {results['started']}", fontsize=11)

    ceiling = results["ceilings"]["ecdsa-p256"]
    openssl = ceiling["openssl_one_core"]["signatures_per_second"] or 0.0
    bars = {
        f"openssl\nx {machine['nproc']} cores": openssl * machine["nproc"],
        "SoftHSM\nceiling": ceiling["softhsm_all_cores"]["signatures_per_second"],
    }
    for size, run in results["sign_batch"]["ecdsa-p256"].items():
        bars[f"SignBatch\n{size}"] = run["items_per_second"]
    for callers, run in results["sign_digest"]["ecdsa-p256"].items():
        bars[f"SignDigest\n{callers} callers"] = run["items_per_second"]
    colours = ["#999999", "#555555"] + ["#1f77b4"] * len(results["sign_batch"]["ecdsa-p256"]) \
        + ["#ff7f0e"] * len(results["sign_digest"]["ecdsa-p256"])
    off = results.get("telemetry_off")
    if off:  # the same reference points with telemetry.enabled: false
        bars["SignBatch 256\ntelemetry off"] = off["sign_batch_256"]["items_per_second"]
        bars["SignDigest 64\ntelemetry off"] = off["sign_digest_64"]["items_per_second"]
        colours += ["#aec7e8", "#ffbb78"]
    rates.bar(list(bars), list(bars.values()), color=colours)
    rates.axhline(0.7 * ceiling["softhsm_all_cores"]["signatures_per_second"], color="#1f77b4",
                  linestyle="--", linewidth=1, label="70% of SoftHSM ceiling")
    rates.axhline(4000, color="#ff7f0e", linestyle=":", linewidth=1, label="4,000/s target")
    rates.set_yscale("log")
    rates.set_ylabel("signatures per second (log)")
    rates.set_title("throughput")
    rates.tick_params(axis="x", labelsize=7)
    rates.legend(fontsize=8)

    digest = results["sign_digest"]["ecdsa-p256"]
    callers = [int(c) for c in digest]
    latency.plot(callers, [digest[str(c)]["latency_ms"]["p50"] for c in callers], "o-",
                 label="p50")
    latency.plot(callers, [digest[str(c)]["latency_ms"]["p99"] for c in callers], "s-",
                 label="p99")
    latency.axhline(20, color="red", linestyle=":", linewidth=1, label="p99 target (20 ms)")
    latency.set_xscale("log", base=2)
    latency.set_xlabel("concurrent callers")
    latency.set_ylabel("ms")
    latency.set_title("SignDigest latency")
    latency.legend(fontsize=8)

    soak = results.get("soak", {})
    for pid, series in (soak.get("memory_series") or results["memory"]["series"]).items():
        memory.plot([t for t, _ in series], [mib for _, mib in series], label=f"worker {pid}")
    memory.set_xlabel("seconds")
    memory.set_ylabel("RSS MiB")
    memory.set_title(f"memory per worker, run with a {soak['seconds']:.0f} s soak" if soak
                     else "memory per worker")
    memory.legend(fontsize=8)

    fence_ms = results["fence"]["fence_ms_all"]
    fence.plot(range(1, len(fence_ms) + 1), fence_ms, "o")
    fence.axhline(100, color="red", linestyle=":", linewidth=1, label="p99 target (100 ms)")
    fence.set_xlabel("revocation")
    fence.set_ylabel("fence ms")
    fence.set_title(f"revocation fence, {results['fence']['signer_processes']} signer processes")
    fence.legend(fontsize=8)

    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
