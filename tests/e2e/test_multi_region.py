"""Three regions on one machine: HSM-to-HSM replication, regional keys, request-id
idempotency across regions, and failover drills (kill, pause, partition) under load."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm, Replication
from signer.client import SignetClient
from signer.cluster import ClusterFile
from signer.dev.cluster import DevCluster
from signer.drill import DrillSettings, run_failover_drill
from signer.errors import SignetError
from signer.trust import GrpcTrustTransport, TrustClient, TrustError, TrustResponse
from tests.fixtures.cluster import key_record

pytestmark = pytest.mark.e2e

REGIONS = ("eu-west", "us-east", "ap-south")
# Ceremonies off (the insecure development mode for lifecycle RPCs) so the tests and drills
# can create and revoke keys directly; ceremonies have their own tests.
SETTINGS = {"ceremonies": {"required": False}}


class ThreeRegions:
    def __init__(self, dev: DevCluster, cluster: ClusterFile) -> None:
        self.dev = dev
        self.cluster = cluster

    def client(self, region: str, identity: str = "pipeline", **kwargs: object
               ) -> SignetClient:
        """A client that talks to ``region`` only (no failover)."""
        who = self.cluster.identity(identity)
        return SignetClient(self.cluster.regions[region].grpc_endpoints, ca=self.cluster.ca,
                            cert=who.cert, key=who.key, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeRegions]:
    dev = DevCluster(tmp_path_factory.mktemp("regions"))
    try:
        cluster = dev.up(regions=3, log=False, signer_settings=SETTINGS)
        yield ThreeRegions(dev, cluster)
    finally:
        dev.down()


def digest(text: str) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(text.encode()).digest())


def sign_when_replicated(client: SignetClient, key: str, d: Digest, timeout: float = 20.0
                         ) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.sign_digest(key, d)
        except SignetError as error:
            # Only "not yet replicated here" (or a region still coming back) is retried.
            if error.code is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_ATTRIBUTES = """
import asyncio, json, sys
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
async def main():
    hsm = await Pkcs11Hsm.open(sys.argv[1], sys.argv[2], load_pin(sys.argv[3], None))
    try:
        print(json.dumps(await hsm.key_attributes(bytes.fromhex(sys.argv[4]))))
    finally:
        await hsm.close()
asyncio.run(main())
"""


def key_attributes(regions: ThreeRegions, region: str, hsm_id: bytes) -> dict[str, bool]:
    """The private key's PKCS#11 attributes in ``region``'s own token, read from a separate
    process with that region's SoftHSM configuration."""
    config = yaml.safe_load((regions.dev.state_dir / f"signer-{region}-0" / "signer.yaml")
                            .read_text())
    env = dict(os.environ, SOFTHSM2_CONF=str(regions.dev.state_dir / f"hsm-{region}"
                                             / "softhsm2.conf"))
    result = subprocess.run(
        [sys.executable, "-c", _ATTRIBUTES, config["hsm"]["module"],
         config["hsm"]["token_label"], config["hsm"]["pin_file"], hsm_id.hex()],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )
    return dict(json.loads(result.stdout))


def test_regions_have_their_own_hsm_etcd_member_and_endpoints(regions: ThreeRegions) -> None:
    assert tuple(regions.cluster.regions) == REGIONS
    assert regions.cluster.home_region == "eu-west"
    etcd = json.loads((regions.dev.state_dir / "etcd" / "cluster.json").read_text())
    assert len(etcd["members"]) == 3
    firsts, labels = set(), set()
    for region in REGIONS:
        config = yaml.safe_load((regions.dev.state_dir / f"signer-{region}-0" / "signer.yaml")
                                .read_text())
        assert config["region"] == region
        firsts.add(config["etcd"]["endpoints"][0])
        labels.add(config["hsm"]["token_label"])
        assert (regions.dev.state_dir / f"hsm-{region}" / "softhsm2.conf").exists()
    assert len(firsts) == 3  # each region prefers its own etcd member
    assert labels == {f"signet-{r}" for r in REGIONS}


def test_a_multi_region_key_signs_everywhere_with_unwrapped_copies(
    regions: ThreeRegions,
) -> None:
    with regions.client("eu-west", "admin") as admin:
        created = admin.create_key("everywhere", Algorithm.ECDSA_P256_SHA256,
                                   replication=Replication.MULTI_REGION)
    key_id = created.versions[0].key_id
    d = digest("replicated")
    for region in REGIONS:
        with regions.client(region) as client:
            sig = sign_when_replicated(client, "everywhere", d)
        assert sig.region == region  # type: ignore[attr-defined]
        assert sig.key_id == key_id  # type: ignore[attr-defined]
    record = key_record(regions, "everywhere")  # type: ignore[arg-type]
    assert record.home_region == "eu-west"
    hsm_id = record.versions[0].hsm_id
    origin = key_attributes(regions, "eu-west", hsm_id)
    assert origin["local"]
    assert origin["always_sensitive"]
    assert origin["extractable"]
    for region in ("us-east", "ap-south"):
        copy = key_attributes(regions, region, hsm_id)
        # Unwrapped, not generated: not CKA_LOCAL; it was extractable in the origin, so it
        # was never "always sensitive / never extractable", and it is not extractable here.
        assert copy["local"] is False
        assert copy["always_sensitive"] is False
        assert copy["never_extractable"] is False
        assert copy["sensitive"]
        assert copy["sign"]
        assert not copy["extractable"]


def test_a_regional_key_signs_only_in_its_home_region(regions: ThreeRegions) -> None:
    with regions.client("us-east", "admin") as admin:
        admin.create_key("homebound", Algorithm.ED25519)
    with regions.client("us-east") as client:
        assert client.sign_digest("homebound", digest("x")).region == "us-east"
    with regions.client("ap-south") as client, pytest.raises(SignetError) as caught:
        client.sign_digest("homebound", digest("x"))
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "region 'us-east'" in caught.value.message


def test_a_request_id_is_signed_once_across_regions(regions: ThreeRegions) -> None:
    with regions.client("eu-west", "admin") as admin:
        if "once" not in {k.name for k in admin.list_keys()}:
            admin.create_key("once", Algorithm.ECDSA_P256_SHA256,
                             replication=Replication.MULTI_REGION)
    d = digest("idempotent")
    with regions.client("us-east") as client:
        sign_when_replicated(client, "once", digest("warm-up"))
    request_id = "retry-after-failover-1"
    with regions.client("eu-west") as first, regions.client("us-east") as second:
        a = first.sign_digest("once", d, request_id=request_id)
        b = second.sign_digest("once", d, request_id=request_id)
        assert a.signature == b.signature
        assert b.region == "eu-west"
        with pytest.raises(SignetError) as caught:  # same id, another digest
            second.sign_digest("once", digest("other"), request_id=request_id)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    entries = [json.loads(line) for path in regions.dev.state_dir.glob(
        "signer-*/**/entries.jsonl") for line in path.read_text().splitlines()]
    assert sum(1 for e in entries if e.get("request_id") == request_id) == 1


@pytest.mark.parametrize(("mode", "region", "revoke"), [
    ("kill", "us-east", False),
    ("pause", "ap-south", False),
    ("partition", "eu-west", True),
])
def test_failover_drill(regions: ThreeRegions, tmp_path: Path, mode: str, region: str,
                        revoke: bool) -> None:
    report = run_failover_drill(DrillSettings(
        regions.cluster.path, region, mode, load=4, duration=10.0, down_seconds=4.0,
        report_dir=tmp_path, revoke_during=revoke, key=f"drill-{mode}"), log=lambda _: None)
    assert report.totals["acknowledged"] > 50
    assert report.totals["lost"] == 0
    assert report.totals["duplicated"] == 0
    assert report.totals["bad_signatures"] == 0
    assert report.passed, report.summary()
    assert report.rto_seconds < 10
    if mode == "partition":
        assert report.fail_closed_seconds is not None
        assert report.fail_closed_seconds <= report.settings["lease_ttl_seconds"]
        assert report.checks["minority_stops_within_lease_ttl"]
    if revoke:
        assert report.revocation is not None
        assert report.revocation["violations"] == 0
        assert report.checks["fencing_holds"]
    for name in ("drill-report.json", "drill-summary.txt", "drill-report.json.sig",
                 "drill-report.sig.json"):
        assert (tmp_path / name).exists()
    signed = json.loads((tmp_path / "drill-report.sig.json").read_text())
    assert signed["sha256"] == hashlib.sha256(
        (tmp_path / "drill-report.json").read_bytes()).hexdigest()
    with regions.client("eu-west") as client:
        pem = client.public_key(signed["key"], signed["version"]).pem
    verify = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "/dev/stdin", "-signature",
         str(tmp_path / "drill-report.json.sig"), str(tmp_path / "drill-report.json")],
        input=pem.encode(), capture_output=True, check=False)
    assert verify.returncode == 0, verify.stderr
    # The region is back and signs again.
    with regions.client(region) as client:
        sign_when_replicated(client, f"drill-{mode}", digest("after"), timeout=30)


class _AnswerFrom:
    """A trust transport that sends every request to ``region``'s signers and asks them for
    their own region, whatever the client wanted: an honest statement, for the wrong region."""

    def __init__(self, inner: GrpcTrustTransport, region: str) -> None:
        self.inner = inner
        self.region = region

    def fetch(self, nonce: bytes, region: str, known_root_version: int) -> TrustResponse:
        return self.inner.fetch(nonce, self.region, known_root_version)


def test_a_freshness_statement_from_another_region_is_refused(regions: ThreeRegions,
                                                               tmp_path: Path) -> None:
    root = regions.dev.state_dir / str(regions.cluster.extra["tuf_root"])
    transports = {r: GrpcTrustTransport.from_cluster(regions.cluster, r) for r in REGIONS}
    try:
        # Asked for us-east, answered by eu-west (its own, validly signed statement).
        for asked, answering in (("us-east", "eu-west"), ("eu-west", "ap-south")):
            client = TrustClient(root, tmp_path / f"{asked}-via-{answering}", asked,
                                 _AnswerFrom(transports[answering], answering))
            with pytest.raises(TrustError) as refused:
                client.refresh()
            assert refused.value.check == "region"
            assert not client.state_path.exists()
        # Every region vouches for itself, with its own online key.
        key_ids = set()
        for region in REGIONS:
            honest = TrustClient(root, tmp_path / region, region, transports[region])
            bundle = honest.refresh()
            assert bundle.region == region
            nonce = b"n" * 32
            key_ids.add(transports[region].fetch(nonce, region, 1).key_id)
        assert len(key_ids) == 3
    finally:
        for transport in transports.values():
            transport.close()
