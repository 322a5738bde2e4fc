"""A custodian whose key lives in their own PKCS#11 token (a separate SoftHSM store, reached
only from CLI subprocesses with that store's SOFTHSM2_CONF) exports its public key, joins the
custodian set by ceremony, and approves a proposal on a real dev cluster with
``signet ceremony approve ID --key 'pkcs11:…'``. docs/adr/0009-custodian-ceremonies.md."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.domain.ceremony import Custodian, CustodianSet
from signer.dev.cluster import DevCluster
from signer.dev.softhsm import find_softhsm_module, init_token, write_softhsm_conf
from tests.fixtures.cluster import RunningCluster
from tests.fixtures.softhsm import write_pin_file

pytestmark = pytest.mark.e2e

TOKEN = "custodian-3-token"

_GENERATE = """
import asyncio, sys
from kms.domain.keys import Algorithm
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
async def main():
    hsm = await Pkcs11Hsm.open(sys.argv[1], sys.argv[2], load_pin(sys.argv[3], None))
    try:
        await hsm.generate_key_pair(label=sys.argv[4], algorithm=Algorithm(sys.argv[5]),
                                    extractable=False)
    finally:
        await hsm.close()
asyncio.run(main())
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RunningCluster]:
    dev = DevCluster(tmp_path / "cluster")
    try:
        yield RunningCluster(dev, dev.up(log=False))
    finally:
        dev.down()


class CustodianToken:
    """The custodian's own SoftHSM store and token, used only from subprocesses."""

    def __init__(self, directory: Path) -> None:
        self.conf = write_softhsm_conf(directory)
        self.module = find_softhsm_module()
        pin = secrets.token_hex(8)
        init_token(self.conf, TOKEN, so_pin=secrets.token_hex(8), user_pin=pin)
        self.pin_file = write_pin_file(directory / "user.pin", pin)
        self.env = dict(os.environ, SOFTHSM2_CONF=str(self.conf))

    def generate(self, label: str, algorithm: str) -> None:
        subprocess.run([sys.executable, "-c", _GENERATE, self.module, TOKEN,
                        str(self.pin_file), label, algorithm],
                       env=self.env, check=True, capture_output=True, timeout=60)

    def uri(self, label: str) -> str:
        return (f"pkcs11:token={TOKEN};object={label}?module-path={self.module}"
                f"&pin-source=file:{self.pin_file}")

    def signet(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "signer.cli.main", *args],
                              env=self.env, capture_output=True, text=True, check=False,
                              timeout=120)


def test_a_custodian_approves_with_a_key_in_their_own_token(
    cluster: RunningCluster, tmp_path: Path,
) -> None:
    token = CustodianToken(tmp_path / "custodian-hsm")
    token.generate("approvals", "ecdsa-p256-sha256")
    exported = token.signet("ceremony", "custodian-key", "--pkcs11", token.uri("approvals"),
                            "--out", str(tmp_path / "token.pub.pem"))
    assert exported.returncode == 0, exported.stderr
    assert "custodian key id" in exported.stdout

    # custodian-3's file key is replaced by the token key, by a ceremony.
    files = cluster.custodian_keys()
    members = [Custodian(f"custodian-{n}", Path(f"{files[n - 1]}.pub").read_text())
               for n in (1, 2)]
    members.append(Custodian("custodian-3", (tmp_path / "token.pub.pem").read_text()))
    cluster.ceremony("custodians", custodian_set=CustodianSet(tuple(members), 2, 1).to_dict())

    proposal = cluster.propose("create-key", name="token-approved", algorithm="ecdsa-p256")
    first = cluster.approve(proposal.id, 0)  # custodian-1, file key
    assert not first.executed
    approved = token.signet("ceremony", "approve", proposal.id, "--key",
                            token.uri("approvals"), "--cluster", str(cluster.cluster.path),
                            "-o", "json")
    assert approved.returncode == 0, approved.stderr
    result = json.loads(approved.stdout)
    assert result["executed"] is True
    assert sorted(result["proposal"]["counted"]) == ["custodian-1", "custodian-3"]
    with cluster.client("admin") as admin:
        assert "token-approved" in {k.name for k in admin.list_keys()}
    # The PIN never reached the server, the audit log or the command's output.
    pin = token.pin_file.read_text().strip()
    logs = "".join(p.read_text() for p in cluster.dev.state_dir.glob("signer-*/**/*.jsonl"))
    assert pin not in logs
    assert pin not in approved.stdout + approved.stderr


def test_token_keys_that_cannot_approve_are_refused_with_a_reason(tmp_path: Path) -> None:
    token = CustodianToken(tmp_path / "custodian-hsm")
    token.generate("edwards", "ed25519")
    refused = token.signet("ceremony", "custodian-key", "--pkcs11", token.uri("edwards"),
                           "--out", str(tmp_path / "ed.pem"))
    assert refused.returncode == 3, refused.stderr
    assert "ECDSA P-256" in refused.stderr
    pin_on_command_line = (f"pkcs11:token={TOKEN};object=edwards?module-path={token.module}"
                           "&pin-value=1234")
    refused = token.signet("ceremony", "custodian-key", "--pkcs11", pin_on_command_line,
                           "--out", str(tmp_path / "x.pem"))
    assert refused.returncode == 3
    assert "pin-source=file:" in refused.stderr
    missing = token.signet("ceremony", "custodian-key", "--pkcs11", token.uri("absent"),
                           "--out", str(tmp_path / "y.pem"))
    assert missing.returncode == 3
    assert "matches 0 private keys" in missing.stderr
