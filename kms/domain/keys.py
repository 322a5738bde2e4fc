"""The key model: keys, numbered versions and the rules for which version may sign.

Everything here is pure: no I/O, no clock reads, no randomness. State changes are functions that
return a new immutable ``Key``; the caller persists the result with a compare-and-swap and drops
it if the swap loses (Vault's ``RotateInMemory`` then ``Rotate``).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kms.errors import FailedPrecondition, InvalidArgument, NotFound

KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RECORD_SCHEMA = 1


class Algorithm(enum.Enum):
    """Signing algorithms an HSM key can have. The value is the wire and storage name."""

    ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
    ED25519 = "ed25519"
    RSA_PSS_3072_SHA256 = "rsa-pss-3072-sha256"

    @classmethod
    def parse(cls, name: str) -> Algorithm:
        """Accept the canonical name or the short CLI form (``ecdsa-p256``, ``rsa-pss-3072``)."""
        normalized = name.strip().lower()
        for algorithm in cls:
            if normalized in (algorithm.value, algorithm.short_name):
                return algorithm
        choices = ", ".join(a.short_name for a in cls)
        raise InvalidArgument(f"unknown key algorithm {name!r}; use one of: {choices}")

    @property
    def short_name(self) -> str:
        return {
            Algorithm.ECDSA_P256_SHA256: "ecdsa-p256",
            Algorithm.ED25519: "ed25519",
            Algorithm.RSA_PSS_3072_SHA256: "rsa-pss-3072",
        }[self]

    @property
    def digest_algorithms(self) -> frozenset[DigestAlgorithm]:
        """Digest algorithms this key signs. ECDSA and RSA-PSS are bound to SHA-256 by name;
        Ed25519 signs the digest bytes as its message, so any supported digest works."""
        return _SIGNED_DIGESTS[self._value_]

    @property
    def wrappable(self) -> bool:
        """Whether the HSM can export this key wrapped (SoftHSM cannot wrap EdDSA keys)."""
        return self is not Algorithm.ED25519


class DigestAlgorithm(enum.Enum):
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    @property
    def size(self) -> int:
        # Keyed by value: an Enum member hashes in Python, a str in C (once per signed digest).
        return _DIGEST_SIZES[self._value_]

    @classmethod
    def parse(cls, name: str) -> DigestAlgorithm:
        try:
            return cls(name.strip().lower())
        except ValueError:
            choices = ", ".join(d.value for d in cls)
            raise InvalidArgument(
                f"unknown digest algorithm {name!r}; use one of: {choices}"
            ) from None


_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}
_SIGNED_DIGESTS = {
    Algorithm.ECDSA_P256_SHA256.value: frozenset({DigestAlgorithm.SHA256}),
    Algorithm.ED25519.value: frozenset(DigestAlgorithm),
    Algorithm.RSA_PSS_3072_SHA256.value: frozenset({DigestAlgorithm.SHA256}),
}


@dataclass(frozen=True)
class Digest:
    """A digest to be signed, checked for a known algorithm and the right length."""

    algorithm: DigestAlgorithm
    value: bytes

    def __post_init__(self) -> None:
        if len(self.value) != self.algorithm.size:
            raise InvalidArgument(
                f"a {self.algorithm.value} digest is {self.algorithm.size} bytes, "
                f"got {len(self.value)}"
            )

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<hex>`` as used by OCI and the CLI."""
        algorithm_name, sep, hex_value = text.partition(":")
        if not sep:
            raise InvalidArgument(f"digest {text!r} must look like sha256:<hex>")
        algorithm = DigestAlgorithm.parse(algorithm_name)
        try:
            value = bytes.fromhex(hex_value)
        except ValueError:
            raise InvalidArgument(f"digest {text!r} is not hexadecimal after the colon") from None
        return cls(algorithm, value)

    def __str__(self) -> str:
        return f"{self.algorithm.value}:{self.value.hex()}"


class Replication(enum.Enum):
    MULTI_REGION = "multi-region"
    REGIONAL = "regional"

    @classmethod
    def parse(cls, name: str) -> Replication:
        try:
            return cls(name.strip().lower())
        except ValueError:
            raise InvalidArgument(
                f"unknown replication {name!r}; use multi-region or regional"
            ) from None


class VersionState(enum.Enum):
    ACTIVE = "ACTIVE"
    RETIRED = "RETIRED"
    DISABLED = "DISABLED"
    DESTROY_SCHEDULED = "DESTROY_SCHEDULED"
    DESTROYED = "DESTROYED"
    REVOKED = "REVOKED"


def key_id_for(public_key_der: bytes) -> str:
    """The key id: hex SHA-256 of the DER SubjectPublicKeyInfo."""
    return hashlib.sha256(public_key_der).hexdigest()


def validate_key_name(name: str) -> str:
    if not KEY_NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"key name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class KeyVersion:
    """One numbered version of a key: one key pair in the HSM.

    ``revoked_at`` is a permanent fact: once set, signatures by this version never verify,
    whatever happens to the key material afterwards (scheduled destruction, destruction).
    ``previous_state`` remembers what DISABLED and DESTROY_SCHEDULED return to.
    """

    number: int
    state: VersionState
    public_key_der: bytes
    hsm_id: bytes
    created_at: float
    state_changed_at: float
    key_id: str = field(default="")
    retire_at: float | None = None  # ACTIVE, non-primary, in its grace period until then
    retired_at: float | None = None
    revoked_at: float | None = None
    destroy_after: float | None = None  # DESTROY_SCHEDULED until then
    previous_state: VersionState | None = None

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"version numbers start at 1, got {self.number}")
        if not self.key_id:
            object.__setattr__(self, "key_id", key_id_for(self.public_key_der))

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def verifiable(self) -> bool:
        """Whether signatures by this version may be accepted by verifiers."""
        return not self.revoked and self.state in (VersionState.ACTIVE, VersionState.RETIRED)

    def moved(self, state: VersionState, now: float, **changes: Any) -> KeyVersion:
        return replace(self, state=state, state_changed_at=now, **changes)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "number": self.number,
            "state": self.state.value,
            "public_key_der": base64.b64encode(self.public_key_der).decode(),
            "hsm_id": self.hsm_id.hex(),
            "created_at": self.created_at,
            "state_changed_at": self.state_changed_at,
            "key_id": self.key_id,
        }
        for name in ("retire_at", "retired_at", "revoked_at", "destroy_after"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        if self.previous_state is not None:
            record["previous_state"] = self.previous_state.value
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyVersion:
        def optional_time(name: str) -> float | None:
            value = data.get(name)
            return None if value is None else float(value)

        previous = data.get("previous_state")
        return cls(
            number=int(data["number"]),
            state=VersionState(data["state"]),
            public_key_der=base64.b64decode(data["public_key_der"]),
            hsm_id=bytes.fromhex(data["hsm_id"]),
            created_at=float(data["created_at"]),
            state_changed_at=float(data["state_changed_at"]),
            key_id=str(data["key_id"]),
            retire_at=optional_time("retire_at"),
            retired_at=optional_time("retired_at"),
            revoked_at=optional_time("revoked_at"),
            destroy_after=optional_time("destroy_after"),
            previous_state=None if previous is None else VersionState(previous),
        )


@dataclass(frozen=True)
class Key:
    """A named key with numbered versions. Exactly one ACTIVE version is primary."""

    name: str
    algorithm: Algorithm
    replication: Replication
    versions: tuple[KeyVersion, ...]
    primary_version: int
    min_sign_version: int
    created_at: float
    rotation_period_seconds: int | None = None
    # The region whose HSM generated the key. A regional key signs only there; a multi-region
    # key is wrapped from there to every other region (kms.replication). None for records
    # written before regions existed: such a key signs wherever an HSM holds it.
    home_region: str | None = None

    def __post_init__(self) -> None:
        validate_key_name(self.name)
        numbers = [v.number for v in self.versions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"key {self.name}: versions must be 1..n in order, got {numbers}")
        if self.versions and not 1 <= self.primary_version <= len(self.versions):
            raise ValueError(f"key {self.name}: primary version {self.primary_version} missing")

    @classmethod
    def new(
        cls,
        *,
        name: str,
        algorithm: Algorithm,
        replication: Replication,
        public_key_der: bytes,
        hsm_id: bytes,
        now: float,
        rotation_period_seconds: int | None = None,
        home_region: str | None = None,
    ) -> Key:
        """A new key whose version 1 is the given HSM key pair, ACTIVE and primary, generated
        in ``home_region``."""
        validate_key_name(name)
        if replication is Replication.MULTI_REGION and not algorithm.wrappable:
            raise InvalidArgument(
                f"{algorithm.short_name} keys cannot be wrapped by the HSM, so they can only be "
                "regional; create it with replication 'regional'"
            )
        if rotation_period_seconds is not None and rotation_period_seconds <= 0:
            raise InvalidArgument("rotation period must be a positive number of seconds")
        version = KeyVersion(
            number=1,
            state=VersionState.ACTIVE,
            public_key_der=public_key_der,
            hsm_id=hsm_id,
            created_at=now,
            state_changed_at=now,
        )
        return cls(
            name=name,
            algorithm=algorithm,
            replication=replication,
            versions=(version,),
            primary_version=1,
            min_sign_version=1,
            created_at=now,
            rotation_period_seconds=rotation_period_seconds,
            home_region=home_region,
        )

    def version(self, number: int) -> KeyVersion:
        """The version with this number; raises ``NotFound``."""
        if 1 <= number <= len(self.versions):
            return self.versions[number - 1]
        raise NotFound(
            f"key {self.name!r} has no version {number} (latest is {len(self.versions)})"
        )

    @property
    def primary(self) -> KeyVersion:
        return self.version(self.primary_version)

    def signing_version(self, requested: int | None, digest: Digest) -> KeyVersion:
        """The version that signs this digest: the primary one unless a version is requested.

        Raises ``InvalidArgument`` for a digest algorithm the key does not sign, ``NotFound`` for
        a missing version, ``FailedPrecondition`` for a version that is not ACTIVE or is below
        ``min_sign_version``.
        """
        if digest.algorithm not in self.algorithm.digest_algorithms:
            allowed = ", ".join(sorted(d.value for d in self.algorithm.digest_algorithms))
            raise InvalidArgument(
                f"key {self.name!r} ({self.algorithm.value}) signs {allowed} digests, "
                f"not {digest.algorithm.value}"
            )
        version = self.primary if requested is None or requested == 0 else self.version(requested)
        if version.state is not VersionState.ACTIVE:
            raise FailedPrecondition(
                f"key {self.name!r} version {version.number} is {version.state.value} and "
                "cannot sign; use the primary version"
                f" ({self.primary_version})"
            )
        if version.number < self.min_sign_version:
            raise FailedPrecondition(
                f"key {self.name!r} version {version.number} is below the minimum signing "
                f"version {self.min_sign_version}"
            )
        return version

    # -- lifecycle transitions: pure; each returns a new Key or raises FailedPrecondition --

    def _replace_version(self, version: KeyVersion, **changes: Any) -> Key:
        versions = list(self.versions)
        versions[version.number - 1] = version
        return replace(self, versions=tuple(versions), **changes)

    def _refuse(self, version: KeyVersion, action: str, why: str = "") -> FailedPrecondition:
        revoked = ""
        if version.revoked and version.state is not VersionState.REVOKED:
            revoked = " (revoked)"
        return FailedPrecondition(
            f"cannot {action} key {self.name!r} version {version.number}: it is "
            f"{version.state.value}{revoked}" + (f"; {why}" if why else "")
        )

    def rotate(
        self, *, now: float, public_key_der: bytes, hsm_id: bytes, retire_grace_seconds: float = 0
    ) -> Key:
        """Add a new ACTIVE primary version. The previous primary, if ACTIVE, is RETIRED at
        once, or stays ACTIVE (not primary) until ``now + retire_grace_seconds``."""
        if retire_grace_seconds < 0:
            raise InvalidArgument("the retirement grace period cannot be negative")
        new = KeyVersion(
            number=len(self.versions) + 1,
            state=VersionState.ACTIVE,
            public_key_der=public_key_der,
            hsm_id=hsm_id,
            created_at=now,
            state_changed_at=now,
        )
        key = self
        previous = self.primary
        if previous.state is VersionState.ACTIVE:
            if retire_grace_seconds == 0:
                retired = previous.moved(VersionState.RETIRED, now, retired_at=now)
            else:
                retired = replace(previous, retire_at=now + retire_grace_seconds)
            key = key._replace_version(retired)
        return replace(key, versions=(*key.versions, new), primary_version=new.number)

    def due_for_rotation(self, now: float) -> bool:
        """Whether automatic rotation should add a version now."""
        if self.rotation_period_seconds is None:
            return False
        return now >= self.primary.created_at + self.rotation_period_seconds

    def retire_due(self, now: float) -> Key:
        """RETIRE non-primary ACTIVE versions whose grace period has ended."""
        key = self
        for version in self.versions:
            if (version.state is VersionState.ACTIVE and version.retire_at is not None
                    and version.retire_at <= now and version.number != self.primary_version):
                key = key._replace_version(
                    version.moved(VersionState.RETIRED, now, retired_at=now, retire_at=None)
                )
        return key

    def disable(self, number: int, *, now: float) -> Key:
        """Pause an ACTIVE or RETIRED version; ``enable`` undoes it."""
        version = self.version(number)
        if version.state not in (VersionState.ACTIVE, VersionState.RETIRED):
            raise self._refuse(version, "disable", "only ACTIVE or RETIRED versions can be")
        return self._replace_version(
            version.moved(VersionState.DISABLED, now, previous_state=version.state)
        )

    def enable(self, number: int, *, now: float) -> Key:
        """Return a DISABLED version to the state it was disabled from."""
        version = self.version(number)
        if version.state is not VersionState.DISABLED:
            raise self._refuse(version, "enable", "only DISABLED versions can be")
        restored = version.previous_state or VersionState.ACTIVE
        return self._replace_version(version.moved(restored, now, previous_state=None))

    def revoke(self, number: int, *, now: float) -> Key:
        """Mark a version compromised: final, and verification fails for it from now on.

        Revoking a revoked version changes nothing (so a retried request is harmless).
        A destroyed version cannot be revoked: nothing can sign or verify with it any more.
        """
        version = self.version(number)
        if version.revoked:
            return self
        if version.state is VersionState.DESTROYED:
            raise self._refuse(version, "revoke", "its key material is already gone")
        return self._replace_version(
            version.moved(VersionState.REVOKED, now, revoked_at=now, previous_state=None,
                          destroy_after=None, retire_at=None)
        )

    def schedule_destroy(self, number: int, *, now: float, waiting_seconds: float) -> Key:
        """Schedule the version's key material for destruction after a waiting period.

        The primary version cannot be scheduled while it is ACTIVE: rotate first.
        """
        if waiting_seconds < 0:
            raise InvalidArgument("the destruction waiting period cannot be negative")
        version = self.version(number)
        if version.state in (VersionState.DESTROY_SCHEDULED, VersionState.DESTROYED):
            raise self._refuse(version, "schedule destruction of")
        if version.state is VersionState.ACTIVE and number == self.primary_version:
            raise self._refuse(
                version, "schedule destruction of", "it is the primary version; rotate first"
            )
        return self._replace_version(
            version.moved(VersionState.DESTROY_SCHEDULED, now, previous_state=version.state,
                          destroy_after=now + waiting_seconds, retire_at=None)
        )

    def cancel_destroy(self, number: int, *, now: float) -> Key:
        """Undo a scheduled destruction: the version returns to its previous state."""
        version = self.version(number)
        if version.state is not VersionState.DESTROY_SCHEDULED:
            raise self._refuse(version, "cancel destruction of",
                               "only DESTROY_SCHEDULED versions can be")
        restored = version.previous_state or VersionState.RETIRED
        return self._replace_version(
            version.moved(restored, now, previous_state=None, destroy_after=None)
        )

    def destroy_due(self, now: float) -> tuple[Key, list[KeyVersion]]:
        """Move versions whose waiting period has ended to DESTROYED. Returns the new key and
        the versions destroyed now (their HSM objects are to be removed)."""
        key, destroyed = self, []
        for version in self.versions:
            if (version.state is VersionState.DESTROY_SCHEDULED
                    and version.destroy_after is not None and version.destroy_after <= now):
                gone = version.moved(VersionState.DESTROYED, now, previous_state=None,
                                     destroy_after=None)
                key = key._replace_version(gone)
                destroyed.append(gone)
        return key, destroyed

    def set_min_sign_version(self, number: int) -> Key:
        """Refuse signing with versions below ``number`` (at most the primary version)."""
        if not 1 <= number <= self.primary_version:
            raise InvalidArgument(
                f"min sign version must be between 1 and the primary version "
                f"{self.primary_version}, got {number}"
            )
        return replace(self, min_sign_version=number)

    def with_versions(self, versions: tuple[KeyVersion, ...], **changes: Any) -> Key:
        return replace(self, versions=versions, **changes)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "schema": RECORD_SCHEMA,
            "name": self.name,
            "algorithm": self.algorithm.value,
            "replication": self.replication.value,
            "versions": [v.to_dict() for v in self.versions],
            "primary_version": self.primary_version,
            "min_sign_version": self.min_sign_version,
            "created_at": self.created_at,
            "rotation_period_seconds": self.rotation_period_seconds,
        }
        # Written only when known, so records of keys without one stay byte-for-byte as before.
        if self.home_region is not None:
            record["home_region"] = self.home_region
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Key:
        if data.get("schema") != RECORD_SCHEMA:
            raise ValueError(f"unsupported key record schema {data.get('schema')!r}")
        period = data.get("rotation_period_seconds")
        return cls(
            name=str(data["name"]),
            algorithm=Algorithm(data["algorithm"]),
            replication=Replication(data["replication"]),
            versions=tuple(KeyVersion.from_dict(v) for v in data["versions"]),
            primary_version=int(data["primary_version"]),
            min_sign_version=int(data["min_sign_version"]),
            created_at=float(data["created_at"]),
            rotation_period_seconds=None if period is None else int(period),
            home_region=None if data.get("home_region") is None else str(data["home_region"]),
        )
