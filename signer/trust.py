"""The trust-bundle verifier: what a verifier uses to learn which keys to trust (DESIGN I5).

``TrustClient`` starts from a pinned root (``1.root.json``, handed out of band) and accepts a
``GetTrustBundle`` answer only if all of this holds:

- the TUF chain verifies with python-tuf's own state machine (``TrustedMetadataSet``, the one
  ``tuf.ngclient.Updater`` uses): each newer root by the old and new root's thresholds, the
  timestamp, snapshot and targets by the keys root names, versions never below what this
  client trusted before (rollback), no expired final timestamp, snapshot or targets (freeze),
  snapshot and targets exactly the versions the timestamp and snapshot name (mix-and-match);
- the bundle's length and SHA-256 are the ones the targets metadata lists;
- the freshness statement is signed by the online key the bundle lists for the region asked,
  carries the nonce this client just sent, names that region, the timestamp version and the
  bundle hash just verified, an etcd revision not older than the bundle's nor than the one
  trusted before, and a time within ``max_clock_skew`` of the client's clock;
- nothing in the answer is larger than ``max_response_bytes``.

Only then is the new state written to ``state_dir`` (atomically: a temporary file, fsync,
rename). Any failure raises ``TrustError`` and leaves the previous state exactly as it was.

``verify_signature`` checks a signature against the trusted state (re-verified from the
pinned root each time, and refused once its timestamp has expired).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from tuf.api import exceptions as tuf_errors
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from kms.domain.keys import Digest, DigestAlgorithm, VersionState
from kms.errors import KmsError
from kms.tuf.freshness import MIN_NONCE_BYTES, FreshnessStatement
from kms.tuf.repository import BUNDLE_FORMAT, BUNDLE_TARGET
from signer._pb.signet.v1 import trust_pb2, trust_pb2_grpc
from signer.channels import open_channels
from signer.cluster import ClusterFile
from signer.errors import SignetError

STATE_FILE = "trust-state.json"
STATE_FORMAT = "signet-trust-state/v1"
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CLOCK_SKEW = 300.0
_VERIFIABLE = (VersionState.ACTIVE.value, VersionState.RETIRED.value)
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class TrustError(KmsError):
    """A trust bundle or a signature was refused. ``check`` names what failed (``rollback``,
    ``expired``, ``signature``, ``nonce``, ``region``, ``size``, ``revoked``…); the trusted
    state on disk is unchanged."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check

    def diagnostics(self) -> str:
        return f"trust check '{self.check}' failed: {self}"


@dataclass(frozen=True)
class TrustResponse:
    """One GetTrustBundle answer, as bytes (the transport's port)."""

    roots: tuple[bytes, ...]
    timestamp: bytes
    snapshot: bytes
    targets: bytes
    bundle: bytes
    statement: bytes
    signature: bytes
    key_id: str

    @property
    def size(self) -> int:
        return (sum(len(r) for r in self.roots) + len(self.timestamp) + len(self.snapshot)
                + len(self.targets) + len(self.bundle) + len(self.statement)
                + len(self.signature) + len(self.key_id))


class TrustTransport(Protocol):
    def fetch(self, nonce: bytes, region: str, known_root_version: int) -> TrustResponse:
        """Ask for the bundle. Raises ``SignetError`` (or ``KmsError``) when it cannot."""
        ...


@dataclass(frozen=True)
class BundleVersion:
    key: str
    algorithm: str
    number: int
    state: str
    revoked: bool
    primary: bool
    key_id: str
    public_key_pem: str
    not_before: str
    not_after: str | None
    regions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "algorithm": self.algorithm, "version": self.number,
                "state": self.state, "revoked": self.revoked, "primary": self.primary,
                "key_id": self.key_id, "public_key_pem": self.public_key_pem,
                "not_before": self.not_before, "not_after": self.not_after,
                "regions": list(self.regions)}


@dataclass(frozen=True)
class TrustedBundle:
    """The verified bundle with the metadata versions that vouch for it."""

    region: str
    root_version: int
    timestamp_version: int
    timestamp_expires: datetime.datetime
    etcd_revision: int
    generated_at: str
    freshness_time: str
    versions: tuple[BundleVersion, ...]
    online_keys: Mapping[str, Mapping[str, str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region, "root_version": self.root_version,
            "timestamp_version": self.timestamp_version,
            "timestamp_expires": self.timestamp_expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "etcd_revision": self.etcd_revision, "generated_at": self.generated_at,
            "freshness_time": self.freshness_time,
            "versions": [v.to_dict() for v in self.versions],
            "online_keys": {r: dict(k) for r, k in self.online_keys.items()},
        }


@dataclass(frozen=True)
class VerifiedVersion:
    """The key version a signature verified with."""

    key: str
    version: int
    key_id: str
    state: str
    algorithm: str


@dataclass(frozen=True)
class _State:
    roots: tuple[bytes, ...]  # versions 2.. above the pinned root, in order
    timestamp: bytes
    snapshot: bytes
    targets: bytes
    bundle: bytes
    statement: bytes
    region: str

    def to_bytes(self) -> bytes:
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")
        return json.dumps({
            "format": STATE_FORMAT, "region": self.region, "roots": [b64(r) for r in self.roots],
            "timestamp": b64(self.timestamp), "snapshot": b64(self.snapshot),
            "targets": b64(self.targets), "bundle": b64(self.bundle),
            "statement": b64(self.statement),
        }, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> _State:
        document = json.loads(data)
        if document.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")

        def raw(name: str) -> bytes:
            return base64.b64decode(document[name], validate=True)
        return cls(tuple(base64.b64decode(r, validate=True) for r in document["roots"]),
                   raw("timestamp"), raw("snapshot"), raw("targets"), raw("bundle"),
                   raw("statement"), str(document["region"]))


def _tuf_check(error: tuf_errors.RepositoryError) -> str:
    if isinstance(error, tuf_errors.ExpiredMetadataError):
        return "expired"
    if isinstance(error, tuf_errors.BadVersionNumberError):
        return "rollback"
    if isinstance(error, tuf_errors.UnsignedMetadataError):
        return "signature"
    if isinstance(error, tuf_errors.LengthOrHashMismatchError):
        return "mix-and-match"
    return "metadata"


class TrustClient:
    """Fetches and verifies trust bundles for one region, keeping the last trusted state in
    ``state_dir``. ``clock`` returns epoch seconds; ``nonce_source`` random bytes."""

    def __init__(
        self,
        root_path: Path,
        state_dir: Path,
        region: str,
        transport: TrustTransport | None = None,
        *,
        clock: Callable[[], float] = time.time,
        nonce_source: Callable[[int], bytes] = secrets.token_bytes,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    ) -> None:
        self._root_path = root_path
        self._state_dir = state_dir
        self._region = region
        self._transport = transport
        self._clock = clock
        self._nonce_source = nonce_source
        self._max_bytes = max_response_bytes
        self._skew = max_clock_skew

    @property
    def state_path(self) -> Path:
        return self._state_dir / STATE_FILE

    # -- fetching --------------------------------------------------------------------------

    def refresh(self) -> TrustedBundle:
        """Fetch a bundle with a fresh nonce, verify it (see the module docstring) and make it
        the trusted state. Raises ``TrustError`` (state unchanged) or the transport's error."""
        if self._transport is None:
            raise TrustError("transport", "this TrustClient has no transport to fetch with")
        previous = self._load_state()
        known_roots = 1 + (0 if previous is None else len(previous.roots))
        nonce = self._nonce_source(32)
        response = self._transport.fetch(nonce, self._region, known_roots)
        return self.accept(response, nonce)

    def accept(self, response: TrustResponse, nonce: bytes) -> TrustedBundle:
        """Verify ``response`` as the answer to ``nonce`` and store it. Raises ``TrustError``
        (state unchanged)."""
        if response.size > self._max_bytes:
            raise TrustError("size", f"the answer is {response.size} bytes, over the "
                                     f"{self._max_bytes} byte limit; refusing to parse it")
        if len(nonce) < MIN_NONCE_BYTES:
            raise TrustError("nonce", "the client nonce is too short")
        previous = self._load_state()
        stored_roots = () if previous is None else previous.roots
        new_state = _State(
            roots=stored_roots + tuple(response.roots), timestamp=response.timestamp,
            snapshot=response.snapshot, targets=response.targets, bundle=response.bundle,
            statement=response.statement, region=self._region,
        )
        trusted, bundle = self._verify_chain(new_state, previous)
        self._verify_freshness(response, nonce, trusted, bundle, previous)
        self._write_state(new_state)
        return _trusted_bundle(self._region, trusted, bundle, new_state.statement)

    # -- the trusted state -----------------------------------------------------------------

    def trusted(self) -> TrustedBundle:
        """The stored state, re-verified from the pinned root. Raises ``TrustError`` when
        there is none, it does not verify, or its timestamp has expired."""
        state = self._load_state()
        if state is None:
            raise TrustError("no-state", f"no trusted bundle in {self._state_dir}; fetch one "
                                         "first ('signet bundle fetch')")
        trusted, bundle = self._verify_chain(state, None)
        return _trusted_bundle(state.region, trusted, bundle, state.statement)

    def verify_signature(self, digest: Digest, signature: bytes,
                         key_name: str | None = None) -> VerifiedVersion:
        """The key version whose public key verifies ``signature`` over ``digest``, if the
        trusted bundle allows it: ACTIVE, or RETIRED before its ``not_after``.

        Raises ``TrustError``: ``unknown-key`` when no trusted version verifies it (including
        an unknown key name), ``revoked`` for a revoked version, ``state`` for DISABLED,
        DESTROY_SCHEDULED or DESTROYED, ``expired`` when the trusted state is too old.
        """
        bundle = self.trusted()
        candidates = [v for v in bundle.versions if key_name is None or v.key == key_name]
        if key_name is not None and not candidates:
            raise TrustError("unknown-key", f"the trusted bundle has no key named {key_name!r}")
        for version in candidates:
            if not _verifies(version, digest, signature):
                continue
            where = f"key {version.key!r} version {version.number} (key id {version.key_id[:16]}…)"
            if version.revoked or version.state == VersionState.REVOKED.value:
                raise TrustError("revoked", f"the signature is by {where}, which is REVOKED")
            if version.state not in _VERIFIABLE:
                raise TrustError("state", f"the signature is by {where}, which is "
                                          f"{version.state} and not trusted for verification")
            if (version.not_after is not None
                    and parse_bundle_time(version.not_after) <= self._clock()):
                raise TrustError("expired", f"{where} stopped being valid at "
                                            f"{version.not_after}")
            return VerifiedVersion(version.key, version.number, version.key_id, version.state,
                                   version.algorithm)
        scope = f"key {key_name!r}" if key_name else "any key"
        raise TrustError("unknown-key", f"the signature does not verify with {scope} in the "
                                        f"trusted bundle (revision {bundle.etcd_revision})")

    # -- internals ---------------------------------------------------------------------------

    def _load_state(self) -> _State | None:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise TrustError("state", f"cannot read {self.state_path}: {error}") from None
        try:
            return _State.from_bytes(data)
        except (ValueError, KeyError, TypeError) as error:
            raise TrustError("state", f"{self.state_path} is damaged ({error}); remove it to "
                                      "start again from the pinned root") from None

    def _write_state(self, state: _State) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._state_dir, prefix=".trust-state-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(state.to_bytes())
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise

    def _verify_chain(self, state: _State,
                      previous: _State | None) -> tuple[TrustedMetadataSet, dict[str, Any]]:
        try:
            pinned = self._root_path.read_bytes()
        except OSError as error:
            raise TrustError("root", f"cannot read the pinned root {self._root_path}: "
                                     f"{error.strerror}") from None
        try:
            trusted = TrustedMetadataSet(pinned, EnvelopeType.METADATA)
            trusted.reference_time = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
            for root in state.roots:
                trusted.update_root(root)
            # What we trusted before is loaded first as intermediate metadata, in
            # ngclient's order, so python-tuf refuses any version below it. It may have
            # expired meanwhile; that is fine for an intermediate.
            if previous is not None:
                with contextlib.suppress(tuf_errors.ExpiredMetadataError):
                    trusted.update_timestamp(previous.timestamp)
            try:
                trusted.update_timestamp(state.timestamp)
            except tuf_errors.EqualVersionNumberError:
                if previous is None or state.timestamp != previous.timestamp:
                    raise TrustError("rollback", "the timestamp has the version trusted before "
                                                 "but different content") from None
            if previous is not None:
                with contextlib.suppress(tuf_errors.RepositoryError):
                    trusted.update_snapshot(previous.snapshot, trusted=True)
            trusted.update_snapshot(state.snapshot)
            trusted.update_targets(state.targets)
            target = trusted.targets.targets.get(BUNDLE_TARGET)
            if target is None:
                raise TrustError("metadata", f"targets metadata does not list {BUNDLE_TARGET}")
            target.verify_length_and_hashes(state.bundle)
        except tuf_errors.RepositoryError as error:
            raise TrustError(_tuf_check(error), f"TUF metadata refused: {error}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise TrustError("metadata", f"malformed metadata: {error}") from None
        bundle = _parse_bundle(state.bundle)
        if previous is not None:
            before = _parse_bundle(previous.bundle)
            if int(bundle["etcd_revision"]) < int(before["etcd_revision"]):
                raise TrustError("rollback", f"the bundle is from etcd revision "
                                             f"{bundle['etcd_revision']}, older than the trusted "
                                             f"{before['etcd_revision']}")
        return trusted, bundle

    def _verify_freshness(self, response: TrustResponse, nonce: bytes,
                          trusted: TrustedMetadataSet, bundle: Mapping[str, Any],
                          previous: _State | None) -> None:
        online = bundle.get("online_keys", {}).get(self._region)
        if online is None:
            raise TrustError("region", f"the bundle lists no online key for region "
                                       f"{self._region!r}; ask a signer of that region")
        if response.key_id != online["key_id"]:
            raise TrustError("region", f"the freshness statement is signed by key "
                                       f"{response.key_id[:16]}…, not region {self._region!r}'s "
                                       f"online key {online['key_id'][:16]}…")
        public = serialization.load_pem_public_key(online["public_key_pem"].encode())
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise TrustError("signature", "the region's online key is not an ECDSA key")
        try:
            public.verify(response.signature, hashlib.sha256(response.statement).digest(),
                          ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise TrustError("signature", "the freshness statement's signature does not verify "
                                          f"with region {self._region!r}'s online key") from None
        try:
            statement = FreshnessStatement.from_bytes(response.statement)
        except (ValueError, TypeError) as error:
            raise TrustError("freshness", str(error)) from None
        self._check_statement(statement, response, nonce=nonce, trusted=trusted, bundle=bundle,
                              previous=previous)

    def _check_statement(self, statement: FreshnessStatement, response: TrustResponse, *,
                         nonce: bytes, trusted: TrustedMetadataSet, bundle: Mapping[str, Any],
                         previous: _State | None) -> None:
        if statement.key_id != response.key_id:
            raise TrustError("region", "the freshness statement names another key")
        if not secrets.compare_digest(statement.nonce, nonce):
            raise TrustError("nonce", "the freshness statement answers another nonce (a "
                                      "replayed response)")
        if statement.region != self._region:
            raise TrustError("region", f"the freshness statement is for region "
                                       f"{statement.region!r}, not {self._region!r}")
        if statement.timestamp_version != trusted.timestamp.version:
            raise TrustError("mix-and-match", f"the freshness statement vouches for timestamp "
                                              f"{statement.timestamp_version}, the answer "
                                              f"carries {trusted.timestamp.version}")
        if statement.bundle_sha256 != hashlib.sha256(response.bundle).hexdigest():
            raise TrustError("mix-and-match", "the freshness statement vouches for another "
                                              "bundle")
        if statement.etcd_revision < int(bundle["etcd_revision"]):
            raise TrustError("rollback", "the freshness statement is older than its bundle")
        if previous is not None:
            before = FreshnessStatement.from_bytes(previous.statement)
            if before.region == self._region and statement.etcd_revision < before.etcd_revision:
                raise TrustError("rollback", f"the freshness statement is at etcd revision "
                                             f"{statement.etcd_revision}, older than the "
                                             f"trusted {before.etcd_revision}")
        drift = abs(parse_bundle_time(statement.time) - self._clock())
        if drift > self._skew:
            raise TrustError("expired", f"the freshness statement's time {statement.time} is "
                                        f"{drift:.0f} s from this clock (limit {self._skew:g} s)")


def parse_bundle_time(text: str) -> float:
    """Epoch seconds of a bundle or statement time (``%Y-%m-%dT%H:%M:%S.%fZ``)."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.UTC).timestamp()


def _parse_bundle(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise TrustError("bundle", f"the bundle is not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != BUNDLE_FORMAT:
        raise TrustError("bundle", f"the bundle is not a {BUNDLE_FORMAT} document")
    return document


def _trusted_bundle(region: str, trusted: TrustedMetadataSet, bundle: Mapping[str, Any],
                    statement: bytes) -> TrustedBundle:
    versions = []
    for key in bundle["keys"]:
        for v in key["versions"]:
            versions.append(BundleVersion(
                key=key["name"], algorithm=key["algorithm"], number=int(v["number"]),
                state=v["state"], revoked=bool(v["revoked"]), primary=bool(v["primary"]),
                key_id=v["key_id"], public_key_pem=v["public_key_pem"],
                not_before=v["not_before"], not_after=v["not_after"],
                regions=tuple(key["regions"])))
    return TrustedBundle(
        region=region, root_version=trusted.root.version,
        timestamp_version=trusted.timestamp.version,
        timestamp_expires=trusted.timestamp.expires,
        etcd_revision=int(bundle["etcd_revision"]), generated_at=str(bundle["generated_at"]),
        freshness_time=FreshnessStatement.from_bytes(statement).time,
        versions=tuple(versions), online_keys=dict(bundle["online_keys"]),
    )


def _verifies(version: BundleVersion, digest: Digest, signature: bytes) -> bool:
    try:
        public = serialization.load_pem_public_key(version.public_key_pem.encode())
    except ValueError:
        return False
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            if digest.algorithm is not DigestAlgorithm.SHA256:
                return False
            public.verify(signature, digest.value, ec.ECDSA(Prehashed(hashes.SHA256())))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, digest.value)
        elif isinstance(public, rsa.RSAPublicKey):
            if digest.algorithm is not DigestAlgorithm.SHA256:
                return False
            public.verify(signature, digest.value,
                          padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                          Prehashed(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


# -- the gRPC transport ------------------------------------------------------------------------


class GrpcTrustTransport:
    """GetTrustBundle over mTLS gRPC, trying the region's endpoints in order."""

    def __init__(self, endpoints: Sequence[str], *, ca: Path | None = None,
                 cert: Path | None = None, key: Path | None = None, insecure: bool = False,
                 timeout: float = 10.0) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self._channels = open_channels(endpoints, ca=ca, cert=cert, key=key, insecure=insecure)
        self._timeout = timeout

    @classmethod
    def from_cluster(cls, cluster: ClusterFile, region: str,
                     identity: str = "pipeline") -> GrpcTrustTransport:
        endpoints = list(cluster.regions[region].grpc_endpoints) if region in cluster.regions \
            else cluster.endpoints()
        if cluster.insecure:
            return cls(endpoints, insecure=True)
        who = cluster.identity(identity)
        return cls(endpoints, ca=cluster.ca, cert=who.cert, key=who.key)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def fetch(self, nonce: bytes, region: str, known_root_version: int) -> TrustResponse:
        """Raises ``SignetError`` with the server's status when no endpoint answers."""
        request = trust_pb2.GetTrustBundleRequest(nonce=nonce, region=region,
                                                  known_root_version=known_root_version)
        last: grpc.RpcError | None = None
        for channel in self._channels:
            try:
                r = trust_pb2_grpc.TrustStub(channel).GetTrustBundle(request,
                                                                     timeout=self._timeout)
            except grpc.RpcError as error:
                last = error
                if error.code() not in _RETRYABLE:
                    raise SignetError.from_rpc_error(error) from None
                continue
            return TrustResponse(tuple(r.roots), r.timestamp, r.snapshot, r.targets,
                                 r.trust_bundle, r.freshness_statement, r.freshness_signature,
                                 r.freshness_key_id)
        assert last is not None  # noqa: S101 - the loop ran at least once
        raise SignetError.from_rpc_error(last) from None
