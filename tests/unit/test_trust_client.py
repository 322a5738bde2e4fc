"""The trust-bundle verifier against an in-memory repository: honest answers are accepted, and
every attack in the table is refused with the trusted state on disk byte for byte unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from kms.domain.keys import Digest, DigestAlgorithm
from kms.tuf.repository import build_timestamp
from signer.trust import TrustClient, TrustError, TrustResponse
from tests.unit.tuf_simulator import RepositorySimulator, SimulatorTransport, SoftwareOnlineKey

NONCE = b"n" * 32


@pytest.fixture
def sim() -> RepositorySimulator:
    return RepositorySimulator(now=1_800_000_000.0)


@pytest.fixture
def client(sim: RepositorySimulator, tmp_path: Path) -> TrustClient:
    root = tmp_path / "1.root.json"
    root.write_bytes(sim.root_bytes)
    nonces = iter(bytes([i]) * 32 for i in range(1, 200))
    return TrustClient(root, tmp_path / "state", "local", SimulatorTransport(sim),
                       clock=lambda: sim.now, nonce_source=lambda _: next(nonces))


def sign_digest(private: ec.EllipticCurvePrivateKey, data: bytes) -> tuple[Digest, bytes]:
    digest = hashlib.sha256(data).digest()
    return (Digest(DigestAlgorithm.SHA256, digest),
            private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))


def test_an_honest_answer_is_accepted_and_kept(sim: RepositorySimulator,
                                               client: TrustClient) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    sim.add_key("release", private)
    sim.publish()
    bundle = client.refresh()
    assert [(v.key, v.number, v.state) for v in bundle.versions] == [("release", 1, "ACTIVE")]
    assert bundle.timestamp_version == 1
    assert client.trusted() == bundle
    digest, signature = sign_digest(private, b"artifact")
    verified = client.verify_signature(digest, signature, "release")
    assert (verified.key, verified.version, verified.state) == ("release", 1, "ACTIVE")


def test_versions_move_forward_across_refreshes(sim: RepositorySimulator,
                                                client: TrustClient) -> None:
    sim.add_key("release", ec.generate_private_key(ec.SECP256R1()))
    sim.publish()
    client.refresh()
    key = sim.keys[0]
    sim.set_key(key.rotate(now=sim.now, public_key_der=key.versions[0].public_key_der[:0] + (
        ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            *_spki_args())), hsm_id=b"\2" * 16))
    sim.now += 10
    sim.publish()
    bundle = client.refresh()
    assert bundle.timestamp_version == 2
    assert [(v.number, v.state) for v in bundle.versions] == [(1, "RETIRED"), (2, "ACTIVE")]


def _spki_args() -> tuple[object, object]:
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def test_verify_signature_follows_version_states(sim: RepositorySimulator,
                                                 client: TrustClient) -> None:
    privates = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
    from tests.unit.tuf_simulator import spki
    key = sim.add_key("k", privates[0])
    for private in privates[1:]:
        key = key.rotate(now=sim.now, public_key_der=spki(private), hsm_id=b"\3" * 16)
    # v1 RETIRED, v2 RETIRED -> DISABLED, v3 RETIRED -> REVOKED, v4 ACTIVE
    key = key.disable(2, now=sim.now).revoke(3, now=sim.now)
    sim.set_key(key)
    sim.publish()
    client.refresh()
    expected = {1: "RETIRED", 2: "state", 3: "revoked", 4: "ACTIVE"}
    for number, outcome in expected.items():
        digest, signature = sign_digest(privates[number - 1], b"x")
        if outcome in ("RETIRED", "ACTIVE"):
            assert client.verify_signature(digest, signature).state == outcome
        else:
            with pytest.raises(TrustError) as refused:
                client.verify_signature(digest, signature, "k")
            assert refused.value.check == outcome
    stranger = ec.generate_private_key(ec.SECP256R1())
    digest, signature = sign_digest(stranger, b"x")
    with pytest.raises(TrustError, match="does not verify") as unknown:
        client.verify_signature(digest, signature)
    assert unknown.value.check == "unknown-key"
    with pytest.raises(TrustError, match="no key named"):
        client.verify_signature(digest, signature, "nope")


def test_an_expired_trusted_state_no_longer_verifies(sim: RepositorySimulator,
                                                     client: TrustClient) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    sim.add_key("k", private)
    sim.publish()
    client.refresh()
    sim.now += sim.expiry.timestamp_seconds + 1
    digest, signature = sign_digest(private, b"x")
    with pytest.raises(TrustError) as refused:
        client.verify_signature(digest, signature)
    assert refused.value.check == "expired"


# -- attacks: each builds a malicious answer after two honest refreshes ----------------------

Attack = Callable[[RepositorySimulator, bytes], tuple[TrustResponse, bytes]]


def _rollback_timestamp(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    # A stale (or malicious) signer vouches for an old publication with a fresh statement.
    return sim.respond(nonce, published=sim.history[0]), nonce


def _rollback_snapshot(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    old = sim.history[0]
    stamp = build_timestamp(sim.history[-1].publication.timestamp_version + 1,
                            sim.now + 600, old.publication.snapshot_version, old.snapshot)
    stamp.sign(sim.online["local"].signer)
    forged = replace(old, publication=replace(
        old.publication, timestamp_version=stamp.signed.version), timestamp=stamp.to_bytes())
    return sim.respond(nonce, published=forged), nonce


def _freeze(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    sim.publish(at=sim.now - 2 * sim.expiry.timestamp_seconds)
    return sim.respond(nonce), nonce


def _replay(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    captured = sim.respond(b"c" * 32)
    return captured, nonce


def _mix_targets(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    older = sim.history[-1]
    newest = sim.publish()
    return sim.respond(nonce, published=replace(newest, targets=older.targets,
                                                bundle=older.bundle)), nonce


def _mix_snapshot(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    older = sim.history[-1]
    newest = sim.publish()
    return sim.respond(nonce, published=replace(newest, snapshot=older.snapshot)), nonce


def _wrong_metadata_key(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    sim.publish(signer=CryptoSigner(ec.generate_private_key(ec.SECP256R1())))
    return sim.respond(nonce), nonce


def _wrong_freshness_key(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    impostor = SoftwareOnlineKey("local")
    answer = sim.respond(nonce, key=impostor)
    statement = answer.statement.replace(impostor.online.key_id.encode(),
                                         sim.online["local"].online.key_id.encode())
    return replace(answer, statement=statement, signature=impostor.sign_statement(statement),
                   key_id=sim.online["local"].online.key_id), nonce


def _tampered_bundle(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    honest = sim.history[-1]
    tampered = honest.bundle.replace(b'"REVOKED"', b'"ACTIVE"').replace(b'"state"', b'"state" ')
    return sim.respond(nonce, published=replace(honest, bundle=tampered)), nonce


def _endless_data(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    return sim.respond(nonce, bundle=b"{" * (5 * 1024 * 1024)), nonce


def _other_region(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    # A valid statement, honestly signed, but by region eu: the client asked for local.
    return sim.respond(nonce, statement_region="eu"), nonce


def _old_statement(sim: RepositorySimulator, nonce: bytes) -> tuple[TrustResponse, bytes]:
    return sim.respond(nonce, at=sim.now - 3600), nonce


ATTACKS: dict[str, tuple[Attack, set[str]]] = {
    "rollback of the timestamp": (_rollback_timestamp, {"rollback"}),
    "rollback of the snapshot": (_rollback_snapshot, {"rollback"}),
    "freeze (expired timestamp)": (_freeze, {"expired"}),
    "replay of a captured answer": (_replay, {"nonce"}),
    "mix-and-match targets": (_mix_targets, {"rollback", "mix-and-match"}),
    "mix-and-match snapshot": (_mix_snapshot, {"mix-and-match"}),
    "metadata signed by a wrong key": (_wrong_metadata_key, {"signature"}),
    "freshness signed by a wrong key": (_wrong_freshness_key, {"signature"}),
    "tampered bundle": (_tampered_bundle, {"mix-and-match"}),
    "endless data": (_endless_data, {"size"}),
    "statement for another region": (_other_region, {"region"}),
    "stale statement time": (_old_statement, {"expired"}),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_are_refused_and_the_trusted_state_is_untouched(
    name: str, sim: RepositorySimulator, client: TrustClient
) -> None:
    attack, checks = ATTACKS[name]
    private = ec.generate_private_key(ec.SECP256R1())
    key = sim.add_key("release", private)
    sim.publish()
    client.refresh()
    sim.set_key(key.revoke(1, now=sim.now))
    sim.now += 60
    sim.publish()
    client.refresh()
    before = client.state_path.read_bytes()

    answer, nonce = attack(sim, NONCE)
    with pytest.raises(TrustError) as refused:
        client.accept(answer, NONCE if nonce is None else nonce)

    assert refused.value.check in checks, refused.value.diagnostics()
    assert client.state_path.read_bytes() == before
    digest, signature = sign_digest(private, b"signed before the revocation")
    with pytest.raises(TrustError) as still_revoked:
        client.verify_signature(digest, signature)
    assert still_revoked.value.check == "revoked"
    # The client is not wedged: the next honest answer is accepted.
    sim.now += 1
    sim.publish()
    assert client.refresh().timestamp_version == sim.history[-1].publication.timestamp_version


def test_a_root_rotation_is_followed(sim: RepositorySimulator, client: TrustClient) -> None:
    from kms.tuf.signing import rotate_root
    sim.publish()
    client.refresh()
    new_custodians = [CryptoSigner.generate_ed25519() for _ in range(2)]
    new_root = rotate_root(sim.root, sim.custodians[:2], new_custodians, 2,
                           [k.online.tuf_key() for k in sim.online.values()],
                           expires=sim.now + 86_400)
    sim.now += 1
    sim.publish()
    answer = sim.respond(NONCE)
    bundle = client.accept(replace(answer, roots=(new_root.to_bytes(),)), NONCE)
    assert bundle.root_version == 2
    # A root signed only by the new custodians (not the old threshold) is refused.
    bad = rotate_root(new_root, new_custodians, [CryptoSigner.generate_ed25519()], 1,
                      [k.online.tuf_key() for k in sim.online.values()],
                      expires=sim.now + 86_400)
    unsigned = Metadata.from_bytes(bad.to_bytes())
    unsigned.signatures.clear()
    sim.now += 1
    sim.publish()
    before = client.state_path.read_bytes()
    with pytest.raises(TrustError) as refused:
        client.accept(replace(sim.respond(NONCE), roots=(unsigned.to_bytes(),)), NONCE)
    assert refused.value.check == "signature"
    assert client.state_path.read_bytes() == before
