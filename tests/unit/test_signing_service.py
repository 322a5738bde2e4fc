"""Signing use-case logic with in-memory doubles: authorisation, batches, the post-sign check."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm, Key, Replication, VersionState
from kms.domain.policy import AccessPolicy
from kms.errors import (
    FailedPrecondition,
    InvalidArgument,
    KmsError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from kms.ports import GeneratedKeyPair, VersionedKey
from kms.signing import MAX_BATCH, Caller, Signature, SigningService

PIPELINE = Caller("spiffe://ci/pipeline")
POLICY = AccessPolicy.from_dict(
    {"version": 1, "bindings": [{"identity": "spiffe://ci/pipeline", "sign": ["release"]}]}
)


class SoftwareHsm:
    """An HSM double backed by ``cryptography`` keys (unit tests only)."""

    def __init__(self) -> None:
        self.keys: dict[bytes, ec.EllipticCurvePrivateKey] = {}
        self.on_sign: list[object] = []

    def add(self) -> GeneratedKeyPair:
        hsm_id = bytes([len(self.keys) + 1]) * 16
        self.keys[hsm_id] = ec.generate_private_key(ec.SECP256R1())
        der = self.keys[hsm_id].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return GeneratedKeyPair(hsm_id, der)

    async def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        for hook in self.on_sign:
            hook()  # type: ignore[operator]
        return self.keys[hsm_id].sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    async def sign_digests(
        self, hsm_id: bytes, algorithm: Algorithm, digests: Sequence[bytes]
    ) -> list[bytes | Exception]:
        return [await self.sign_digest(hsm_id, algorithm, d) for d in digests]


class FakeAudit:
    """Records entries in memory; can be made to fail like a full disk."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []
        self.failing = False

    async def record_signature(self, **fields: object) -> int:
        if self.failing:
            raise Unavailable("audit store full")
        self.entries.append(fields)
        return len(self.entries) - 1

    async def record_signatures(
        self, *, digests: Sequence[str], request_ids: Sequence[str], **common: object
    ) -> list[int]:
        if self.failing:
            raise Unavailable("audit store full")
        first = len(self.entries)
        self.entries += [{**common, "digest": d, "request_id": r}
                         for d, r in zip(digests, request_ids, strict=True)]
        return list(range(first, len(self.entries)))

    async def record_event(self, kind: str, fields: object) -> int:
        raise AssertionError("signing records signatures only")


class FakeView:
    def __init__(self, key: Key, policy: AccessPolicy | None = POLICY) -> None:
        self.record = VersionedKey(key, 7)
        self._policy = policy
        self.current = True
        self.revision = 7

    def require_current(self) -> None:
        if not self.current:
            raise Unavailable("lease lapsed")

    def key(self, name: str) -> VersionedKey:
        if name != self.record.key.name:
            raise NotFound(name)
        return self.record

    def policy(self) -> AccessPolicy | None:
        return self._policy

    async def wait_for_revision(self, revision: int, timeout: float) -> None:
        return None


AUDIT = FakeAudit()


def setup(policy: AccessPolicy | None = POLICY) -> tuple[SigningService, FakeView, SoftwareHsm]:
    global AUDIT  # noqa: PLW0603 (each test gets a fresh audit double)
    AUDIT = FakeAudit()
    hsm = SoftwareHsm()
    pair = hsm.add()
    key = Key.new(name="release", algorithm=Algorithm.ECDSA_P256_SHA256,
                  replication=Replication.REGIONAL, public_key_der=pair.public_key_der,
                  hsm_id=pair.hsm_id, now=0.0)
    view = FakeView(key, policy)
    service = SigningService(hsm=hsm, view=view, region="r1", audit=AUDIT)  # type: ignore[arg-type]
    return service, view, hsm


def digest(n: int = 0) -> Digest:
    return Digest(DigestAlgorithm.SHA256, n.to_bytes(32, "big"))


def verify(view: FakeView, signature: Signature, d: Digest) -> None:
    public = serialization.load_der_public_key(view.record.key.primary.public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature.signature, d.value, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_sign_returns_a_verifiable_signature_naming_key_version_and_revision() -> None:
    service, view, _ = setup()
    signature = asyncio.run(service.sign_digest(PIPELINE, "release", None, digest()))
    verify(view, signature, digest())
    assert (signature.key, signature.version, signature.revision, signature.region) == (
        "release", 1, 7, "r1")
    assert signature.key_id == view.record.key.primary.key_id


@pytest.mark.parametrize(
    ("caller", "key", "error"),
    [
        (Caller("spiffe://ci/other"), "release", PermissionDenied),
        (PIPELINE, "missing", PermissionDenied),  # not granted, so not even revealed
        (PIPELINE, "", InvalidArgument),
    ],
)
def test_refusals(caller: Caller, key: str, error: type[KmsError]) -> None:
    service, _, _ = setup()
    with pytest.raises(error):
        asyncio.run(service.sign_digest(caller, key, None, digest()))


def test_no_policy_means_nobody_signs() -> None:
    service, _, _ = setup(policy=None)
    with pytest.raises(PermissionDenied, match="no access policy"):
        asyncio.run(service.sign_digest(PIPELINE, "release", None, digest()))


def test_a_signer_that_cannot_prove_it_is_current_refuses() -> None:
    service, view, _ = setup()
    view.current = False
    with pytest.raises(Unavailable):
        asyncio.run(service.sign_digest(PIPELINE, "release", None, digest()))


def test_a_version_revoked_while_the_hsm_signs_is_discarded() -> None:
    service, view, hsm = setup()
    key = view.record.key

    def revoke() -> None:
        view.record = VersionedKey(
            key.with_versions((replace(key.primary, state=VersionState.REVOKED),)), 8
        )

    hsm.on_sign.append(revoke)
    with pytest.raises(FailedPrecondition, match="became REVOKED while signing"):
        asyncio.run(service.sign_digest(PIPELINE, "release", None, digest()))


def test_batch_items_fail_alone() -> None:
    service, view, _ = setup()
    bad = InvalidArgument("wrong length")
    sha512 = Digest(DigestAlgorithm.SHA512, bytes(64))
    results = asyncio.run(service.sign_batch(
        PIPELINE, "release", None, [digest(1), bad, sha512, digest(2), sha512]))
    assert results[1] is bad
    for refused in (results[2], results[4]):
        assert isinstance(refused, InvalidArgument)
        assert "not sha512" in str(refused)
    assert isinstance(results[0], Signature)
    assert isinstance(results[3], Signature)
    verify(view, results[0], digest(1))
    verify(view, results[3], digest(2))


def test_batch_signatures_carry_the_same_fields_as_a_single_one() -> None:
    service, _, _ = setup()
    single = asyncio.run(service.sign_digest(PIPELINE, "release", None, digest(1)))
    batch = asyncio.run(service.sign_batch(PIPELINE, "release", None, [digest(2), digest(3)]))
    for result in batch:
        assert isinstance(result, Signature)
        assert replace(result, signature=single.signature) == single
    assert batch[0] != batch[1]


def test_signatures_sharing_their_fields_equal_constructed_ones() -> None:
    shared = {"key": "k", "version": 2, "key_id": "ab", "algorithm": Algorithm.ED25519,
              "revision": 9, "region": "r1"}
    made = Signature.sharing([b"s1", b"s2"], **shared)
    assert made == [Signature(b"s1", **shared), Signature(b"s2", **shared)]
    assert hash(made[0]) == hash(Signature(b"s1", **shared))
    with pytest.raises(TypeError, match="needs exactly"):
        Signature.sharing([b"s"], key="k")


@pytest.mark.parametrize("size", [0, MAX_BATCH + 1])
def test_empty_or_oversized_batches_are_refused(size: int) -> None:
    service, _, _ = setup()
    with pytest.raises(InvalidArgument):
        asyncio.run(service.sign_batch(PIPELINE, "release", None, [digest()] * size))


def test_a_full_batch_signs_every_item_in_order() -> None:
    service, view, _ = setup()
    digests = [digest(i) for i in range(MAX_BATCH)]
    results = asyncio.run(service.sign_batch(PIPELINE, "release", None, list(digests)))
    assert len(results) == MAX_BATCH
    for d, result in zip(digests, results, strict=True):
        assert isinstance(result, Signature)
        verify(view, result, d)


def test_every_returned_signature_is_audited_first() -> None:
    service, _, _ = setup()
    signature = asyncio.run(
        service.sign_digest(PIPELINE, "release", None, digest(5), request_id="req-1")
    )
    assert AUDIT.entries == [{
        "identity": PIPELINE.identity, "key": "release", "version": 1,
        "key_id": signature.key_id, "digest": str(digest(5)), "request_id": "req-1",
        "revision": 7, "region": "r1",
    }]


def test_when_the_audit_log_fails_no_signature_is_returned() -> None:
    service, _, _ = setup()
    AUDIT.failing = True
    with pytest.raises(Unavailable, match="audit store full"):
        asyncio.run(service.sign_digest(PIPELINE, "release", None, digest()))
    results = asyncio.run(service.sign_batch(PIPELINE, "release", None, [digest(1), digest(2)]))
    assert all(isinstance(r, Unavailable) for r in results)
    assert AUDIT.entries == []


def test_batch_items_are_audited_under_their_own_request_ids() -> None:
    service, _, _ = setup()
    asyncio.run(service.sign_batch(PIPELINE, "release", None,
                                   [digest(1), InvalidArgument("bad"), digest(3)],
                                   request_id="batch"))
    assert sorted(str(e["request_id"]) for e in AUDIT.entries) == ["batch#0", "batch#2"]
