"""Issue 10 against a real signer: the mTLS matrix with audited denials, PKCS#11 key-attribute
policy, request-id replay and expiry, and sealed start (docs/adr/0012)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import time
from collections.abc import Iterator

import grpc
import pytest
import yaml

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm, Replication
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from signer._pb.signet.v1 import common_pb2, signing_pb2, signing_pb2_grpc
from signer.client import SignetClient
from signer.dev.ca import DevCa, IssuedCert
from signer.dev.cluster import DevCluster
from signer.dev.processes import health_status
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e

SETTINGS = {
    # Ceremonies off so the test can create keys directly (ceremonies have their own tests);
    # a short request window so expiry is observable (kms/requests.py).
    "ceremonies": {"required": False},
    "multi_region": {"bootstrap_register": True, "request_window_seconds": 2},
}


def sha256(data: bytes) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(data).digest())


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    dev = DevCluster(tmp_path_factory.mktemp("hardening"))
    try:
        cluster = dev.up(log=False, signer_settings=SETTINGS)
        running = RunningCluster(dev, cluster)
        with running.client("admin") as admin:
            admin.create_key("matrix", Algorithm.ECDSA_P256_SHA256)
        yield running
    finally:
        dev.down()


def audit_entries(cluster: RunningCluster, kind: str) -> list[dict[str, object]]:
    found = []
    for entries in (cluster.signer.directory / "audit").glob("*/entries.jsonl"):
        for line in entries.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == kind:
                found.append(record)
    return found


def raw_status(cluster: RunningCluster, cert: IssuedCert | None) -> grpc.StatusCode:
    """SignDigest through a bare grpc channel with this client certificate (or none)."""
    ca = cluster.cluster.ca
    assert ca is not None
    creds = (grpc.ssl_channel_credentials(ca.read_bytes()) if cert is None else
             grpc.ssl_channel_credentials(ca.read_bytes(), cert.key_path.read_bytes(),
                                          cert.cert_path.read_bytes()))
    request = signing_pb2.SignDigestRequest(
        key="matrix", digest=common_pb2.Digest(algorithm=common_pb2.SHA256, value=bytes(32)))
    with grpc.secure_channel(cluster.cluster.endpoints()[0], creds) as channel:
        try:
            signing_pb2_grpc.SigningStub(channel).SignDigest(request, timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_the_mtls_matrix_answers_each_case_and_audits_the_denials(
    hardened: RunningCluster,
) -> None:
    """What each kind of client certificate gets. Handshake refusals (no certificate, expired,
    not yet valid, another CA, no digitalSignature usage, no clientAuth EKU) are decided by
    grpc's TLS stack (BoringSSL) before any Python runs: raw clients see UNAVAILABLE and the
    server cannot audit them (ADR 0003, 0012). Everything that reaches the servicers and is
    refused is audited as a ``security`` entry."""
    ca = DevCa.load_or_create(hardened.ca_dir)
    now = datetime.datetime.now(datetime.UTC)
    uri = "spiffe://signet.dev/pipeline"  # the identity that *may* sign "matrix"
    cases: dict[str, IssuedCert | None] = {
        "no certificate": None,
        "expired": ca.issue("expired", uri=uri, client=True,
                            not_before=now - datetime.timedelta(days=2),
                            not_after=now - datetime.timedelta(days=1)),
        "not yet valid": ca.issue("future", uri=uri, client=True,
                                  not_before=now + datetime.timedelta(days=1),
                                  not_after=now + datetime.timedelta(days=2)),
        "another CA": DevCa.load_or_create(hardened.ca_dir.parent / "other-ca").issue(
            "stranger", uri=uri, client=True),
        "no digitalSignature key usage": ca.issue("no-ds", uri=uri, client=True,
                                                  key_usage_digital_signature=False),
        "serverAuth EKU only": ca.issue("server-only", uri=uri, server=True),
    }
    before = len(audit_entries(hardened, "sign"))
    outcomes = {name: raw_status(hardened, cert) for name, cert in cases.items()}
    print("\nmTLS matrix (raw grpc client):", {k: v.name for k, v in outcomes.items()})
    assert outcomes == dict.fromkeys(cases, grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(SignetError) as no_cert:
        SignetClient(hardened.cluster.endpoints(), ca=hardened.cluster.ca)
    assert no_cert.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert len(audit_entries(hardened, "sign")) == before, "a refused handshake signed"

    # Reaches the servicers: refused there, and audited.
    intruder = ca.issue("intruder", uri="spiffe://signet.dev/intruder", client=True)
    anonymous = ca.issue("anonymous", server_names=("build-host",), client=True)
    assert raw_status(hardened, intruder) is grpc.StatusCode.PERMISSION_DENIED
    assert raw_status(hardened, anonymous) is grpc.StatusCode.UNAUTHENTICATED
    with hardened.client("pipeline") as pipeline, pytest.raises(SignetError) as admin:
        pipeline.create_key("sneaky", Algorithm.ECDSA_P256_SHA256)
    assert admin.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert len(audit_entries(hardened, "sign")) == before

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        denials = audit_entries(hardened, "security")
        if len(denials) >= 3:
            break
        time.sleep(0.1)
    seen = {(d["identity"], d["method"], d["code"]) for d in denials}
    assert ("spiffe://signet.dev/intruder", "SignDigest", "PERMISSION_DENIED") in seen
    assert ("unidentified", "SignDigest", "UNAUTHENTICATED") in seen
    assert ("spiffe://signet.dev/pipeline", "CreateKey", "PERMISSION_DENIED") in seen
    for denial in denials:
        assert denial["event"] == "denied"
        assert denial["reason"]
        assert set(denial) >= {"identity", "method", "key", "code", "reason"}
        assert "digest" not in denial  # no payloads


def test_a_flood_of_denials_is_audited_at_a_bounded_rate(hardened: RunningCluster) -> None:
    ca = DevCa.load_or_create(hardened.ca_dir)
    flood = ca.issue("flooder", uri="spiffe://signet.dev/flooder", client=True)
    before = [d for d in audit_entries(hardened, "security")
              if d["identity"] == "spiffe://signet.dev/flooder"]
    with SignetClient(hardened.cluster.endpoints(), ca=hardened.cluster.ca,
                      cert=flood.cert_path, key=flood.key_path) as client:
        for _ in range(300):
            with pytest.raises(SignetError) as denied:
                client.sign_digest("matrix", sha256(b"flood"))
            assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
        time.sleep(1.0)
        with pytest.raises(SignetError):  # carries the count of what was dropped
            client.sign_digest("matrix", sha256(b"flood"))
    time.sleep(0.5)
    after = [d for d in audit_entries(hardened, "security")
             if d["identity"] == "spiffe://signet.dev/flooder"]
    written = len(after) - len(before)
    dropped = sum(int(d.get("dropped", 0)) for d in after)  # type: ignore[call-overload]
    print(f"\ndenial flood: 301 denials, {written} audited, {dropped} counted as dropped")
    assert 1 <= written <= 30  # burst 20 + 2/s over the few seconds of the flood
    assert dropped >= 250


def _hsm_env(cluster: RunningCluster) -> tuple[dict[str, object], dict[str, str]]:
    config = yaml.safe_load(cluster.signer.config_path.read_text())
    return config, {"SOFTHSM2_CONF": str(cluster.dev.state_dir / "hsm" / "softhsm2.conf")}


_BAD_KEY = """
import asyncio, sys
from pkcs11 import Attribute, KeyType, Mechanism
from kms.hsm.pkcs11 import EC_PARAMS_P256, Pkcs11Hsm, load_pin
async def main():
    hsm = await Pkcs11Hsm.open(sys.argv[1], sys.argv[2], load_pin(sys.argv[3], None))
    def make(session):
        session.generate_keypair(
            KeyType.EC, None, id=bytes.fromhex(sys.argv[4]), label="bad-attributes", store=True,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            public_template={Attribute.TOKEN: True, Attribute.EC_PARAMS: EC_PARAMS_P256,
                             Attribute.VERIFY: True},
            private_template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                              Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                              Attribute.SIGN: True})
    await hsm.run_with_session(make)
    print((await hsm.public_key(bytes.fromhex(sys.argv[4]))).hex())
    await hsm.close()
asyncio.run(main())
"""


def test_a_key_whose_attributes_break_the_policy_is_refused(hardened: RunningCluster) -> None:
    """A key pair made directly in the token, extractable and not sensitive (its CKA_VALUE is
    readable), and a key record pointed at it: the signer refuses with FAILED_PRECONDITION
    naming the attribute, every time (the verdict is cached per CKA_ID)."""
    import subprocess
    import sys

    config, env = _hsm_env(hardened)
    hsm = config["hsm"]
    assert isinstance(hsm, dict)
    bad_id = os.urandom(16)
    made = subprocess.run(
        [sys.executable, "-c", _BAD_KEY, hsm["module"], hsm["token_label"], hsm["pin_file"],
         bad_id.hex()], capture_output=True, text=True, env=dict(os.environ, **env),
        check=False, timeout=60)
    assert made.returncode == 0, made.stderr
    spki = bytes.fromhex(made.stdout.strip())
    with hardened.client("admin") as admin:
        admin.create_key("tampered", Algorithm.ECDSA_P256_SHA256)
    _repoint_key(hardened, "tampered", bad_id, spki)
    with hardened.client() as pipeline:
        for _ in range(2):
            with pytest.raises(SignetError) as refused:
                pipeline.sign_digest("tampered", sha256(b"x"))
            assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
            assert "CKA_SENSITIVE is FALSE" in refused.value.message
        pipeline.sign_digest("matrix", sha256(b"others still sign"))


def _repoint_key(cluster: RunningCluster, name: str, hsm_id: bytes, spki: bytes) -> None:
    """Rewrite the key record's version 1 to name another HSM object (an attacker or a bad
    migration with etcd access)."""
    identity = cluster.cluster.identity("etcd")

    async def rewrite() -> None:
        store = EtcdKeyStateStore(EtcdConfig(
            endpoints=cluster.cluster.etcd_endpoints, ca_file=cluster.cluster.ca,
            cert_file=identity.cert, key_file=identity.key))
        try:
            path = store.layout.key(name)
            record = await store.get_record(path)
            assert record is not None
            version = record["versions"][0]
            version["hsm_id"] = hsm_id.hex()
            version["public_key_der"] = _b64(spki)
            version["key_id"] = hashlib.sha256(spki).hexdigest()
            await store.put_record(path, record)
        finally:
            await store.close()

    asyncio.run(rewrite())
    time.sleep(0.5)  # the signer's watch applies it


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_signing_keys_are_sensitive_sign_only_and_unreadable(hardened: RunningCluster) -> None:
    """What the HSM itself holds for a regional and a multi-region key, and that CKA_VALUE
    cannot be read."""
    config, env = _hsm_env(hardened)
    hsm_settings = config["hsm"]
    assert isinstance(hsm_settings, dict)
    with hardened.client("admin") as admin:
        admin.create_key("attr-regional", Algorithm.ED25519)
        admin.create_key("attr-multi", Algorithm.ECDSA_P256_SHA256,
                         replication=Replication.MULTI_REGION)
    ids = {name: _hsm_id(hardened, name) for name in ("attr-regional", "attr-multi")}
    os.environ.update(env)  # SoftHSM reads its config from the environment at load

    async def probe() -> dict[str, tuple[dict[str, bool], str]]:
        hsm = await Pkcs11Hsm.open(str(hsm_settings["module"]), str(hsm_settings["token_label"]),
                                   load_pin(str(hsm_settings["pin_file"]), None))
        try:
            found = {}
            for name, hsm_id in ids.items():
                attributes = await hsm.key_attributes(hsm_id)

                def read_value(session: object, hsm_id: bytes = hsm_id) -> str:
                    from pkcs11 import Attribute, ObjectClass
                    from pkcs11 import exceptions as p11

                    key = session.get_key(  # type: ignore[attr-defined]
                        object_class=ObjectClass.PRIVATE_KEY, id=hsm_id)
                    try:
                        key[Attribute.VALUE]
                    except p11.PKCS11Error as error:
                        return type(error).__name__
                    return "READABLE"

                found[name] = (attributes, await hsm.run_with_session(read_value))
            return found
        finally:
            await hsm.close()

    found = asyncio.run(probe())
    for name, (attributes, value) in found.items():
        assert all(attributes[a] for a in ("sensitive", "sign", "private")), name
        assert not any(attributes[a] for a in ("decrypt", "unwrap")), name
        assert value == "AttributeSensitive", (name, value)
    assert not found["attr-regional"][0]["extractable"]
    assert found["attr-regional"][0]["never_extractable"]
    assert found["attr-multi"][0]["extractable"]  # wrap-only transport (ADR 0010, 0012)


def _hsm_id(cluster: RunningCluster, name: str) -> bytes:
    from tests.fixtures.cluster import key_record

    return key_record(cluster, name).versions[0].hsm_id


def test_a_replayed_request_id_returns_the_original_and_ids_expire(
    hardened: RunningCluster,
) -> None:
    digest = sha256(b"replayed")
    with hardened.client() as pipeline:
        first = pipeline.sign_digest("matrix", digest, request_id="replay-1")
        again = pipeline.sign_digest("matrix", digest, request_id="replay-1")
        assert again.signature == first.signature  # not a second (randomised) ECDSA signature
        # The window is 2 s (etcd forgets ids after 1-1.1 windows; lease granularity adds
        # a little): within 10 s the same id signs afresh.
        deadline = time.monotonic() + 10
        while True:
            later = pipeline.sign_digest("matrix", digest, request_id="replay-1")
            if later.signature != first.signature:
                break
            assert time.monotonic() < deadline, "request id never expired"
            time.sleep(0.5)
    signed = [e for e in audit_entries(hardened, "sign") if e["request_id"] == "replay-1"]
    assert len(signed) == 2  # the original and the one after expiry; the replay signed nothing


def test_sealed_start_reports_not_serving_until_etcd_is_back(hardened: RunningCluster) -> None:
    """A second signer started while etcd is paused answers health NOT_SERVING (and calls
    UNAVAILABLE) until etcd resumes, then SERVING without a restart; one whose PIN file is
    missing exits with a clear error."""
    import shutil

    from signer.dev.processes import SignerProcess, persistent_endpoint

    source = hardened.signer
    config, env = _hsm_env(hardened)
    directory = hardened.dev.state_dir / "sealed"
    directory.mkdir()
    sealed = SignerProcess(directory, persistent_endpoint(directory, "endpoint"))
    config = dict(config, listen=sealed.endpoint, trust={"http_listen": ""},
                  telemetry={}, dashboard=None)
    config.pop("dashboard")
    config["audit"] = {"directory": str(directory / "audit")}
    sealed.config_path.write_text(yaml.safe_dump(config))
    admin = hardened.cluster.identity("admin")
    ca = hardened.cluster.ca
    member = hardened.etcd.members[0]
    member.pause()
    try:
        sealed.launch(dict(os.environ, **env))
        statuses = set()
        for _ in range(15):
            statuses.add(health_status(sealed.endpoint, ca=ca, cert=admin.cert, key=admin.key))
            time.sleep(0.2)
        assert "SERVING" not in statuses, statuses
        assert statuses & {"NOT_SERVING", "UNREACHABLE: UNAVAILABLE"}, statuses
        assert sealed.running
    finally:
        member.resume()
    try:
        sealed.wait_healthy(ca=ca, cert=admin.cert, key=admin.key, timeout=30)
    finally:
        sealed.stop()
    # Missing PIN file: the process exits, saying which file.
    hsm = config["hsm"]
    assert isinstance(hsm, dict)
    config["hsm"] = {**hsm, "pin_file": str(directory / "missing-pin")}
    sealed.config_path.write_text(yaml.safe_dump(config))
    sealed.launch(dict(os.environ, **env))
    deadline = time.monotonic() + 20
    while sealed.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sealed.running
    assert "missing-pin" in sealed.log_path.read_text()
    shutil.rmtree(directory / "audit", ignore_errors=True)
    assert source.running
