"""Verifying what Signet signed: DSSE-enveloped statements and cosign image signatures.

Keys come from a :class:`KeyResolver` (key id → public key, state, name, version): the verified
trust bundle (:class:`BundleKeyResolver`, the default where a TUF root is pinned), a running
cluster (:class:`ClusterKeyResolver`), a local JSON file (:class:`FileKeyResolver`), and the
signer's own key state (:func:`resolver_from_keys`).

Signature checks raise ``VerificationError``. Policy evaluation returns every rule it checked
(:class:`Decision`), so each decision can be printed; ``Decision.require_allowed`` raises.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from kms.domain.provenance import RuleResult, VerificationPolicy, evaluate
from kms.errors import InvalidArgument, KmsError
from kms.ports import VersionedKey
from signer.client import SignetClient
from signer.convert import public_key_pem
from signer.errors import SignetError
from signer.payloads import VerificationError
from signer.payloads.dsse import INTOTO_PAYLOAD_TYPE, Envelope, verify_envelope
from signer.payloads.intoto import Statement
from signer.payloads.simplesigning import ImageReference, SimpleSigningPayload
from signer.trust import BundleVersion, TrustedBundle, TrustError, parse_bundle_time

# RETIRED versions verify (DESIGN.md: "verify only, still in the bundle"); DISABLED is a
# reversible pause of signing. REVOKED (compromise), DESTROYED and DESTROY_SCHEDULED do not.
VERIFYING_STATES = frozenset({"ACTIVE", "RETIRED", "DISABLED"})


@dataclass(frozen=True)
class ResolvedKey:
    """One key version as a resolver knows it. ``refusal``, when set, says why the resolver's
    rules refuse this version's signatures whatever its state (the bundle's stricter rules)."""

    key_id: str
    key_name: str
    version: int
    state: str
    public_key_pem: str
    refusal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "key": self.key_name, "version": self.version,
                "state": self.state, "public_key_pem": self.public_key_pem}


class KeyResolver(Protocol):
    def resolve(self, key_id: str) -> ResolvedKey:
        """The key version with this id; raises ``VerificationError`` if unknown."""
        ...

    def all_keys(self) -> Sequence[ResolvedKey]:
        """Every key version known, for signatures that carry no key id."""
        ...


class StaticKeyResolver:
    """A fixed set of key versions."""

    def __init__(self, keys: Iterable[ResolvedKey]) -> None:
        self._keys = {k.key_id: k for k in keys}

    def resolve(self, key_id: str) -> ResolvedKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise VerificationError(f"key id {key_id or '(none)'} is not a known key") from None

    def all_keys(self) -> Sequence[ResolvedKey]:
        return list(self._keys.values())


def _from_key_document(document: Any) -> list[ResolvedKey]:
    if not isinstance(document, dict) or not isinstance(document.get("versions"), list):
        raise InvalidArgument("each key entry needs 'name' and a 'versions' list")
    try:
        return [
            ResolvedKey(str(v["key_id"]), str(document["name"]), int(v["number"]),
                        str(v["state"]), str(v["public_key_pem"]))
            for v in document["versions"]
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidArgument(f"key entry {document.get('name')!r} is malformed: {error}") from None


class FileKeyResolver(StaticKeyResolver):
    """Keys from a JSON file: the output of ``signet key show NAME -o json``, a list of such
    objects, or ``{"keys": [...]}``. Raises ``InvalidArgument`` for a malformed file."""

    def __init__(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InvalidArgument(f"cannot read keys from {path}: {error}") from None
        if isinstance(data, dict) and "keys" in data:
            data = data["keys"]
        documents = data if isinstance(data, list) else [data]
        super().__init__(k for d in documents for k in _from_key_document(d))


class ClusterKeyResolver:
    """Keys asked of a running signer with ``GetPublicKey`` (any authenticated caller may), for
    the named keys: every version from 1 until the signer answers NOT_FOUND."""

    def __init__(
        self, client: SignetClient, key_names: Iterable[str], *, max_age_seconds: float = 30.0
    ) -> None:
        self._client = client
        self._names = tuple(key_names)
        self._max_age = max_age_seconds
        self._cache: StaticKeyResolver | None = None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def _load(self) -> StaticKeyResolver:
        # Re-read after max_age so a revocation reaches long-running verifiers (admission).
        with self._lock:
            if self._cache is None or time.monotonic() - self._loaded_at > self._max_age:
                self._cache = self._fetch()
                self._loaded_at = time.monotonic()
            return self._cache

    def _fetch(self) -> StaticKeyResolver:
        found: list[ResolvedKey] = []
        for name in self._names:
            version = 1
            while True:
                try:
                    pub = self._client.public_key(name, version)
                except SignetError as error:
                    if error.code.name == "NOT_FOUND":
                        break
                    raise
                found.append(ResolvedKey(pub.key_id, pub.key, pub.version, pub.state, pub.pem))
                version += 1
        return StaticKeyResolver(found)

    def resolve(self, key_id: str) -> ResolvedKey:
        return self._load().resolve(key_id)

    def all_keys(self) -> Sequence[ResolvedKey]:
        return self._load().all_keys()


class TrustedBundleSource(Protocol):
    """Where a :class:`BundleKeyResolver` gets verified bundles (``signer.trust.TrustClient``)."""

    def refresh(self) -> TrustedBundle:
        """Fetch, verify and keep a new bundle; raises ``TrustError`` or ``SignetError``."""
        ...

    def trusted(self) -> TrustedBundle:
        """The kept bundle, re-verified; raises ``TrustError`` (none, expired, damaged)."""
        ...


# The trust bundle's rules (docs/adr/0007): ACTIVE, and RETIRED until its not_after, verify.
BUNDLE_VERIFYING_STATES = frozenset({"ACTIVE", "RETIRED"})


def _bundle_refusal(version: BundleVersion, now: float) -> str | None:
    if version.revoked or version.state == "REVOKED":
        return "is REVOKED in the trust bundle"
    if version.state not in BUNDLE_VERIFYING_STATES:
        return (f"is {version.state} in the trust bundle (only ACTIVE and RETIRED versions "
                "verify)")
    if version.not_after is not None and parse_bundle_time(version.not_after) <= now:
        return f"stopped being valid at {version.not_after} (trust bundle not_after)"
    return None


class BundleKeyResolver:
    """Keys from the verified trust bundle (DESIGN I5): every version of every key, with the
    bundle's rules applied when a key is resolved — ACTIVE verifies, RETIRED verifies until its
    ``not_after``, REVOKED, DISABLED, DESTROY_SCHEDULED and DESTROYED do not.

    With ``online`` the bundle is refreshed (fresh nonce, full chain check) on first use and
    again once it is ``refresh_seconds`` old, so a revocation reaches a long-running verifier
    (admission) within that time. A refresh that fails is a ``VerificationError``: this
    resolver fails closed rather than fall back to an older bundle. Without ``online`` the
    kept state is used until its timestamp expires. Thread-safe.
    """

    def __init__(self, source: TrustedBundleSource, *, online: bool = True,
                 refresh_seconds: float = 5.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._online = online
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._bundle: TrustedBundle | None = None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def bundle(self) -> TrustedBundle:
        """The bundle in use, refreshed first when it is older than ``refresh_seconds``.
        Raises ``VerificationError`` when no bundle can be had."""
        with self._lock:
            stale = self._monotonic() - self._loaded_at >= self._refresh_seconds
            if self._bundle is None or stale:
                try:
                    self._bundle = (self._source.refresh() if self._online
                                    else self._source.trusted())
                except TrustError as error:
                    raise VerificationError(
                        f"the trust bundle was refused: {error.diagnostics()}") from None
                except SignetError as error:
                    raise VerificationError(
                        f"cannot refresh the trust bundle: {error.message} "
                        f"({error.code.name})") from None
                self._loaded_at = self._monotonic()
            return self._bundle

    def _resolved(self, version: BundleVersion) -> ResolvedKey:
        return ResolvedKey(version.key_id, version.key, version.number, version.state,
                           version.public_key_pem, _bundle_refusal(version, self._clock()))

    def resolve(self, key_id: str) -> ResolvedKey:
        bundle = self.bundle()
        for version in bundle.versions:
            if version.key_id == key_id:
                return self._resolved(version)
        raise VerificationError(f"key id {key_id or '(none)'} is not in the trust bundle "
                                f"(key state at etcd revision {bundle.etcd_revision})")

    def all_keys(self) -> Sequence[ResolvedKey]:
        return [self._resolved(v) for v in self.bundle().versions]


def resolver_from_keys(keys: Iterable[VersionedKey]) -> StaticKeyResolver:
    """Every version of the given key records (the signer's own watched state)."""
    return StaticKeyResolver(
        ResolvedKey(v.key_id, vk.key.name, v.number, v.state.value,
                    public_key_pem(v.public_key_der))
        for vk in keys for v in vk.key.versions
    )


def verify_message(key: ResolvedKey, message: bytes, signature: bytes) -> ResolvedKey:
    """Verify a signature over ``message`` (SHA-256; ECDSA P-256 or RSA-PSS with salt 32).
    Returns the key; raises ``VerificationError`` for a key state that does not verify
    (REVOKED, DESTROYED, …), an unsupported key type or a bad signature."""
    where = f"key {key.key_name} version {key.version}"
    if key.refusal is not None:
        raise VerificationError(f"{where} {key.refusal}; its signatures are not accepted")
    if key.state not in VERIFYING_STATES:
        raise VerificationError(f"{where} is {key.state}; its signatures are not accepted")
    public = serialization.load_pem_public_key(key.public_key_pem.encode())
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message,
                          padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        else:
            raise VerificationError(f"{where} is not an ECDSA or RSA key; cannot verify")
    except InvalidSignature:
        raise VerificationError(f"the signature does not verify with {where}") from None
    return key


def _trusted(policy: VerificationPolicy, key: ResolvedKey) -> ResolvedKey:
    if not policy.is_trusted_key(key.key_name):
        raise VerificationError(
            f"key {key.key_name} is not trusted by the policy (trusted_keys: "
            + ", ".join(policy.trusted_keys) + ")"
        )
    return key


@dataclass(frozen=True)
class Decision:
    """Every rule checked for one artifact, in order."""

    subject: str
    results: tuple[RuleResult, ...]
    signed_by: tuple[ResolvedKey, ...] = field(default=())
    statement_subjects: frozenset[str] | None = None  # sha256:<hex> of a parsed statement

    @property
    def allowed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def first_failure(self) -> RuleResult | None:
        return next((r for r in self.results if not r.passed), None)

    def require_allowed(self) -> None:
        """Raises ``VerificationError`` naming the first failing rule."""
        failure = self.first_failure
        if failure is not None:
            raise VerificationError(f"{self.subject}: {failure.message}")

    def lines(self) -> list[str]:
        verdict = "PASS" if self.allowed else "FAIL"
        out = [f"{verdict} {self.subject}"]
        out += [f"  [{'pass' if r.passed else 'FAIL'}] {r.rule}: {r.message}"
                for r in self.results]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "allowed": self.allowed,
                "rules": [r.to_dict() for r in self.results],
                "signed_by": [k.to_dict() for k in self.signed_by]}


def _result(rule: str, check: Any) -> tuple[RuleResult, Any]:
    try:
        value = check()
    except KmsError as error:
        return RuleResult(rule, False, f"rule '{rule}' failed: {error.diagnostics()}"), None
    return RuleResult(rule, True, "ok"), value


def verify_attestation(
    envelope_json: bytes,
    resolver: KeyResolver,
    policy: VerificationPolicy,
    *,
    now: float,
    image: ImageReference | None = None,
) -> Decision:
    """Check a DSSE-enveloped statement: signature by a trusted verifying key, payload type,
    the image digest among the subjects (when ``image`` is given), and the policy's statement
    rules. Never raises for a failing check; each one is a rule result."""
    results: list[RuleResult] = []
    envelope_result, envelope = _result("envelope", lambda: Envelope.from_json(envelope_json))
    results.append(envelope_result)
    if envelope is None:
        return Decision("attestation", tuple(results))

    def verify_one(keyid: str, message: bytes, sig: bytes) -> ResolvedKey:
        return verify_message(_trusted(policy, resolver.resolve(keyid)), message, sig)

    signature_result, signers = _result(
        "signature", lambda: verify_envelope(envelope, verify_one))
    results.append(signature_result)
    results.append(_result("payload-type", lambda: _payload_type(envelope))[0])
    statement_result, statement = _result(
        "statement", lambda: Statement.from_json(envelope.payload))
    results.append(statement_result)
    subject = f"attestation for {image}" if image else "attestation"
    if statement is None:
        return Decision(subject, tuple(results), tuple(signers or ()))
    if image is not None:
        results.append(_result("subject-digest", lambda: _subject_matches(statement, image))[0])
    results.extend(evaluate(policy.statement_rules(now), statement.to_dict()))
    return Decision(subject, tuple(results), tuple(signers or ()), statement.subject_digests())


def _payload_type(envelope: Envelope) -> None:
    if envelope.payload_type != INTOTO_PAYLOAD_TYPE:
        raise VerificationError(
            f"payloadType is {envelope.payload_type!r}, expected {INTOTO_PAYLOAD_TYPE!r}")


def _subject_matches(statement: Statement, image: ImageReference) -> None:
    image.require_digest()
    if image.digest not in statement.subject_digests():
        raise VerificationError(f"{image.digest} is not a subject of the statement")


def verify_image_signature(
    image: ImageReference,
    payload: bytes,
    signature: bytes,
    resolver: KeyResolver,
    policy: VerificationPolicy,
    *,
    key_id: str | None = None,
) -> Decision:
    """Check a cosign simple-signing signature for a digest-pinned image: pinned, signed by a
    trusted verifying key (the one named by ``key_id``, else any known one), payload naming
    this image and digest, registry allowed. Each check is a rule result."""
    results: list[RuleResult] = []
    pinned, _ = _result("image-pinned-by-digest", image.require_digest)
    results.append(pinned)

    def find_signer() -> ResolvedKey:
        candidates = [resolver.resolve(key_id)] if key_id else list(resolver.all_keys())
        failures = []
        for candidate in candidates:
            try:
                return verify_message(_trusted(policy, candidate), payload, signature)
            except VerificationError as error:
                failures.append(error.diagnostics())
        raise VerificationError(
            "no trusted, verifying key signed this image: "
            + ("; ".join(failures) or "no keys known"))

    signature_result, signer = _result("image-signature", find_signer)
    results.append(signature_result)
    results.append(_result(
        "image-payload", lambda: SimpleSigningPayload.from_json(payload).check_matches(image))[0])
    registry_rule = policy.registry_rule()
    if registry_rule is not None:
        results.append(_result(
            registry_rule.name, lambda: registry_rule.check_registry(image.name))[0])
    return Decision(f"image {image}", tuple(results), (signer,) if signer else ())
