"""The ceilings the service is compared with: SoftHSM through python-pkcs11 with no service
around it (one process per core, each on its own session, signing in a tight loop), and raw
``openssl speed``."""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import subprocess
import time
from typing import Any

# DER namedCurve OIDs, as in kms.hsm.pkcs11.
_P256 = bytes.fromhex("06082a8648ce3d030107")
_ED25519 = bytes.fromhex("06032b6570")

OPENSSL_ALGORITHMS = {"ecdsa-p256": "ecdsap256", "ed25519": "ed25519",
                      "rsa-pss-3072": "rsa3072"}


def _sign_loop(job: dict[str, Any], out: Any) -> None:
    """One process: its own login and session, a session key of ``job["algorithm"]``, then
    sign one 32-byte digest over and over from ``job["start_at"]`` for ``job["seconds"]``."""
    conf, module, label, pin = job["conf"], job["module"], job["label"], job["pin"]
    algorithm, start_at, seconds = job["algorithm"], job["start_at"], job["seconds"]
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import MGF, Attribute, KeyType, Mechanism

    lib = pkcs11.lib(module)
    for attempt in range(10):  # several processes opening one token at once: retry
        try:
            token = lib.get_token(token_label=label)
            session = token.open(user_pin=pin, rw=True)
            break
        except pkcs11.exceptions.PKCS11Error:
            if attempt == 9:
                raise
            time.sleep(0.1 * (attempt + 1))
    with session:
        mechanism_param: Any = None
        if algorithm == "ecdsa-p256":
            _, private = session.generate_keypair(
                KeyType.EC, store=False, mechanism=Mechanism.EC_KEY_PAIR_GEN,
                public_template={Attribute.EC_PARAMS: _P256})
            mechanism, per_check = Mechanism.ECDSA, 50
        elif algorithm == "ed25519":
            _, private = session.generate_keypair(
                KeyType.EC_EDWARDS, store=False, mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={Attribute.EC_PARAMS: _ED25519})
            mechanism, per_check = Mechanism.EDDSA, 50
        else:
            _, private = session.generate_keypair(KeyType.RSA, 3072, store=False)
            mechanism, per_check = Mechanism.RSA_PKCS_PSS, 2
            mechanism_param = (Mechanism.SHA256, MGF.SHA256, 32)
        key: Any = private  # python-pkcs11's SignMixin; its stubs do not say so
        digest = os.urandom(32)
        if job.get("direct") and algorithm != "rsa-pss-3072":
            # One C_SignInit + C_Sign per signature, as the signer does (kms/hsm/direct.py).
            from kms.hsm.direct import CKM_ECDSA, CKM_EDDSA, DirectSigner

            signer = DirectSigner(module)
            mech = CKM_ECDSA if algorithm == "ecdsa-p256" else CKM_EDDSA
            opened: Any = session  # python-pkcs11's stubs lack the handles
            session_handle, key_handle = opened.handle, key.handle

            def sign_once() -> None:
                signer.sign(session_handle, key_handle, mech, digest)
        else:
            def sign_once() -> None:
                key.sign(digest, mechanism=mechanism, mechanism_param=mechanism_param)
        while time.time() < start_at:
            time.sleep(0.005)
        count = 0
        cpu0 = time.process_time()
        began = time.perf_counter()
        end = start_at + seconds
        while time.time() < end:
            for _ in range(per_check):
                sign_once()
            count += per_check
        out.put((count, time.perf_counter() - began, time.process_time() - cpu0))


def softhsm_ceiling(*, conf: str, module: str, label: str, pin: str, algorithm: str,
                    processes: int, seconds: float, direct: bool = False) -> dict[str, Any]:
    """Signatures per second of ``processes`` processes signing at once (all cores), through
    python-pkcs11 or, with ``direct``, one ctypes C_Sign per signature (kms/hsm/direct.py)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 2.0 + (2.0 if algorithm == "rsa-pss-3072" else 0.0)
    workers = [
        context.Process(target=_sign_loop, args=({
            "conf": conf, "module": module, "label": label, "pin": pin,
            "algorithm": algorithm, "start_at": start_at, "seconds": seconds,
            "direct": direct}, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes: list[tuple[int, float, float]] = []
    deadline = time.monotonic() + seconds + 60
    while len(outcomes) < processes:
        try:
            outcomes.append(results.get(timeout=0.5))
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for worker in workers:
                    worker.kill()
                raise RuntimeError(f"SoftHSM ceiling processes failed: "
                                   f"{[w.exitcode for w in workers]}") from None
    for worker in workers:
        worker.join()
    per_process = [count / elapsed for count, elapsed, _ in outcomes]
    return {
        "algorithm": algorithm, "processes": processes, "seconds": seconds,
        "binding": "ctypes C_Sign (kms/hsm/direct.py)" if direct else "python-pkcs11",
        "signatures_per_second": sum(per_process),
        "per_process": [round(x, 1) for x in per_process],
        "cpu_seconds": sum(cpu for _, _, cpu in outcomes),
    }


def openssl_speed(algorithm: str, seconds: int = 3) -> dict[str, Any]:
    """``openssl speed -seconds N <alg>`` on one core: signatures per second."""
    name = OPENSSL_ALGORITHMS[algorithm]
    run = subprocess.run(["openssl", "speed", "-seconds", str(seconds), name],
                         capture_output=True, text=True, check=True, timeout=120)
    sign_per_second = None
    for line in run.stdout.splitlines():
        numbers = re.findall(r"\d+\.\d+", line)
        if len(numbers) >= 4 and re.search(r"ecdsa|EdDSA|rsa", line, re.IGNORECASE):
            sign_per_second = float(numbers[-2])
    return {"algorithm": algorithm, "openssl_name": name, "cores": 1,
            "signatures_per_second": sign_per_second,
            "output": run.stdout.strip().splitlines()[-2:]}
