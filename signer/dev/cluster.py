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
from typing import Any

import yaml

from kms.ceremony import store_initial_custodians
from kms.domain.ceremony import Custodian, CustodianSet
from kms.domain.policy import AccessPolicy
from kms.errors import Conflict
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from signer.cluster import ClusterFile, Identity, Region
from signer.dev.ca import DevCa
from signer.dev.etcd import EtcdCluster, EtcdTls
from signer.dev.processes import SignerProcess, health_status, persistent_endpoint
from signer.dev.softhsm import SoftHsmToken, find_softhsm_module, init_token, write_softhsm_conf
from signer.dev.tuf import bootstrap_root, custodian_key_paths, tuf_endpoint

TRUST_DOMAIN = "spiffe://signet.dev"
ADMIN_URI = f"{TRUST_DOMAIN}/admin"
PIPELINE_URI = f"{TRUST_DOMAIN}/pipeline"
DEFAULT_REGION = "local"
CUSTODIANS = 3  # the same count and threshold as the TUF root (signer/dev/tuf.py)
CUSTODIAN_THRESHOLD = 2
EMERGENCY_THRESHOLD = 1
STATUS_TIMEOUT_SECONDS = 3.0  # `signet dev status`: how long one etcd /health probe may take


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


REGION_NAMES = ("eu-west", "us-east", "ap-south", "sa-east", "af-south")


def region_names(count: int) -> list[str]:
    """Names of ``count`` development regions: ``local`` for one, else ``eu-west``,
    ``us-east``, ``ap-south``… Raises ``ValueError`` outside 1..5."""
    if not 1 <= count <= len(REGION_NAMES):
        raise ValueError(f"a development cluster has 1 to {len(REGION_NAMES)} regions")
    return [DEFAULT_REGION] if count == 1 else list(REGION_NAMES[:count])


def local_first(endpoints: tuple[str, ...], index: int) -> list[str]:
    """etcd endpoints with the region's own member (member ``index``) first: the signer's
    channel prefers it and fails over to the others."""
    if len(endpoints) <= 1:
        return list(endpoints)
    own = index % len(endpoints)
    return [endpoints[own], *endpoints[:own], *endpoints[own + 1:]]


def _secret_file(path: Path) -> str:
    """Read a secret from ``path``, creating it (mode 0600) with a random value if missing."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _with_settings(config: dict[str, Any], settings: Mapping[str, object]) -> dict[str, Any]:
    """``config`` with ``settings`` laid over it, section by section: a section given as a
    mapping adds to or changes the keys of the generated one (``{"hsm": {"signing": …}}`` keeps
    the token and PIN file); any other value replaces it."""
    merged = dict(config)
    for name, value in settings.items():
        base = merged.get(name)
        merged[name] = ({**base, **value} if isinstance(base, dict) and isinstance(value, Mapping)
                        else value)
    return merged


def _dashboard_token(signer_dir: Path) -> Path:
    """The signer's dashboard token file (mode 0600, random, created once)."""
    signer_dir.mkdir(parents=True, exist_ok=True)
    path = signer_dir / "dashboard-token"
    _secret_file(path)
    return path


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
        return SignerProcess(directory, persistent_endpoint(directory, "endpoint"))

    def up(
        self, *, etcd_members: int = 1, signers: int = 1, log: bool = True,
        signer_settings: Mapping[str, object] | None = None, regions: int = 1,
    ) -> ClusterFile:
        """Start (or restart) etcd, the HSM token and the signer; write ``cluster.json``.

        ``regions`` > 1 starts that many regions (``eu-west``, ``us-east``, ``ap-south``…):
        at least one etcd member each, and per region its own SoftHSM token store
        (``hsm-<region>/``) and ``signers`` signer processes that list their region's etcd
        member first (docs/adr/0010-multi-region.md). One region keeps the ``local`` layout.

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
            names = region_names(regions)
            etcd = EtcdCluster.start(etcd_dir, members=max(etcd_members, len(names)),
                                     tls=etcd_tls, detach=True)
            etcd.save()
            say(f"etcd started at {', '.join(etcd.endpoints)}")

        names = region_names(regions)
        tokens = {region: self._region_token(region, say) for region in names}

        policy = default_policy()
        policy_path = self.state_dir / "policy.yaml"
        if not policy_path.exists():
            policy_path.write_text(yaml.safe_dump(policy.to_dict(), sort_keys=False))
        etcd_config = EtcdConfig(
            endpoints=etcd.endpoints, ca_file=ca.cert_path,
            cert_file=certs["etcd-client"][0], key_file=certs["etcd-client"][1],
        )
        self._bootstrap_state(etcd_config, policy, say)

        admin_cert, admin_key = certs["admin"]
        by_region = {region: [self._signer(f"{region}-{i}") for i in range(signers)]
                     for region in names}
        processes = [signer for region in names for signer in by_region[region]]
        for signer in processes:
            region = signer.directory.name.removeprefix("signer-").rsplit("-", 1)[0]
            token, user_pin_path = tokens[region]
            signer.config_path.write_text(yaml.safe_dump(_with_settings({
                "region": region,
                "listen": signer.endpoint,
                "tls": {"cert": str(certs["signer"][0]), "key": str(certs["signer"][1]),
                        "client_ca": str(ca.cert_path)},
                "etcd": {"endpoints": local_first(etcd.endpoints, names.index(region)),
                         "tls": {"ca": str(ca.cert_path), "cert": str(certs["etcd-client"][0]),
                                 "key": str(certs["etcd-client"][1])}},
                "hsm": {"module": token.module_path, "token_label": token.label,
                        "pin_file": str(user_pin_path)},
                # Stands in for the onboarding ceremony in development (kms.replication).
                "multi_region": {"bootstrap_register": True},
                "lease_ttl_seconds": 5,
                # One process per signer unless asked (signer_settings={"workers": N}): tests
                # count signer processes, and a laptop runs several clusters (docs/adr/0008).
                "workers": 1,
                "trust": {"http_listen": tuf_endpoint(signer.directory)},
                # The read-only dashboard on the /tuf/ port, behind a random token
                # (docs/operator-guide.md "Dashboard").
                "dashboard": {"token_file": str(_dashboard_token(signer.directory)),
                              "reports_dir": str(self.state_dir / "drills")},
                "telemetry": {"metrics_listen": persistent_endpoint(signer.directory,
                                                                    "metrics-endpoint")},
            }, signer_settings or {}), sort_keys=False))
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
            home_region=names[0],
            regions={region: Region(region, tuple(s.endpoint for s in by_region[region]))
                     for region in names},
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

    def _region_token(self, region: str, say: Callable[[str], None]
                      ) -> tuple[SoftHsmToken, Path]:
        """The region's own SoftHSM token store and token (``hsm/`` for the single ``local``
        region, ``hsm-<region>/`` otherwise): separate stores, so regions share no HSM."""
        hsm_dir = self.state_dir / ("hsm" if region == DEFAULT_REGION else f"hsm-{region}")
        hsm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = write_softhsm_conf(hsm_dir)
        label = f"signet-{region}"
        user_pin_path = hsm_dir / f"{label}.pin"
        init_token(conf, label, _secret_file(hsm_dir / f"{label}.so-pin"),
                   _secret_file(user_pin_path))
        say(f"SoftHSM token {label!r} ready in {hsm_dir}")
        return SoftHsmToken(conf, find_softhsm_module(), label), user_pin_path

    def _bootstrap_state(self, etcd_config: EtcdConfig, policy: AccessPolicy,
                         say: Callable[[str], None]) -> None:
        """The first access policy and custodian set, each only if none exists."""
        if asyncio.run(_bootstrap_policy(etcd_config, policy)):
            say("applied the default access policy (pipeline signs, admin administers)")
        # The TUF root custodians and the ceremony custodians are the same people, holding
        # the same key files (docs/adr/0009); ceremonies stay required (secure by default).
        if asyncio.run(_bootstrap_custodians(etcd_config, self.state_dir)):
            say(f"custodian set: {CUSTODIANS} custodians in {self.state_dir / 'custodians'}, "
                f"threshold {CUSTODIAN_THRESHOLD}, emergency revocation "
                f"{EMERGENCY_THRESHOLD}")

    def _bootstrap_trust(self, etcd_config: EtcdConfig, first: SignerProcess,
                         say: Callable[[str], None]) -> dict[str, object]:
        """The custodians' part (docs/adr/0007): root v1 lists the online keys the signers
        just registered, so it can only be signed now. Returns the cluster.json entries."""
        root_path = asyncio.run(bootstrap_root(etcd_config, self.state_dir))
        say(f"TUF root v1 signed by custodian keys in {self.state_dir / 'custodians'}; "
            f"trust bundle published ({root_path})")
        return {"tuf_url": f"https://{tuf_endpoint(first.directory)}/tuf/",
                "dashboard_url": f"https://{tuf_endpoint(first.directory)}/dashboard",
                "dashboard_token_file": str(_dashboard_token(first.directory)),
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
                # One probe decides here, not a poll: give a busy member the time etcd's own
                # /health check takes (its read may wait up to a second for a busy raft loop).
                answered = member.healthy(timeout=STATUS_TIMEOUT_SECONDS)
                etcd_members[member.endpoint] = "healthy" if answered else "unhealthy"
        healthy = all(s == "SERVING" for s in signers.values()) and all(
            s == "healthy" for s in etcd_members.values()
        )
        return {"healthy": healthy, "signers": signers, "etcd": etcd_members}


def dev_custodian_set(state_dir: Path) -> CustodianSet:
    """The development custodians: ``custodian-<n>`` with the public halves of
    ``<state>/custodians/custodian-<n>.pem`` (generated if missing)."""
    paths = custodian_key_paths(state_dir, CUSTODIANS)
    return CustodianSet(
        tuple(Custodian(p.stem, Path(f"{p}.pub").read_text()) for p in paths),
        CUSTODIAN_THRESHOLD, EMERGENCY_THRESHOLD)


async def _bootstrap_custodians(config: EtcdConfig, state_dir: Path) -> bool:
    """Store the development custodian set unless one exists. True when stored now."""
    store = EtcdKeyStateStore(config)
    try:
        return await store_initial_custodians(store, store.layout, dev_custodian_set(state_dir))
    finally:
        await store.close()


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
