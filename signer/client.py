"""The Signet client library: what pipelines, custodians and the CLI call.

Generated protobuf types stay inside; callers get frozen dataclasses. Every failure is a
``SignetError`` carrying the gRPC status and the server's message. Calls go to the first
endpoint (the home region's) and move on to the next on ``UNAVAILABLE`` or a deadline.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from kms.domain.keys import Algorithm, Digest, Replication
from kms.domain.policy import AccessPolicy
from kms.signing import MAX_BATCH, Signature
from signer import convert
from signer._pb.signet.v1 import keys_pb2, keys_pb2_grpc, signing_pb2, signing_pb2_grpc
from signer.channels import open_channels
from signer.cluster import ClusterFile
from signer.errors import SignetError

T = TypeVar("T")


class _NamesItsRequestId(Protocol):
    new_request_id: bool


R = TypeVar("R", bound=_NamesItsRequestId)


def request_id_for(request_id: str | None) -> tuple[str, bool]:
    """The request id to send and whether it is new: one generated here is (nothing can be
    stored under it yet); the caller's own is not, as the caller may be retrying."""
    return (request_id, False) if request_id else (str(uuid.uuid4()), True)


def first_send_only(request: R) -> Callable[[], R]:
    """``request`` for each attempt of ``SignetClient._call``, its ``new_request_id`` kept
    for the first send only: a later attempt may find what the first one stored
    (signing.proto)."""
    sends = 0

    def next_send() -> R:
        nonlocal sends
        if sends:
            request.new_request_id = False
        sends += 1
        return request

    return next_send


# Seconds an endpoint that failed with a retryable status waits behind the others (_call).
FAILOVER_COOLDOWN = 2.0
# CANCELLED too: this client never cancels its own calls, so it means the signer gave up on
# the call — a signer told to stop (SIGTERM) cancels the calls it is handling (measured in
# tests/e2e/test_chaos.py). Sign requests carry a request id, so retrying them is safe.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED})
_STATE_NAMES = {v: k for k, v in convert._STATES.items()}


@dataclass(frozen=True)
class KeyVersionInfo:
    number: int
    state: str
    key_id: str
    public_key_pem: str
    created_at: float
    revoked: bool = False
    retire_at: float | None = None
    destroy_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "key_id": self.key_id,
                "public_key_pem": self.public_key_pem, "created_at": self.created_at,
                "revoked": self.revoked, "retire_at": self.retire_at,
                "destroy_after": self.destroy_after}


@dataclass(frozen=True)
class KeyInfo:
    name: str
    algorithm: Algorithm
    replication: Replication
    primary_version: int
    min_sign_version: int
    versions: tuple[KeyVersionInfo, ...]
    rotation_period_seconds: int
    revision: int

    @classmethod
    def from_pb(cls, message: keys_pb2.Key) -> KeyInfo:
        return cls(
            name=message.name,
            algorithm=convert.algorithm_from_pb(message.algorithm),
            replication=convert.replication_from_pb(message.replication),
            primary_version=message.primary_version,
            min_sign_version=message.min_sign_version,
            versions=tuple(
                KeyVersionInfo(
                    number=v.number,
                    state=_STATE_NAMES[v.state].value,
                    key_id=v.key_id,
                    public_key_pem=v.public_key_pem,
                    created_at=v.created_at.ToNanoseconds() / 1e9,
                    revoked=v.revoked,
                    retire_at=v.retire_at.ToNanoseconds() / 1e9 if v.HasField("retire_at")
                    else None,
                    destroy_after=v.destroy_after.ToNanoseconds() / 1e9
                    if v.HasField("destroy_after") else None,
                )
                for v in message.versions
            ),
            rotation_period_seconds=message.rotation_period_seconds,
            revision=message.revision,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "algorithm": self.algorithm.value,
            "replication": self.replication.value,
            "primary_version": self.primary_version,
            "min_sign_version": self.min_sign_version,
            "rotation_period_seconds": self.rotation_period_seconds,
            "revision": self.revision,
            "versions": [v.to_dict() for v in self.versions],
        }


@dataclass(frozen=True)
class RevokeInfo:
    key: KeyInfo
    fence_seconds: float
    signers_acknowledged: tuple[str, ...]
    signers_lapsed: tuple[str, ...]
    revision: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "fence_seconds": self.fence_seconds,
                "signers_acknowledged": list(self.signers_acknowledged),
                "signers_lapsed": list(self.signers_lapsed), "revision": self.revision}


@dataclass(frozen=True)
class PublicKey:
    key: str
    version: int
    key_id: str
    algorithm: Algorithm
    pem: str
    state: str


class SignetClient:
    """A connection to a Signet cluster with one identity."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        insecure: bool = False,
        timeout: float = 10.0,
        attempts_per_endpoint: int = 2,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        if not insecure and (cert is None or key is None):
            # grpcio servers refuse the TLS handshake without a client certificate, which
            # would surface as a vague UNAVAILABLE; say what is wrong instead.
            raise SignetError(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate configured; Signet requires mTLS with a certificate "
                "from the cluster CA (pass cert and key, or an identity from cluster.json)",
            )
        self._timeout = timeout
        self._attempts = attempts_per_endpoint
        self._open = functools.partial(open_channels, endpoints, ca=ca, cert=cert, key=key,
                                       insecure=insecure)
        self._channels = self._open()
        self._down_until = [0.0] * len(self._channels)  # monotonic; see _call
        self._endpoints = list(endpoints)
        # sign_many's extra lanes: channels with their own connections, opened on first use.
        self._lanes: list[list[grpc.Channel]] = []
        self._lanes_lock = threading.Lock()

    @classmethod
    def from_cluster(
        cls, cluster: ClusterFile, identity: str, *, region: str | None = None, **kwargs: Any
    ) -> SignetClient:
        if cluster.insecure:
            return cls(cluster.endpoints(region), insecure=True, **kwargs)
        who = cluster.identity(identity)
        return cls(cluster.endpoints(region), ca=cluster.ca, cert=who.cert, key=who.key, **kwargs)

    def close(self) -> None:
        for channel in [*self._channels, *(c for lane in self._lanes for c in lane)]:
            channel.close()

    def __enter__(self) -> SignetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, invoke: Callable[[grpc.Channel], T],
              channels: list[grpc.Channel] | None = None) -> T:
        """Try the endpoints in order (the home region's first) and move on only for
        retryable failures (``UNAVAILABLE``, deadline), up to ``attempts_per_endpoint`` passes
        with bounded backoff between passes. An endpoint that just failed that way goes to the
        back of the line for ``FAILOVER_COOLDOWN`` seconds, so a dead or paused region costs
        one timeout now and then, not one per call."""
        channels = channels or self._channels
        last: grpc.RpcError | None = None
        for attempt in range(self._attempts):
            now = time.monotonic()
            order = sorted(range(len(channels)), key=lambda i: self._down_until[i] > now)
            for index in order:
                try:
                    result = invoke(channels[index])
                except grpc.RpcError as error:
                    last = error
                    if error.code() not in _RETRYABLE:
                        raise SignetError.from_rpc_error(error) from None
                    self._down_until[index] = time.monotonic() + FAILOVER_COOLDOWN
                    continue
                self._down_until[index] = 0.0
                return result
            time.sleep(min(0.05 * 2**attempt, 0.5))
        if last is None:
            raise ValueError("no endpoints to call")
        if last.code() is grpc.StatusCode.CANCELLED:
            raise SignetError(grpc.StatusCode.UNAVAILABLE,
                              "the signer stopped while handling the call; retry") from None
        raise SignetError.from_rpc_error(last) from None

    def sign_digest(
        self, key: str, digest: Digest, *, version: int | None = None,
        request_id: str | None = None,
    ) -> Signature:
        request_id, new = request_id_for(request_id)
        send = first_send_only(signing_pb2.SignDigestRequest(
            key=key, key_version=version or 0, digest=convert.digest_to_pb(digest),
            request_id=request_id, new_request_id=new,
        ))
        response = self._call(
            lambda ch: signing_pb2_grpc.SigningStub(ch).SignDigest(send(), timeout=self._timeout)
        )
        return _signature(response)

    def sign_batch(
        self, key: str, digests: Sequence[Digest], *, version: int | None = None,
        request_id: str | None = None,
    ) -> list[Signature | SignetError]:
        return self._sign_batch(key, digests, version, *request_id_for(request_id), lane=0)

    def _sign_batch(
        self, key: str, digests: Sequence[Digest], version: int | None,
        request_id: str, new_request_id: bool, *, lane: int,
    ) -> list[Signature | SignetError]:
        send = first_send_only(signing_pb2.SignBatchRequest(
            key=key, key_version=version or 0, digests=[convert.digest_to_pb(d) for d in digests],
            request_id=request_id, new_request_id=new_request_id,
        ))
        response = self._call(
            lambda ch: signing_pb2_grpc.SigningStub(ch).SignBatch(send(), timeout=self._timeout),
            self._lane(lane),
        )
        return [
            _signature(item.signature) if item.HasField("signature")
            else SignetError(grpc.StatusCode(_code(item.error.code)), item.error.message)
            for item in response.results
        ]

    def sign_many(
        self, key: str, digests: Sequence[Digest], *, version: int | None = None,
        batch_size: int = 256, concurrency: int = 4, request_id: str | None = None,
    ) -> list[Signature | SignetError]:
        """Sign any number of digests: split them into ``SignBatch`` calls of ``batch_size``
        with up to ``concurrency`` in flight at once (each fails over like ``sign_batch``),
        and return one result per digest, in the order given. The calls in flight go over
        ``concurrency`` connections of their own (kept for later calls), so that every worker
        process of a signer gets some of them (docs/adr/0008). Batch ``n`` carries request id
        ``<request_id>/<n>``. A failed call raises its ``SignetError`` once the calls already
        in flight have finished; per-item errors come back in place, as from ``sign_batch``.
        """
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be from 1 to {MAX_BATCH}")
        if concurrency < 1:
            raise ValueError("concurrency must be 1 or more")
        base, new = request_id_for(request_id)
        chunks = [digests[i:i + batch_size] for i in range(0, len(digests), batch_size)]
        if len(chunks) <= 1 or concurrency == 1:
            return [result for n, chunk in enumerate(chunks) for result in
                    self._sign_batch(key, chunk, version, f"{base}/{n}", new, lane=0)]
        with ThreadPoolExecutor(max_workers=min(concurrency, len(chunks)),
                                thread_name_prefix="signet-sign-many") as pool:
            lanes = min(concurrency, len(chunks))
            futures = [
                pool.submit(self._sign_batch, key, chunk, version, f"{base}/{n}", new,
                            lane=n % lanes)
                for n, chunk in enumerate(chunks)
            ]
            try:
                return [result for future in futures for result in future.result()]
            except BaseException:
                for future in futures:
                    future.cancel()  # calls not started yet are not made
                raise

    def _lane(self, number: int) -> list[grpc.Channel]:
        """Lane 0 is the client's own channels; lane n > 0 has connections of its own."""
        if number == 0:
            return self._channels
        with self._lanes_lock:
            while len(self._lanes) < number:
                self._lanes.append(self._open(own_connections=True))
            return self._lanes[number - 1]

    def public_key(self, key: str, version: int | None = None) -> PublicKey:
        request = signing_pb2.GetPublicKeyRequest(key=key, version=version or 0)
        r = self._call(
            lambda ch: signing_pb2_grpc.SigningStub(ch).GetPublicKey(request, timeout=self._timeout)
        )
        return PublicKey(r.key, r.version, r.key_id, convert.algorithm_from_pb(r.algorithm),
                         r.public_key_pem, _STATE_NAMES[r.state].value)

    def create_key(
        self, name: str, algorithm: Algorithm, *, replication: Replication = Replication.REGIONAL,
        rotation_period_seconds: int | None = None,
    ) -> KeyInfo:
        request = keys_pb2.CreateKeyRequest(
            name=name,
            algorithm=convert.algorithm_to_pb(algorithm),
            replication=convert._REPLICATION_BACK[replication],
            rotation_period_seconds=rotation_period_seconds or 0,
        )
        return KeyInfo.from_pb(self._call(
            lambda ch: keys_pb2_grpc.KeyAdminStub(ch).CreateKey(request, timeout=self._timeout)
        ))

    def get_key(self, name: str) -> KeyInfo:
        request = keys_pb2.GetKeyRequest(name=name)
        return KeyInfo.from_pb(self._call(
            lambda ch: keys_pb2_grpc.KeyAdminStub(ch).GetKey(request, timeout=self._timeout)
        ))

    def list_keys(self) -> list[KeyInfo]:
        response = self._call(
            lambda ch: keys_pb2_grpc.KeyAdminStub(ch).ListKeys(
                keys_pb2.ListKeysRequest(), timeout=self._timeout)
        )
        return [KeyInfo.from_pb(k) for k in response.keys]

    def _admin(self, method: str, request: Any) -> Any:
        return self._call(
            lambda ch: getattr(keys_pb2_grpc.KeyAdminStub(ch), method)(
                request, timeout=self._timeout)
        )

    def rotate_key(self, name: str, *, retire_grace_seconds: float = 0) -> KeyInfo:
        return KeyInfo.from_pb(self._admin("RotateKey", keys_pb2.RotateKeyRequest(
            name=name, retire_grace_seconds=retire_grace_seconds)))

    def disable_version(self, name: str, version: int) -> KeyInfo:
        return KeyInfo.from_pb(self._admin(
            "DisableVersion", keys_pb2.VersionRequest(name=name, version=version)))

    def enable_version(self, name: str, version: int) -> KeyInfo:
        return KeyInfo.from_pb(self._admin(
            "EnableVersion", keys_pb2.VersionRequest(name=name, version=version)))

    def revoke_version(self, name: str, version: int) -> RevokeInfo:
        """Revoke and wait for the fence. Not retried on another endpoint after a deadline:
        a retry is safe (revoking twice changes nothing) but the caller should decide."""
        r = self._admin("RevokeVersion", keys_pb2.VersionRequest(name=name, version=version))
        return RevokeInfo(KeyInfo.from_pb(r.key), r.fence_seconds,
                          tuple(r.signers_acknowledged), tuple(r.signers_lapsed), r.revision)

    def schedule_destroy(self, name: str, version: int, *,
                         waiting_seconds: float | None = None) -> KeyInfo:
        return KeyInfo.from_pb(self._admin("ScheduleDestroy", keys_pb2.ScheduleDestroyRequest(
            name=name, version=version, waiting_seconds=waiting_seconds or 0)))

    def cancel_destroy(self, name: str, version: int) -> KeyInfo:
        return KeyInfo.from_pb(self._admin(
            "CancelDestroy", keys_pb2.VersionRequest(name=name, version=version)))

    def set_min_sign_version(self, name: str, version: int) -> KeyInfo:
        return KeyInfo.from_pb(self._admin(
            "SetMinSignVersion", keys_pb2.VersionRequest(name=name, version=version)))

    def set_policy(self, policy: AccessPolicy, *, expected_revision: int = 0) -> int:
        request = keys_pb2.SetPolicyRequest(
            policy_json=json.dumps(policy.to_dict()), expected_revision=expected_revision
        )
        return self._call(
            lambda ch: keys_pb2_grpc.KeyAdminStub(ch).SetPolicy(request, timeout=self._timeout)
        ).revision

    def get_policy(self) -> tuple[AccessPolicy, int]:
        response = self._call(
            lambda ch: keys_pb2_grpc.KeyAdminStub(ch).GetPolicy(
                keys_pb2.GetPolicyRequest(), timeout=self._timeout)
        )
        return AccessPolicy.from_dict(json.loads(response.policy_json)), response.revision


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


def _signature(response: signing_pb2.SignDigestResponse) -> Signature:
    return Signature(
        signature=response.signature,
        key=response.key,
        version=response.key_version,
        key_id=response.key_id,
        algorithm=convert.algorithm_from_pb(response.algorithm),
        revision=response.revision,
        region=response.region,
    )
