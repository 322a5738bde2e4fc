"""``make demo``: the first user journey, end to end, on a real local cluster.

Start a dev cluster, create an HSM key, sign an image digest as the pipeline identity, verify
the signature with ``openssl pkeyutl`` against the public key Signet publishes and with
``signet verify`` against the TUF-verified trust bundle, stop the cluster.
Every step runs the real ``signet`` CLI and prints the command first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str], env: dict[str, str], *, capture: bool = True) -> str:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {shown}", flush=True)
    result = subprocess.run(args, env=env, text=True, capture_output=capture, check=False)
    if capture:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"demo: step failed with exit code {result.returncode}: {shown}")
    return result.stdout if capture else ""


def main() -> int:
    state_dir = Path(
        os.environ.get("SIGNET_DEMO_STATE_DIR") or tempfile.mkdtemp(prefix="signet-demo-")
    )
    signet = [sys.executable, "-m", "signer.cli.main"]
    env = dict(os.environ, SIGNET_CLUSTER=str(state_dir / "cluster.json"))
    key = f"demo-{int(time.time())}"
    print(f"Signet demo — state in {state_dir}")
    try:
        run([*signet, "dev", "up", "--state-dir", str(state_dir)], env, capture=False)
        run([*signet, "key", "create", key, "--algorithm", "ecdsa-p256"], env)
        # A build pipeline signs the manifest digest of the image it just pushed.
        manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
        digest = hashlib.sha256(manifest).hexdigest()
        signed = json.loads(
            run([*signet, "sign", "--key", key, "--digest", f"sha256:{digest}", "-o", "json"], env)
        )
        pem = run([*signet, "public-key", key], env)
        work = state_dir / "demo"
        work.mkdir(exist_ok=True)
        (work / "public.pem").write_text(pem)
        (work / "digest.bin").write_bytes(bytes.fromhex(digest))
        (work / "signature.der").write_bytes(base64.b64decode(signed["signature"]))
        run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(work / "public.pem"),
             "-in", str(work / "digest.bin"), "-sigfile", str(work / "signature.der")], env)
        # A verifier fetches the trust bundle (TUF chain from the pinned root, nonce-bound
        # freshness) and checks the signature against it, with no access to the key store.
        run([*signet, "bundle", "fetch"], env)
        run([*signet, "verify", "--digest", f"sha256:{digest}", "--signature",
             str(work / "signature.der"), "--key", key], env)
        print(
            f"\nverified: signature by key {signed['key']} version {signed['key_version']} "
            f"(key id {signed['key_id'][:16]}…) over sha256:{digest[:16]}… checks out with "
            "openssl against the public key Signet published, and against the verified trust "
            "bundle."
        )
    finally:
        run([*signet, "dev", "down", "--state-dir", str(state_dir)], env, capture=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
