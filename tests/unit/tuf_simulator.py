"""An in-memory Signet trust repository for client tests (in the spirit of python-tuf's
``tests/repository_simulator.py``): real custodian and online keys in software, the real pure
builders from ``kms.tuf.repository``, and a transport that answers GetTrustBundle."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from kms.domain.keys import Algorithm, Key, Replication
from kms.tuf.freshness import FreshnessStatement
from kms.tuf.repository import (
    ExpiryPolicy,
    OnlineKey,
    Publication,
    build_timestamp,
    build_trust_bundle,
    plan_publication,
    tuf_key,
)
from kms.tuf.signing import init_root
from signer.trust import TrustResponse


def spki(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class SoftwareOnlineKey:
    region: str
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @property
    def online(self) -> OnlineKey:
        return OnlineKey(self.region, spki(self.private), b"\0" * 16, 0.0)

    @property
    def signer(self) -> CryptoSigner:
        return CryptoSigner(self.private, tuf_key(spki(self.private)))

    def sign_statement(self, statement: bytes) -> bytes:
        return self.private.sign(statement, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class Published:
    """One publication's files, as a server would return them."""

    publication: Publication
    timestamp: bytes
    snapshot: bytes
    targets: bytes
    bundle: bytes


class RepositorySimulator:
    """Publishes like ``TufPublisher`` (same planning, same builders) and answers like
    ``TrustBundleService``, with software keys."""

    def __init__(self, *, now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self.custodians = [CryptoSigner.generate_ed25519() for _ in range(3)]
        self.online = {"local": SoftwareOnlineKey("local"), "eu": SoftwareOnlineKey("eu")}
        self.root = init_root(self.custodians[:2], 2,
                              [k.online.tuf_key() for k in self.online.values()],
                              expires=self.now + 365 * 86_400,
                              extra_custodian_keys=[self.custodians[2].public_key])
        self.root_bytes = self.root.to_bytes()
        self.keys: list[Key] = []
        self.revision = 10
        self.history: list[Published] = []
        self.expiry = ExpiryPolicy(timestamp_seconds=3600, timestamp_resign_seconds=600,
                                   metadata_seconds=7200)

    # -- state changes --------------------------------------------------------------------

    def add_key(self, name: str, private: ec.EllipticCurvePrivateKey) -> Key:
        key = Key.new(name=name, algorithm=Algorithm.ECDSA_P256_SHA256,
                      replication=Replication.REGIONAL, public_key_der=spki(private),
                      hsm_id=b"\1" * 16, now=self.now)
        self.set_key(key)
        return key

    def set_key(self, key: Key) -> None:
        self.keys = [k for k in self.keys if k.name != key.name] + [key]
        self.revision += 1

    def publish(self, *, signer: CryptoSigner | None = None,
                at: float | None = None) -> Published:
        """Publish the current key state (``at``: the publisher's clock)."""
        now = self.now if at is None else at
        self.revision += 1  # as if key state changed, so every call publishes
        previous = self.history[-1].publication if self.history else None
        bundle = build_trust_bundle(self.keys, [k.online for k in self.online.values()],
                                    regions=["local"], etcd_revision=self.revision,
                                    generated_at=now)
        online_ids = [k.online.key_id for k in self.online.values()]
        plan = plan_publication(previous, root_version=1, online_key_ids=online_ids,
                                bundle=bundle, bundle_etcd_revision=self.revision, now=now,
                                expiry=self.expiry)
        assert plan is not None
        assert plan.targets is not None
        assert plan.snapshot is not None
        online_signer = signer or self.online["local"].signer
        targets = self._sign(plan.targets, online_signer)
        snapshot = self._sign(plan.snapshot, online_signer)
        pub = plan.publication
        stamp = self._sign(build_timestamp(pub.timestamp_version, pub.timestamp_expires,
                                           pub.snapshot_version, snapshot), online_signer)
        published = Published(pub, stamp, snapshot, targets, bundle)
        self.history.append(published)
        return published

    @staticmethod
    def _sign(metadata: Metadata[Any], signer: CryptoSigner) -> bytes:
        metadata.sign(signer)
        return metadata.to_bytes()

    # -- answers --------------------------------------------------------------------------

    def respond(self, nonce: bytes, region: str = "local", *, published: Published | None = None,
                statement_region: str | None = None, key: SoftwareOnlineKey | None = None,
                at: float | None = None, **overrides: Any) -> TrustResponse:
        """A GetTrustBundle answer for ``nonce`` over ``published`` (default: the latest),
        with a freshness statement signed by ``key`` (default: the region's online key).
        ``overrides`` replace response fields after signing (tampering)."""
        files = published or self.history[-1]
        signer = key or self.online[statement_region or region]
        statement = FreshnessStatement.create(
            nonce=nonce, region=statement_region or region,
            timestamp_version=files.publication.timestamp_version,
            bundle_sha256=hashlib.sha256(files.bundle).hexdigest(),
            etcd_revision=self.revision, now=self.now if at is None else at,
            key_id=signer.online.key_id,
        ).to_bytes()
        response = TrustResponse(
            roots=(), timestamp=files.timestamp, snapshot=files.snapshot,
            targets=files.targets, bundle=files.bundle, statement=statement,
            signature=signer.sign_statement(statement), key_id=signer.online.key_id,
        )
        return replace(response, **overrides)


class SimulatorTransport:
    """``TrustTransport`` over a simulator; ``answer`` can be replaced to attack."""

    def __init__(self, simulator: RepositorySimulator) -> None:
        self.simulator = simulator
        self.requests: list[tuple[bytes, str, int]] = []

    def fetch(self, nonce: bytes, region: str, known_root_version: int) -> TrustResponse:
        self.requests.append((nonce, region, known_root_version))
        return self.simulator.respond(nonce, region)
