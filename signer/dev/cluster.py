"""``signet dev up|down|status``: a real local cluster in one state directory.

Layout of the state directory::

    ca/          development CA, server and client certificates (mTLS everywhere)
    etcd/        etcd members (their own data dirs, ports and logs)
    hsm/         SoftHSM config, token store and the token PIN files (mode 0600)
    signer-<region>-<n>/  each signer's config, log and pid file
    policy.yaml  the default access policy applied at bootstrap
    cluster.json endpoints and credentials for clients

Running ``up`` on an existing directory reuses everything in it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from kms.domain.policy import AccessPolicy
from kms.errors import Conflict
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from signer.cluster import ClusterFile, Identity, Region
from signer.dev.ca import DevCa
from signer.dev.etcd import EtcdCluster, EtcdTls
from signer.dev.processes import SignerProcess, health_status, new_endpoint
from signer.dev.softhsm import SoftHsmToken, find_softhsm_module, init_token, write_softhsm_conf
from signer.dev.tuf import bootstrap_root, tuf_endpoint

TRUST_DOMAIN = "spiffe://signet.dev"
ADMIN_URI = f"{TRUST_DOMAIN}/admin"
PIPELINE_URI = f"{TRUST_DOMAIN}/pipeline"
DEFAULT_REGION = "local"


def default_policy() -> AccessPolicy:
    return AccessPolicy.from_dict({
        "version": 1,
        "bindings": [
            {"identity": PIPELINE_URI, "sign": ["*"],
             "statements": {"predicate_types": ["https://slsa.dev/provenance/v1",
                                                "https://in-toto.io/attestation/*"]},
             "description": "the development pipeline may sign with every key, and sign "
                            "SLSA provenance and in-toto attestations"},
            {"identity": ADMIN_URI, "admin": True,
             "description": "the development administrator"},
        ],
    })


def _secret_file(path: Path) -> str:
    """Read a secret from ``path``, creating it (mode 0600) with a random value if missing."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


@dataclass(frozen=True)
class DevCluster:
    state_dir: Path

    @property
    def cluster_path(self) -> Path:
        return self.state_dir / "cluster.json"

    def signers(self) -> list[SignerProcess]:
        """Every signer process this state directory has configured."""
        return [self._signer(d.name.removeprefix("signer-"))
                for d in sorted(self.state_dir.glob("signer-*")) if d.is_dir()]

    def _signer(self, name: str) -> SignerProcess:
        directory = self.state_dir / f"signer-{name}"
        endpoint_file = directory / "endpoint"
        if endpoint_file.exists():
            endpoint = endpoint_file.read_text().strip()
        else:
            directory.mkdir(parents=True, exist_ok=True)
            endpoint = new_endpoint()
            endpoint_file.write_text(endpoint + "\n")
        return SignerProcess(directory, endpoint)

    def up(
        self, *, etcd_members: int = 1, signers: int = 1, log: bool = True,
        signer_settings: Mapping[str, object] | None = None,
    ) -> ClusterFile:
        """Start (or restart) etcd, the HSM token and the signer; write ``cluster.json``.

        Raises ``EtcdLaunchError``, ``SoftHsmSetupError`` or ``SignerLaunchError`` with the
        failing component's log when something does not come up.
        """

        def say(message: str) -> None:
            if log:
                print(f"dev up: {message}", flush=True)

        self.state_dir.mkdir(parents=True, exist_ok=True)
        ca = DevCa.load_or_create(self.state_dir / "ca")
        certs = {}
        for name, kwargs in {
            "signer": {"server_names": ("127.0.0.1", "localhost"), "server": True},
            "etcd-server": {"server_names": ("127.0.0.1", "localhost"), "server": True,
                            "client": True},
            "etcd-client": {"uri": f"{TRUST_DOMAIN}/signer", "client": True},
            "admin": {"uri": ADMIN_URI, "client": True},
            "pipeline": {"uri": PIPELINE_URI, "client": True},
        }.items():
            cert, key = ca.directory / f"{name}.pem", ca.directory / f"{name}-key.pem"
            if not (cert.exists() and key.exists()):
                ca.issue(name, **kwargs)  # type: ignore[arg-type]
            certs[name] = (cert, key)
        say(f"certificates in {ca.directory}")

        etcd_dir = self.state_dir / "etcd"
        etcd_tls = EtcdTls(ca.cert_path, *certs["etcd-server"])
        if (etcd_dir / "cluster.json").exists() and any(
            m.running for m in EtcdCluster.load(etcd_dir).members
        ):
            etcd = EtcdCluster.load(etcd_dir)
            say(f"etcd already running at {', '.join(etcd.endpoints)}")
        else:
            etcd = EtcdCluster.start(etcd_dir, members=etcd_members, tls=etcd_tls, detach=True)
            etcd.save()
            say(f"etcd started at {', '.join(etcd.endpoints)}")

        hsm_dir = self.state_dir / "hsm"
        hsm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = write_softhsm_conf(hsm_dir)
        label = f"signet-{DEFAULT_REGION}"
        user_pin_path = hsm_dir / f"{label}.pin"
        init_token(conf, label, _secret_file(hsm_dir / f"{label}.so-pin"),
                   _secret_file(user_pin_path))
        token = SoftHsmToken(conf, find_softhsm_module(), label)
        say(f"SoftHSM token {label!r} ready in {hsm_dir}")

        policy = default_policy()
        policy_path = self.state_dir / "policy.yaml"
        if not policy_path.exists():
            policy_path.write_text(yaml.safe_dump(policy.to_dict(), sort_keys=False))
        etcd_config = EtcdConfig(
            endpoints=etcd.endpoints, ca_file=ca.cert_path,
            cert_file=certs["etcd-client"][0], key_file=certs["etcd-client"][1],
        )
        if asyncio.run(_bootstrap_policy(etcd_config, policy)):
            say("applied the default access policy (pipeline signs, admin administers)")

        admin_cert, admin_key = certs["admin"]
        processes = [self._signer(f"{DEFAULT_REGION}-{i}") for i in range(signers)]
        for signer in processes:
            signer.config_path.write_text(yaml.safe_dump({
                "region": DEFAULT_REGION,
                "listen": signer.endpoint,
                "tls": {"cert": str(certs["signer"][0]), "key": str(certs["signer"][1]),
                        "client_ca": str(ca.cert_path)},
                "etcd": {"endpoints": list(etcd.endpoints),
                         "tls": {"ca": str(ca.cert_path), "cert": str(certs["etcd-client"][0]),
                                 "key": str(certs["etcd-client"][1])}},
                "hsm": {"module": token.module_path, "token_label": label,
                        "pin_file": str(user_pin_path)},
                "lease_ttl_seconds": 5,
                "trust": {"http_listen": tuf_endpoint(signer.directory)},
                **(signer_settings or {}),
            }, sort_keys=False))
            if signer.running:
                say(f"signer already running at {signer.endpoint}")
            else:
                signer.launch(token.child_env())
                say(f"signer starting at {signer.endpoint} (log: {signer.log_path})")
        for signer in processes:
            signer.wait_healthy(ca=ca.cert_path, cert=admin_cert, key=admin_key)
            say(f"signer at {signer.endpoint} is SERVING")
        trust = self._bootstrap_trust(etcd_config, processes[0], say)

        cluster = ClusterFile(
            path=self.cluster_path,
            home_region=DEFAULT_REGION,
            regions={DEFAULT_REGION: Region(DEFAULT_REGION,
                                            tuple(s.endpoint for s in processes))},
            etcd_endpoints=etcd.endpoints,
            ca=ca.cert_path,
            identities={
                "admin": Identity(ADMIN_URI, admin_cert, admin_key),
                "pipeline": Identity(PIPELINE_URI, *certs["pipeline"]),
                "etcd": Identity(f"{TRUST_DOMAIN}/signer", *certs["etcd-client"]),
            },
            extra=trust,
        )
        cluster.write()
        say(f"wrote {self.cluster_path}")
        return cluster

    def _bootstrap_trust(self, etcd_config: EtcdConfig, first: SignerProcess,
                         say: Callable[[str], None]) -> dict[str, object]:
        """The custodians' part (docs/adr/0007): root v1 lists the online keys the signers
        just registered, so it can only be signed now. Returns the cluster.json entries."""
        root_path = asyncio.run(bootstrap_root(etcd_config, self.state_dir))
        say(f"TUF root v1 signed by custodian keys in {self.state_dir / 'custodians'}; "
            f"trust bundle published ({root_path})")
        return {"tuf_url": f"https://{tuf_endpoint(first.directory)}/tuf/",
                "tuf_root": str(root_path.relative_to(self.state_dir))}

    def down(self) -> list[str]:
        """Stop every process ``up`` started; keep the data. Returns what was stopped."""
        stopped = []
        for signer in self.signers():
            if signer.running:
                signer.stop()
                stopped.append(f"signer {signer.endpoint}")
        etcd_dir = self.state_dir / "etcd"
        if (etcd_dir / "cluster.json").exists():
            etcd = EtcdCluster.load(etcd_dir)
            if any(m.running for m in etcd.members):
                etcd.stop()
                stopped.append(f"etcd {', '.join(etcd.endpoints)}")
        return stopped

    def status(self) -> dict[str, object]:
        """Health of every component, for ``signet dev status``."""
        cluster = ClusterFile.load(self.cluster_path)
        admin = cluster.identity("admin")
        signers = {
            endpoint: health_status(endpoint, ca=cluster.ca, cert=admin.cert, key=admin.key)
            for endpoint in cluster.endpoints()
        }
        etcd_members = {}
        etcd_dir = self.state_dir / "etcd"
        if (etcd_dir / "cluster.json").exists():
            for member in EtcdCluster.load(etcd_dir).members:
                etcd_members[member.endpoint] = "healthy" if member.healthy() else "unhealthy"
        healthy = all(s == "SERVING" for s in signers.values()) and all(
            s == "healthy" for s in etcd_members.values()
        )
        return {"healthy": healthy, "signers": signers, "etcd": etcd_members}


async def _bootstrap_policy(config: EtcdConfig, policy: AccessPolicy) -> bool:
    """Store the policy unless one exists. True when it was stored now."""
    store = EtcdKeyStateStore(config)
    try:
        await store.put_policy(policy, None)
    except Conflict:
        return False
    finally:
        await store.close()
    return True
