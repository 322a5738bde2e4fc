"""Write the development secrets the compose stack mounts: a dev CA with signer, admin and
pipeline certificates, per-region SoftHSM PIN files, and a cluster.json for clients on the host.

    .venv/bin/python deploy/make-dev-secrets.py            # writes deploy/secrets/

For development only: the CA key sits next to the certificates. The files are owned by the
signer image's user (uid 10001) when this runs as root; otherwise chown them yourself, or the
containers cannot read them. Existing files are kept, so re-running is safe.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

from signer.dev.ca import DevCa

REGIONS = {"eu-west": 7443, "us-east": 7444, "ap-south": 7445}
TRUST_DOMAIN = "spiffe://signet.dev"
IMAGE_UID = 10001


def secret_file(path: Path) -> None:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write deploy/secrets for compose.yaml.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "secrets")
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = DevCa.load_or_create(out)
    for region in REGIONS:
        if not (out / f"signer-{region}.pem").exists():
            # serverAuth for callers, clientAuth for the container's own health probe.
            names = (f"signer-{region}", f"signer-{region}.signet-system.svc", "localhost",
                     "127.0.0.1")
            ca.issue(f"signer-{region}", server_names=names,
                     uri=f"{TRUST_DOMAIN}/signer/{region}", server=True, client=True)
        secret_file(out / f"{region}.pin")
        secret_file(out / f"{region}.so-pin")
    for name in ("admin", "pipeline"):
        if not (out / f"{name}.pem").exists():
            ca.issue(name, uri=f"{TRUST_DOMAIN}/{name}", client=True)
    cluster = {
        "version": 1,
        "home_region": "eu-west",
        "regions": {r: {"grpc_endpoints": [f"localhost:{port}"]} for r, port in REGIONS.items()},
        "etcd_endpoints": ["localhost:2379"],
        "ca": "ca.pem",
        "identities": {
            name: {"uri": f"{TRUST_DOMAIN}/{name}", "cert": f"{name}.pem",
                   "key": f"{name}-key.pem"}
            for name in ("admin", "pipeline")
        },
        "insecure": False,
    }
    (out / "cluster.json").write_text(json.dumps(cluster, indent=2) + "\n")
    if os.geteuid() == 0:
        for path in out.iterdir():
            os.chown(path, IMAGE_UID, IMAGE_UID)
    else:
        print(f"run: sudo chown -R {IMAGE_UID}:{IMAGE_UID} {out}  (the containers run as uid "
              f"{IMAGE_UID})")
    print(f"wrote {out}; clients use --cluster {out / 'cluster.json'}")


if __name__ == "__main__":
    main()
