"""A real signer process on real etcd and SoftHSM: what build pipelines rely on."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from signer._pb.signet.v1 import common_pb2, signing_pb2, signing_pb2_grpc
from signer.client import SignetClient
from signer.dev.ca import DevCa
from signer.errors import SignetError
from tests.fixtures.cluster import RunningCluster

pytestmark = pytest.mark.e2e


def sha256(data: bytes) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(data).digest())


def openssl_verify(tmp_path: Path, algorithm: Algorithm, pem: str, digest: bytes,
                   signature: bytes) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "digest.bin").write_bytes(digest)
    (tmp_path / "sig.bin").write_bytes(signature)
    argv = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"),
            "-in", str(tmp_path / "digest.bin"), "-sigfile", str(tmp_path / "sig.bin")]
    if algorithm is Algorithm.ED25519:
        argv.append("-rawin")
    if algorithm is Algorithm.RSA_PSS_3072_SHA256:
        argv += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32",
                 "-pkeyopt", "digest:sha256"]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def verify_locally(pem: str, algorithm: Algorithm, digest: bytes, signature: bytes) -> None:
    """Raises InvalidSignature when the signature does not verify."""
    public = serialization.load_pem_public_key(pem.encode())
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, digest)
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, digest,
                      padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                      utils.Prehashed(hashes.SHA256()))


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.short_name)
def test_signature_over_grpc_verifies_with_openssl(
    dev_cluster: RunningCluster, tmp_path: Path, algorithm: Algorithm
) -> None:
    name = f"openssl-{algorithm.short_name}"
    info = dev_cluster.create_key(name, algorithm)
    digest = sha256(b"image manifest for " + name.encode())
    with dev_cluster.client() as pipeline:
        signature = pipeline.sign_digest(name, digest)
        public = pipeline.public_key(name)
    assert (signature.key, signature.version, signature.algorithm) == (name, 1, algorithm)
    assert signature.key_id == info.versions[0].key_id == public.key_id
    der = serialization.load_pem_public_key(public.pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signature.key_id == hashlib.sha256(der).hexdigest()
    good = openssl_verify(tmp_path, algorithm, public.pem, digest.value, signature.signature)
    assert good.returncode == 0, good.stdout + good.stderr
    tampered = hashlib.sha256(b"another image").digest()
    bad = openssl_verify(tmp_path, algorithm, public.pem, tampered, signature.signature)
    assert bad.returncode != 0


def test_identity_not_in_the_policy_is_denied(dev_cluster: RunningCluster) -> None:
    ca = DevCa.load_or_create(dev_cluster.ca_dir)
    intruder = ca.issue("intruder", uri="spiffe://signet.dev/intruder", client=True)
    dev_cluster.create_key("guarded", Algorithm.ECDSA_P256_SHA256)
    client = SignetClient(dev_cluster.cluster.endpoints(), ca=dev_cluster.cluster.ca,
                          cert=intruder.cert_path, key=intruder.key_path)
    with client, pytest.raises(SignetError) as denied:
        client.sign_digest("guarded", sha256(b"x"))
    assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://signet.dev/intruder" in denied.value.message
    # The pipeline identity may sign but not administer.
    with dev_cluster.client("pipeline") as pipeline, pytest.raises(SignetError) as admin_denied:
        pipeline.create_key("sneaky", Algorithm.ECDSA_P256_SHA256)
    assert admin_denied.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_callers_without_a_usable_client_certificate_are_refused(
    dev_cluster: RunningCluster,
) -> None:
    cluster = dev_cluster.cluster
    assert cluster.ca is not None
    endpoint = cluster.endpoints()[0]
    request = signing_pb2.SignDigestRequest(
        key="guarded", digest=common_pb2.Digest(algorithm=common_pb2.SHA256, value=bytes(32)))
    # No certificate at all: the TLS handshake itself is refused, nothing reaches the servicer.
    no_cert = grpc.ssl_channel_credentials(cluster.ca.read_bytes())
    with grpc.secure_channel(endpoint, no_cert) as channel, pytest.raises(grpc.RpcError) as raw:
        signing_pb2_grpc.SigningStub(channel).SignDigest(request, timeout=5)
    assert raw.value.code() is grpc.StatusCode.UNAVAILABLE
    # The client library says what is wrong instead of a vague UNAVAILABLE.
    with pytest.raises(SignetError) as unauthenticated:
        SignetClient(cluster.endpoints(), ca=cluster.ca)
    assert unauthenticated.value.code is grpc.StatusCode.UNAUTHENTICATED
    # A certificate from the CA but without a URI SAN identity: UNAUTHENTICATED from the server.
    ca = DevCa.load_or_create(dev_cluster.ca_dir)
    anonymous = ca.issue("anonymous", server_names=("build-host",), client=True)
    with SignetClient(cluster.endpoints(), ca=cluster.ca, cert=anonymous.cert_path,
                      key=anonymous.key_path) as client, pytest.raises(SignetError) as no_uri:
        client.sign_digest("guarded", sha256(b"x"))
    assert no_uri.value.code is grpc.StatusCode.UNAUTHENTICATED
    # A certificate from another CA: refused in the handshake.
    other = DevCa.load_or_create(dev_cluster.ca_dir.parent / "other-ca")
    stranger = other.issue("stranger", uri="spiffe://signet.dev/pipeline", client=True)
    with SignetClient(cluster.endpoints(), ca=cluster.ca, cert=stranger.cert_path,
                      key=stranger.key_path, attempts_per_endpoint=1) as client, \
            pytest.raises(SignetError) as foreign:
        client.sign_digest("guarded", sha256(b"x"))
    assert foreign.value.code is grpc.StatusCode.UNAVAILABLE


def raw_sign(cluster: RunningCluster, request: signing_pb2.SignDigestRequest) -> grpc.StatusCode:
    pipeline = cluster.cluster.identity("pipeline")
    assert cluster.cluster.ca is not None
    creds = grpc.ssl_channel_credentials(cluster.cluster.ca.read_bytes(),
                                         pipeline.key.read_bytes(), pipeline.cert.read_bytes())
    with grpc.secure_channel(cluster.cluster.endpoints()[0], creds) as channel:
        try:
            signing_pb2_grpc.SigningStub(channel).SignDigest(request, timeout=5)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_bad_input_gets_a_precise_status(dev_cluster: RunningCluster) -> None:
    dev_cluster.create_key("strict", Algorithm.ECDSA_P256_SHA256)
    with pytest.raises(SignetError) as duplicate:
        dev_cluster.propose("create-key", name="strict", algorithm="ed25519")
    assert duplicate.value.code is grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(SignetError) as bad_name:
        dev_cluster.propose("create-key", name="no/slashes", algorithm="ed25519")
    assert bad_name.value.code is grpc.StatusCode.INVALID_ARGUMENT

    def request(**fields: object) -> signing_pb2.SignDigestRequest:
        base: dict[str, object] = {
            "key": "strict",
            "digest": common_pb2.Digest(algorithm=common_pb2.SHA256, value=bytes(32)),
        }
        return signing_pb2.SignDigestRequest(**(base | fields))  # type: ignore[arg-type]

    assert raw_sign(dev_cluster, request()) is grpc.StatusCode.OK
    assert raw_sign(dev_cluster, request(key="missing")) is grpc.StatusCode.NOT_FOUND
    assert raw_sign(dev_cluster, request(key_version=9)) is grpc.StatusCode.NOT_FOUND
    short = common_pb2.Digest(algorithm=common_pb2.SHA256, value=bytes(31))
    assert raw_sign(dev_cluster, request(digest=short)) is grpc.StatusCode.INVALID_ARGUMENT
    unknown = common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_UNSPECIFIED,
                                value=bytes(32))
    assert raw_sign(dev_cluster, request(digest=unknown)) is grpc.StatusCode.INVALID_ARGUMENT
    sha512 = common_pb2.Digest(algorithm=common_pb2.SHA512, value=bytes(64))
    assert raw_sign(dev_cluster, request(digest=sha512)) is grpc.StatusCode.INVALID_ARGUMENT


def test_batches_answer_each_item_and_refuse_empty_or_oversized(
    dev_cluster: RunningCluster,
) -> None:
    dev_cluster.create_key("batch", Algorithm.ECDSA_P256_SHA256)
    digests = [sha256(str(i).encode()) for i in range(5)]
    with dev_cluster.client() as pipeline:
        public = pipeline.public_key("batch")
        # A wrong-length item cannot be built through the library; send it raw below.
        results = pipeline.sign_batch("batch", digests)
        for digest, result in zip(digests, results, strict=True):
            assert not isinstance(result, SignetError)
            verify_locally(public.pem, Algorithm.ECDSA_P256_SHA256, digest.value,
                           result.signature)
        for size in (0, 1025):
            with pytest.raises(SignetError) as refused:
                pipeline.sign_batch("batch", [digests[0]] * size)
            assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    pipeline_id = dev_cluster.cluster.identity("pipeline")
    assert dev_cluster.cluster.ca is not None
    creds = grpc.ssl_channel_credentials(dev_cluster.cluster.ca.read_bytes(),
                                         pipeline_id.key.read_bytes(),
                                         pipeline_id.cert.read_bytes())
    mixed = signing_pb2.SignBatchRequest(key="batch", digests=[
        common_pb2.Digest(algorithm=common_pb2.SHA256, value=digests[0].value),
        common_pb2.Digest(algorithm=common_pb2.SHA256, value=b"short"),
        common_pb2.Digest(algorithm=common_pb2.SHA256, value=digests[1].value),
    ])
    with grpc.secure_channel(dev_cluster.cluster.endpoints()[0], creds) as channel:
        response = signing_pb2_grpc.SigningStub(channel).SignBatch(mixed, timeout=5)
    kinds = [r.WhichOneof("outcome") for r in response.results]
    assert kinds == ["signature", "error", "signature"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "32 bytes, got 5" in response.results[1].error.message
    verify_locally(public.pem, Algorithm.ECDSA_P256_SHA256, digests[1].value,
                   response.results[2].signature.signature)


def test_thousands_of_concurrent_signatures_all_verify(dev_cluster: RunningCluster) -> None:
    dev_cluster.create_key("load", Algorithm.ECDSA_P256_SHA256)
    with dev_cluster.client() as pipeline:
        public = pipeline.public_key("load")
        digests = [sha256(f"image-{i}".encode()) for i in range(2400)]

        def sign(digest: Digest) -> bytes:
            return pipeline.sign_digest("load", digest).signature

        with ThreadPoolExecutor(max_workers=32) as pool:
            single = list(pool.map(sign, digests[:1200]))
            batches = list(pool.map(
                lambda chunk: pipeline.sign_batch("load", chunk),
                [digests[i:i + 100] for i in range(1200, 2400, 100)],
            ))
    signatures = single + [r.signature for batch in batches for r in batch
                           if not isinstance(r, SignetError)]
    assert len(signatures) == len(digests)
    for digest, signature in zip(digests, signatures, strict=True):
        verify_locally(public.pem, Algorithm.ECDSA_P256_SHA256, digest.value, signature)
    assert dev_cluster.signer.running, "the signer process must survive the load"


def test_the_cli_signs_and_prints_json(dev_cluster: RunningCluster) -> None:
    env_cluster = str(dev_cluster.cluster.path)
    signet = [sys.executable, "-m", "signer.cli.main"]
    # Direct key creation needs a custodian ceremony; the refusal says which command.
    direct = subprocess.run([*signet, "key", "create", "cli-key", "--algorithm", "ed25519",
                             "--cluster", env_cluster], capture_output=True, text=True,
                            check=False)
    assert direct.returncode == 5, direct.stderr
    assert "signet ceremony propose create-key" in direct.stderr
    proposed = subprocess.run([*signet, "ceremony", "propose", "create-key", "cli-key",
                               "--algorithm", "ed25519", "--output", "json",
                               "--cluster", env_cluster], capture_output=True, text=True,
                              check=False)
    assert proposed.returncode == 0, proposed.stderr
    proposal_id = json.loads(proposed.stdout)["id"]
    for key in dev_cluster.custodian_keys()[:2]:
        approved = subprocess.run([*signet, "ceremony", "approve", proposal_id, "--key",
                                   str(key), "--cluster", env_cluster], capture_output=True,
                                  text=True, check=False)
        assert approved.returncode == 0, approved.stderr
    assert "EXECUTED" in approved.stdout
    digest = hashlib.sha256(b"cli").hexdigest()
    signed = subprocess.run([*signet, "sign", "--key", "cli-key", "--digest",
                             f"sha256:{digest}", "--output", "json", "--cluster", env_cluster],
                            capture_output=True, text=True, check=False)
    assert signed.returncode == 0, signed.stderr
    fields = json.loads(signed.stdout)
    assert set(fields) >= {"signature", "key", "key_version", "key_id", "algorithm"}
    assert fields["algorithm"] == "ed25519"
    pem = subprocess.run([*signet, "public-key", "cli-key", "--cluster", env_cluster],
                         capture_output=True, text=True, check=True).stdout
    verify_locally(pem, Algorithm.ED25519, bytes.fromhex(digest),
                   base64.b64decode(fields["signature"]))
    missing = subprocess.run([*signet, "sign", "--key", "nope", "--digest", f"sha256:{digest}",
                              "--cluster", env_cluster], capture_output=True, text=True,
                             check=False)
    assert missing.returncode == 4
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
