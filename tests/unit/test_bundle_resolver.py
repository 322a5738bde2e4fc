"""Verification keys from the trust bundle: the bundle's state rules over a fixed verified
bundle, and refreshing (a revocation shows up after the TTL) over the in-memory repository."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.domain.provenance import VerificationPolicy
from signer.errors import SignetError
from signer.payloads import VerificationError
from signer.payloads.simplesigning import ImageReference, SimpleSigningPayload
from signer.trust import BundleVersion, TrustClient, TrustedBundle, TrustError
from signer.verification import BundleKeyResolver, verify_image_signature, verify_message
from tests.unit.tuf_simulator import RepositorySimulator, SimulatorTransport

NOW = 1_800_000_000.0
MESSAGE = b"simple-signing payload"


def _time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


class SoftwareVersion:
    def __init__(self, number: int, state: str, *, revoked: bool = False,
                 not_after: float | None = None) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        public = self.private.public_key()
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        self.version = BundleVersion(
            key="release", algorithm="ECDSA_P256_SHA256", number=number, state=state,
            revoked=revoked, primary=state == "ACTIVE", key_id=hashlib.sha256(der).hexdigest(),
            public_key_pem=public.public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
            not_before=_time(NOW - 3600),
            not_after=None if not_after is None else _time(not_after), regions=("local",))

    def sign(self, message: bytes = MESSAGE) -> bytes:
        return self.private.sign(message, ec.ECDSA(hashes.SHA256()))


def fixed_bundle(*versions: SoftwareVersion, revision: int = 42) -> TrustedBundle:
    return TrustedBundle(
        region="local", root_version=1, timestamp_version=7,
        timestamp_expires=datetime.datetime.fromtimestamp(NOW + 86_400, datetime.UTC),
        etcd_revision=revision, generated_at=_time(NOW), freshness_time=_time(NOW),
        versions=tuple(v.version for v in versions), online_keys={})


class FixedSource:
    """A verified bundle handed out as is; counts refreshes; can fail like a refused answer."""

    def __init__(self, bundle: TrustedBundle) -> None:
        self.bundle = bundle
        self.refreshes = 0
        self.failure: Exception | None = None

    def refresh(self) -> TrustedBundle:
        self.refreshes += 1
        if self.failure is not None:
            raise self.failure
        return self.bundle

    def trusted(self) -> TrustedBundle:
        return self.bundle


@pytest.mark.parametrize(("state", "revoked", "not_after", "refusal"), [
    ("ACTIVE", False, None, None),
    ("RETIRED", False, None, None),
    ("RETIRED", False, NOW + 60, None),
    ("RETIRED", False, NOW - 1, "stopped being valid at"),
    ("REVOKED", True, NOW - 5, "is REVOKED in the trust bundle"),
    ("RETIRED", True, None, "is REVOKED in the trust bundle"),
    ("DISABLED", False, None, "is DISABLED in the trust bundle"),
    ("DESTROY_SCHEDULED", False, None, "is DESTROY_SCHEDULED in the trust bundle"),
    ("DESTROYED", False, None, "is DESTROYED in the trust bundle"),
])
def test_the_bundle_state_rules_decide_which_versions_verify(
    state: str, revoked: bool, not_after: float | None, refusal: str | None
) -> None:
    key = SoftwareVersion(3, state, revoked=revoked, not_after=not_after)
    resolver = BundleKeyResolver(FixedSource(fixed_bundle(key)), clock=lambda: NOW)
    resolved = resolver.resolve(key.version.key_id)
    assert (resolved.key_name, resolved.version, resolved.state) == ("release", 3, state)
    if refusal is None:
        assert verify_message(resolved, MESSAGE, key.sign()) == resolved
    else:
        with pytest.raises(VerificationError, match=f"key release version 3 {refusal}"):
            verify_message(resolved, MESSAGE, key.sign())


def test_an_image_signed_by_a_revoked_version_fails_naming_it() -> None:
    active, revoked = SoftwareVersion(2, "ACTIVE"), SoftwareVersion(1, "REVOKED", revoked=True)
    resolver = BundleKeyResolver(FixedSource(fixed_bundle(revoked, active)), clock=lambda: NOW)
    image = ImageReference.parse("registry.example.com/app@sha256:" + "5c" * 32)
    payload = SimpleSigningPayload.for_image(image).to_json()
    policy = VerificationPolicy.from_dict({"version": 1, "trusted_keys": ["release"]})
    assert verify_image_signature(image, payload, active.sign(payload), resolver,
                                  policy).allowed
    decision = verify_image_signature(image, payload, revoked.sign(payload), resolver, policy)
    assert not decision.allowed
    assert "key release version 1 is REVOKED in the trust bundle" in decision.lines()[2]


def test_an_unknown_key_id_is_refused_with_the_bundle_revision() -> None:
    resolver = BundleKeyResolver(FixedSource(fixed_bundle(SoftwareVersion(1, "ACTIVE"))))
    with pytest.raises(VerificationError, match=r"not in the trust bundle .*revision 42"):
        resolver.resolve("ab" * 32)


def test_the_bundle_is_refreshed_once_it_is_older_than_the_ttl() -> None:
    source = FixedSource(fixed_bundle(SoftwareVersion(1, "ACTIVE")))
    ticks = [0.0]
    resolver = BundleKeyResolver(source, refresh_seconds=5.0, monotonic=lambda: ticks[0])
    resolver.all_keys()
    ticks[0] = 4.9
    resolver.all_keys()
    assert source.refreshes == 1
    ticks[0] = 5.0
    resolver.all_keys()
    assert source.refreshes == 2


@pytest.mark.parametrize("failure", [
    TrustError("rollback", "the timestamp went back"),
    SignetError(grpc.StatusCode.UNAVAILABLE, "no signer answered"),
])
def test_a_failed_refresh_fails_closed(failure: Exception) -> None:
    key = SoftwareVersion(1, "ACTIVE")
    source = FixedSource(fixed_bundle(key))
    ticks = [0.0]
    resolver = BundleKeyResolver(source, refresh_seconds=1.0, monotonic=lambda: ticks[0])
    resolver.resolve(key.version.key_id)
    source.failure = failure
    ticks[0] = 2.0
    with pytest.raises(VerificationError, match="trust bundle"):
        resolver.resolve(key.version.key_id)


def test_offline_uses_the_kept_state_without_fetching() -> None:
    source = FixedSource(fixed_bundle(SoftwareVersion(1, "ACTIVE")))
    BundleKeyResolver(source, online=False).all_keys()
    assert source.refreshes == 0


def test_a_revocation_reaches_the_resolver_through_the_verified_chain(tmp_path: Path) -> None:
    sim = RepositorySimulator(now=NOW)
    private = ec.generate_private_key(ec.SECP256R1())
    key = sim.add_key("release", private)
    sim.publish()
    root = tmp_path / "1.root.json"
    root.write_bytes(sim.root_bytes)
    client = TrustClient(root, tmp_path / "state", "local", SimulatorTransport(sim),
                         clock=lambda: sim.now)
    ticks = [0.0]
    resolver = BundleKeyResolver(client, refresh_seconds=5.0, clock=lambda: sim.now,
                                 monotonic=lambda: ticks[0])
    signature = private.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    [version] = resolver.all_keys()
    assert verify_message(version, MESSAGE, signature).state == "ACTIVE"

    sim.now += 2
    sim.set_key(key.revoke(1, now=sim.now))
    sim.publish()
    ticks[0] = 5.0
    [version] = resolver.all_keys()
    with pytest.raises(VerificationError, match="version 1 is REVOKED in the trust bundle"):
        verify_message(version, MESSAGE, signature)
