"""``signet init`` against a real etcd: it stores the custodian set and the first access
policy only where none exists (a second run exits 6 and changes nothing), and a signer started
on that etcd accepts ceremonies from exactly those custodians. The etcd, CA and HSM token come
from a dev cluster; ``signet init`` and the second signer use a fresh etcd prefix of their
own, as a new cluster would. docs/adr/0009-custodian-ceremonies.md."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from kms.domain.ceremony import CustodianSet
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.tuf.signing import generate_custodian_key
from signer.ceremony_client import CeremonyClient
from signer.client import SignetClient
from signer.dev.cluster import DevCluster, default_policy
from signer.dev.processes import SignerProcess, new_endpoint
from signer.errors import SignetError

pytestmark = pytest.mark.e2e

PREFIX = "/init-test/v1"


def signet_init(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signer.cli.main", "init", "--config",
                           str(config), *args],
                          capture_output=True, text=True, check=False, timeout=120)


def read_records(config: dict[str, object]) -> dict[str, tuple[bytes, int]]:
    etcd = config["etcd"]
    assert isinstance(etcd, dict)
    tls = etcd["tls"]

    async def read() -> dict[str, tuple[bytes, int]]:
        store = EtcdKeyStateStore(EtcdConfig(endpoints=tuple(etcd["endpoints"]), prefix=PREFIX,
                                             ca_file=Path(tls["ca"]),
                                             cert_file=Path(tls["cert"]),
                                             key_file=Path(tls["key"])))
        try:
            found = await store.read_records(prefixes=[f"{PREFIX}/"])
            return dict(found.records)
        finally:
            await store.close()

    return asyncio.run(read())


def test_init_bootstraps_once_and_a_signer_then_runs_its_ceremonies(tmp_path: Path) -> None:
    dev = DevCluster(tmp_path / "cluster")
    signer: SignerProcess | None = None
    try:
        cluster = dev.up(log=False)
        config = yaml.safe_load(dev.signers()[0].config_path.read_text())
        config["etcd"]["prefix"] = PREFIX
        config["listen"] = new_endpoint()
        config["trust"] = {"http_listen": new_endpoint()}
        config["telemetry"] = {"metrics_listen": new_endpoint()}
        config.pop("dashboard", None)
        signer = SignerProcess(tmp_path / "init-signer", config["listen"])
        signer.directory.mkdir()
        signer.config_path.write_text(yaml.safe_dump(config))

        keys = {name: tmp_path / f"{name}.pem" for name in ("alice", "bob", "carol")}
        for path in keys.values():
            generate_custodian_key(path, "ecdsa-p256")
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(default_policy().to_dict()))
        custodians = [arg for name, path in keys.items()
                      for arg in ("--custodian", f"{name}={path}.pub")]

        first = signet_init(signer.config_path, *custodians, "--threshold", "2",
                            "--emergency-threshold", "1", "--policy", str(policy))
        assert first.returncode == 0, first.stderr
        assert first.stdout.count(": stored") == 2, first.stdout
        stored = read_records(config)
        custodian_path = f"{PREFIX}/custodians"
        assert custodian_path in stored
        custodian_set = CustodianSet.from_dict(yaml.safe_load(stored[custodian_path][0]))
        assert [c.name for c in custodian_set.custodians] == ["alice", "bob", "carol"]
        assert (custodian_set.threshold, custodian_set.emergency_threshold) == (2, 1)

        # A second run (even with other custodians) changes nothing and exits 6.
        again = signet_init(signer.config_path, "--custodian", f"mallory={keys['alice']}.pub",
                            "--threshold", "1", "--policy", str(policy))
        assert again.returncode == 6, again.stderr
        assert again.stdout.count("exists already") == 2
        assert read_records(config) == stored

        # A signer on that etcd prefix runs ceremonies for those custodians.
        signer.launch(dict(os.environ,
                           SOFTHSM2_CONF=str(dev.state_dir / "hsm" / "softhsm2.conf")))
        admin = cluster.identity("admin")
        signer.wait_healthy(ca=cluster.ca, cert=admin.cert, key=admin.key)
        client = SignetClient([signer.endpoint], ca=cluster.ca, cert=admin.cert, key=admin.key,
                              timeout=30.0)
        with CeremonyClient(client) as ceremonies:
            current, _ = ceremonies.custodians()
            assert current == custodian_set
            proposal = ceremonies.propose("create-key", {"name": "after-init",
                                                         "algorithm": "ecdsa-p256"})
            assert not ceremonies.approve(proposal.id, keys["alice"]).executed
            with pytest.raises(SignetError) as foreign:  # a dev custodian is not listed here
                ceremonies.approve(proposal.id, sorted(
                    (dev.state_dir / "custodians").glob("custodian-*.pem"))[0])
            assert foreign.value.code is grpc.StatusCode.PERMISSION_DENIED
            done = ceremonies.approve(proposal.id, keys["carol"])
            assert done.executed
            assert done.key is not None
            assert done.key.name == "after-init"
    finally:
        if signer is not None:
            signer.stop()
        dev.down()
