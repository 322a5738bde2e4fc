"""``make demo``: the first user journey, end to end, on a real local three-region cluster.

Start a development cluster with three regions (``signet dev up --regions 3``: an etcd member,
a SoftHSM token and a signer per region), create a multi-region HSM key by custodian ceremony
(propose, show, two approvals with the dev custodians' key files; the key is generated in the
home region's HSM and replicated HSM to HSM), sign an image digest as the pipeline identity in
two other regions and verify both signatures with ``openssl pkeyutl`` against the one public
key Signet publishes, and with ``signet verify`` against the TUF-verified trust bundle; then
the pipeline journey (:func:`pipeline_journey`): push a small image to a local OCI registry,
create its SLSA provenance, sign image and provenance into the registry at cosign's tags,
verify both against a verification policy, and decide admission for two pods; end with a short
failover drill (one region killed under load; RPO 0, RTO measured) and stop the cluster.
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

# The home region signs the ceremony's key into being; the demo signs in the other two and
# kills the last one in the drill (signer/dev/cluster.py names the regions).
SIGN_REGIONS = ("us-east", "ap-south")
DRILL_REGION = "ap-south"


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


def sign_in_region(signet: list[str], env: dict[str, str], key: str, digest: str,
                   region: str) -> dict[str, str]:
    """Sign with ``--region``; the key reaches the other regions' HSMs a fraction of a second
    after the ceremony, and meanwhile the client fails over to a region that holds it, so
    sign again (a new request) until the answer comes from ``region`` (at most ~10 s)."""
    deadline = time.monotonic() + 10
    while True:
        signed: dict[str, str] = json.loads(run(
            [*signet, "sign", "--key", key, "--digest", f"sha256:{digest}", "--region", region,
             "-o", "json"], env))
        if signed["region"] == region or time.monotonic() > deadline:
            return signed
        print(f"(answered by {signed['region']}: not replicated to {region} yet; again)")
        time.sleep(0.5)


def main() -> int:
    state_dir = Path(
        os.environ.get("SIGNET_DEMO_STATE_DIR") or tempfile.mkdtemp(prefix="signet-demo-")
    )
    signet = [sys.executable, "-m", "signer.cli.main"]
    env = dict(os.environ, SIGNET_CLUSTER=str(state_dir / "cluster.json"))
    key = f"demo-{int(time.time())}"
    print(f"Signet demo — state in {state_dir}")
    try:
        run([*signet, "dev", "up", "--regions", "3", "--state-dir", str(state_dir)], env,
            capture=False)
        # Keys are created by a custodian ceremony: the administrator proposes, two of the
        # three custodians (key files in <state>/custodians/) check and approve it.
        proposal = json.loads(run([*signet, "ceremony", "propose", "create-key", key,
                                   "--algorithm", "ecdsa-p256", "--replication", "multi-region",
                                   "-o", "json"], env))
        run([*signet, "ceremony", "show", proposal["id"]], env)
        for custodian in ("custodian-1", "custodian-2"):
            run([*signet, "ceremony", "approve", proposal["id"], "--key",
                 str(state_dir / "custodians" / f"{custodian}.pem")], env)
        # A build pipeline signs the manifest digest of the image it just pushed, in two
        # regions other than the one whose HSM generated the key.
        manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
        digest = hashlib.sha256(manifest).hexdigest()
        pem = run([*signet, "public-key", key], env)
        work = state_dir / "demo"
        work.mkdir(exist_ok=True)
        (work / "public.pem").write_text(pem)
        (work / "digest.bin").write_bytes(bytes.fromhex(digest))
        signed: dict[str, str] = {}
        for region in SIGN_REGIONS:
            signed = sign_in_region(signet, env, key, digest, region)
            der = work / f"signature-{signed['region']}.der"
            der.write_bytes(base64.b64decode(signed["signature"]))
            # One public key for every region: the replicas are the same key pair.
            run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(work / "public.pem"),
                 "-in", str(work / "digest.bin"), "-sigfile", str(der)], env)
        # A verifier fetches the trust bundle (TUF chain from the pinned root, nonce-bound
        # freshness) and checks the signature against it, with no access to the key store.
        run([*signet, "bundle", "fetch"], env)
        run([*signet, "verify", "--digest", f"sha256:{digest}", "--signature",
             str(work / f"signature-{signed['region']}.der"), "--key", key], env)
        print(
            f"\nverified: signature by key {signed['key']} version {signed['key_version']} "
            f"(key id {signed['key_id'][:16]}…) over sha256:{digest[:16]}…, made in regions "
            f"{' and '.join(SIGN_REGIONS)}, checks out with openssl against the one public key "
            "Signet published, and against the verified trust bundle."
        )
        pipeline_journey(signet, env, state_dir, key)
        # An operator proves failover: region ap-south is killed under signing load and
        # restarted; every acknowledged signature must be audited once and verify (RPO 0).
        run([*signet, "drill", "failover", "--region", DRILL_REGION, "--mode", "kill",
             "--load", "4", "--duration", "8", "--key", key,
             "--report", str(state_dir / "drills" / "demo")], env)
    finally:
        run([*signet, "dev", "down", "--state-dir", str(state_dir)], env, capture=False)
    return 0


def pipeline_journey(signet: list[str], env: dict[str, str], state_dir: Path, key: str) -> None:
    """Provenance, image signature and admission against a local OCI registry
    (``docker-registry`` on a loopback port, stopped at the end)."""
    from kms.domain.provenance import VerificationPolicy
    from signer.admission import AdmissionController
    from signer.client import SignetClient
    from signer.cluster import ClusterFile
    from signer.dev.registry import LocalRegistry, minimal_image, push_image
    from signer.registry import CosignRegistry
    from signer.verification import ClusterKeyResolver

    work = state_dir / "pipeline"
    work.mkdir(exist_ok=True)
    registry = LocalRegistry.start(work / "registry")
    try:
        print(f"\n# a local OCI registry at {registry.address}; the pipeline pushes its image")
        image = f"{registry.address}/demo/app@" + push_image(
            registry.address, "demo/app", "v1", minimal_image({"app/server": b"demo build\n"}))
        unsigned = f"{registry.address}/demo/app@" + push_image(
            registry.address, "demo/app", "unsigned", minimal_image({"app/server": b"??\n"}))
        print(f"pushed {image}")
        (work / "requirements.txt").write_text("click==8.1.7\npyyaml==6.0.2\n")
        run([*signet, "provenance", "create", "--subject", image,
             "--builder-id", "https://ci.example.com/builders/demo",
             "--source-repo", "https://git.example.com/acme/app", "--commit", "5e" * 20,
             "--ref", "refs/heads/main", "--lock-file", str(work / "requirements.txt"),
             "--out", str(work / "provenance.json")], env)
        run([*signet, "sign-image", image, "--key", key, "--attach"], env)
        run([*signet, "sign-statement", str(work / "provenance.json"), "--key", key,
             "--attach", "--out", str(work / "provenance.dsse.json")], env)
        policy = {"version": 1, "trusted_keys": [key],
                  "builder_ids": ["https://ci.example.com/builders/*"],
                  "source_repositories": ["https://git.example.com/acme/*"],
                  "subject_registries": [registry.address], "max_age_seconds": 3600}
        (work / "policy.json").write_text(json.dumps(policy, indent=2))
        # A verifier reads signature and provenance from the registry and checks both.
        run([*signet, "verify-image", image, "--policy", str(work / "policy.json")], env)
        run([*signet, "verify-attestation", str(work / "provenance.dsse.json"),
             "--policy", str(work / "policy.json"), "--image", image], env)
        # The admission webhook's decision (the same controller `signet admission serve`
        # runs behind HTTPS) for a pod with the signed image and one with an unsigned image.
        with SignetClient.from_cluster(ClusterFile.load(Path(env["SIGNET_CLUSTER"])),
                                       "pipeline") as client:
            controller = AdmissionController(
                CosignRegistry(), ClusterKeyResolver(client, [key]),
                VerificationPolicy.from_dict(policy), time.time)
            for name, pod_image in (("signed-pod", image), ("unsigned-pod", unsigned)):
                review = json.dumps({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "request": {"uid": name, "operation": "CREATE", "kind": {"kind": "Pod"},
                                "object": {"spec": {"containers": [
                                    {"name": "app", "image": pod_image}]}}}}).encode()
                answer = controller.review(review)["response"]
                verdict = "ALLOWED" if answer["allowed"] else "DENIED"
                print(f"\nadmission {name}: {verdict}: {answer['status']['message']}")
                if answer["allowed"] != (pod_image == image):
                    raise SystemExit(f"demo: admission answered {verdict} for {name}")
    finally:
        registry.stop()


if __name__ == "__main__":
    sys.exit(main())
