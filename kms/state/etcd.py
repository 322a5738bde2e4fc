"""Key state in etcd: the production ``KeyStateStore``.

Layout under one prefix (default ``/signet/v1``), computed only by ``StateLayout``:

- ``{prefix}/keys/{name}``      JSON of ``Key.to_dict()``
- ``{prefix}/policy``           JSON of ``AccessPolicy.to_dict()``
- ``{prefix}/signers/{id}``     a signer's registration, attached to its lease (fencing)

Every change is a single etcd transaction comparing revisions (I4), so nothing is half-written
and two writers racing from the same read never overwrite each other silently.

The client is aetcd, used for its channel handling, stubs and watch multiplexing; requests are
sent through its raw stubs so that we see response headers (revisions) and gRPC status codes.
aetcd has no TLS option, so ``_EtcdClient`` builds the channel itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc, utils, watcher
from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from kms.domain.keys import Key
from kms.domain.policy import AccessPolicy
from kms.errors import (
    AlreadyExists,
    Conflict,
    NotFound,
    StateStoreError,
    WatchCompacted,
)
from kms.ports import (
    SignerRegistrations,
    StateEvent,
    StateSnapshot,
    VersionedKey,
    VersionedPolicy,
)

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("signet.kms.state")

T = TypeVar("T")

DEFAULT_PREFIX = "/signet/v1"
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: operations in one transaction

# etcd's own keep-alive enforcement rejects client pings more often than every 5 s
# (--grpc-keepalive-min-time); 10 s pings let the channel notice a dead TCP peer.
# Records per page of a snapshot read: bounded replies whatever the number of keys.
SNAPSHOT_PAGE = 256

_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # etcd replies to a transaction of prefix reads (TUF files, proposals) in one message;
    # gRPC's default 4 MiB cap would turn a large but healthy repository into an outage.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Reconnect quickly after a member dies: the default backoff starts at 1 s and grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)

_TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class StateLayout:
    """Where each kind of record lives. The only place that builds etcd key paths."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix must start with '/' and not end with '/': {self.prefix!r}")

    @property
    def keys_dir(self) -> str:
        return f"{self.prefix}/keys/"

    def key(self, name: str) -> str:
        return f"{self.keys_dir}{name}"

    @property
    def policy(self) -> str:
        return f"{self.prefix}/policy"

    @property
    def signers_dir(self) -> str:
        return f"{self.prefix}/signers/"

    def signer(self, signer_id: str) -> str:
        return f"{self.signers_dir}{signer_id}"

    def region_key(self, role: str, region: str) -> str:
        """A region's service key (audit checkpoints, TUF online key…): public key + HSM id."""
        return f"{self.prefix}/region-keys/{role}/{region}"

    def audit_checkpoint(self, log_id: str) -> str:
        return f"{self.prefix}/audit/checkpoints/{log_id}"

    def leader(self, role: str) -> str:
        return f"{self.prefix}/leaders/{role}"

    # Custodian ceremonies (docs/adr/0009-custodian-ceremonies.md).
    @property
    def custodians(self) -> str:
        return f"{self.prefix}/custodians"

    @property
    def proposals_dir(self) -> str:
        return f"{self.prefix}/ceremonies/proposals/"

    def proposal(self, proposal_id: str) -> str:
        return f"{self.proposals_dir}{proposal_id}"

    def region(self, name: str) -> str:
        """An onboarded region's record (its transport key), written by a ceremony."""
        return f"{self.prefix}/regions/{name}"

    # Multi-region keys (docs/adr/0010-multi-region.md).
    @property
    def regions_dir(self) -> str:
        return f"{self.prefix}/regions/"

    @property
    def replicas_dir(self) -> str:
        return f"{self.prefix}/replicas/"

    def replica(self, key: str, version: int, region: str) -> str:
        """A version's private key wrapped for ``region`` (two blobs, never plaintext)."""
        return f"{self.replicas_dir}{key}/{version}/{region}"

    def replica_held(self, key: str, version: int, region: str) -> str:
        """Written once ``region``'s HSM holds the version (generated or unwrapped there)."""
        return f"{self.replicas_dir}{key}/{version}/held/{region}"

    def request(self, identity_hash: str, request_id: str) -> str:
        """A sign request id claimed for the idempotency window (kms.requests)."""
        return f"{self.prefix}/requests/{identity_hash}/{request_id}"

    # TUF repository (docs/adr/0007-trust-bundles.md). Outside keys/, so no key-state code
    # (and no SignDigest) ever sees the online keys.
    @property
    def tuf_dir(self) -> str:
        return f"{self.prefix}/tuf/"

    def tuf_online_key(self, region: str) -> str:
        return f"{self.tuf_dir}online-keys/{region}"

    def tuf_root(self, version: int) -> str:
        return f"{self.tuf_dir}root/{version}"

    @property
    def tuf_publication(self) -> str:
        return f"{self.tuf_dir}publication"

    def tuf_file(self, name: str) -> str:
        """A served repository file: ``timestamp.json``, ``N.snapshot.json``,
        ``N.targets.json`` or ``targets/<sha256>.trust-bundle.json``."""
        return f"{self.tuf_dir}files/{name}"

    def key_name(self, path: str) -> str | None:
        """The key name if ``path`` is a key record, else None."""
        if path.startswith(self.keys_dir) and len(path) > len(self.keys_dir):
            return path[len(self.keys_dir) :]
        return None


@dataclass(frozen=True)
class RecordRead:
    """Records read at one store revision: path -> (value, mod_revision)."""

    revision: int
    records: dict[str, tuple[bytes, int]]


def state_layout(prefix: str = DEFAULT_PREFIX) -> StateLayout:
    """The key layout for ``prefix``; extend ``StateLayout`` when a new record kind appears."""
    return StateLayout(prefix)


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd.

    ``endpoints`` are ``host:port`` strings of every member; all of them are given to one gRPC
    channel, which fails over between them. With ``ca_file`` set the connection uses TLS, and
    ``cert_file``/``key_file`` give the client certificate etcd's ``--client-cert-auth`` wants.
    ``tls_server_name`` is the name checked in every member's certificate (default: the host of
    the first endpoint). ``call_timeout`` bounds one request; ``retry_budget`` bounds all
    attempts of one operation on transient failures.
    """

    endpoints: tuple[str, ...]
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_server_name: str | None = None
    prefix: str = DEFAULT_PREFIX
    call_timeout: float = 2.0
    retry_budget: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one etcd endpoint (host:port) is required")
        for endpoint in self.endpoints:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("a client certificate needs ca_file (TLS) as well")
        if self.call_timeout <= 0 or self.retry_budget <= 0:
            raise ValueError("call_timeout and retry_budget must be positive")
        StateLayout(self.prefix)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def grpc_target(self) -> str:
        """One gRPC target naming every member.

        IPv4 literals become ``ipv4:h1:p1,h2:p2`` so the channel fails over between members; a
        single host name is used as is. Several host names cannot share one channel: put them
        behind one DNS name, or use IP addresses.
        """
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        hosts = [e.rpartition(":")[0] for e in self.endpoints]
        try:
            for host in hosts:
                ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"several etcd endpoints must be IPv4 addresses to share one channel, got "
                f"{', '.join(self.endpoints)}; use IPs or one DNS name for all members"
            ) from None
        return "ipv4:" + ",".join(self.endpoints)


class _EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client with a channel we build: several members, optional TLS with a client cert.

    aetcd's own ``connect`` only knows ``host:port`` and insecure channels.
    """

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        timeout: float,
        options: tuple[tuple[str, Any], ...],
    ) -> None:
        super().__init__(timeout=timeout)
        self._target = target
        self._credentials = credentials
        self._channel_options = options

    async def connect(self) -> None:
        # No await before _connected.set(): concurrent callers cannot build two channels.
        if self._connected.is_set():
            return
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self._target, options=self._channel_options)
        else:
            channel = grpc.aio.secure_channel(
                self._target, self._credentials, options=self._channel_options
            )
        self.channel = channel
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout)
        self._connected.set()


def _operation_name(what: str) -> str:
    """A low-cardinality label for a described operation: "a read of keys" → "read"."""
    head = what.split(" of ", 1)[0]
    for article in ("a ", "an ", "the "):
        head = head.removeprefix(article)
    return head.replace(" ", "_")


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in _TRANSIENT_CODES
    return isinstance(
        error,
        TimeoutError
        | aetcd.ConnectionFailedError
        | aetcd.ConnectionTimeoutError
        | aetcd.WatchTimeoutError,
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _decode_key(path: str, value: bytes, mod_revision: int) -> VersionedKey:
    try:
        return VersionedKey(Key.from_dict(json.loads(value)), mod_revision)
    except (ValueError, KeyError, TypeError) as e:
        raise StateStoreError(f"etcd record {path} is not a valid key record: {e}") from e


def _decode_policy(path: str, value: bytes, mod_revision: int) -> VersionedPolicy:
    try:
        return VersionedPolicy(AccessPolicy.from_dict(json.loads(value)), mod_revision)
    except (ValueError, KeyError, TypeError) as e:
        raise StateStoreError(f"etcd record {path} is not a valid access policy: {e}") from e


def _encode(record: dict[str, Any]) -> bytes:
    # Sorted keys: the same record always encodes to the same bytes, which lets a retried
    # write recognise that its first attempt was applied.
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _range_end(prefix: bytes) -> bytes:
    return bytes(utils.prefix_range_end(prefix))


class EtcdKeyStateStore:
    """``KeyStateStore`` on etcd v3. Open it inside a running event loop; close it when done.

    Transient failures (member down, no leader, deadline) are retried with exponential backoff
    for ``config.retry_budget`` seconds; then ``StateStoreError`` names the endpoints. A lost
    compare-and-swap is never retried: it raises ``Conflict``/``AlreadyExists`` at once.
    """

    def __init__(
        self, config: EtcdConfig, *, observer: Callable[[str, float, bool], None] | None = None
    ) -> None:
        """``observer(operation, seconds, ok)`` is told about every operation (for metrics)."""
        self.config = config
        self._observer = observer
        self.layout = state_layout(config.prefix)
        credentials = None
        options = _CHANNEL_OPTIONS
        if config.ca_file is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=config.ca_file.read_bytes(),
                private_key=config.key_file.read_bytes() if config.key_file else None,
                certificate_chain=config.cert_file.read_bytes() if config.cert_file else None,
            )
            server_name = config.tls_server_name or config.endpoints[0].rpartition(":")[0]
            options = (*options, ("grpc.ssl_target_name_override", server_name))
        self._client = _EtcdClient(config.grpc_target(), credentials, config.call_timeout, options)

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, what: str, attempt: Callable[[int], Awaitable[T]]) -> T:
        """``_retrying`` inside a trace span, reported to the observer."""
        operation = _operation_name(what)
        started = time.perf_counter()
        ok = False
        with _tracer.start_as_current_span("etcd", attributes={"signet.etcd.operation": what}):
            try:
                result = await self._retrying(what, attempt)
                ok = True
                return result
            finally:
                if self._observer is not None:
                    self._observer(operation, time.perf_counter() - started, ok)

    async def _retrying(self, what: str, attempt: Callable[[int], Awaitable[T]]) -> T:
        """Run ``attempt(n)`` (n = 1, 2, …) until it succeeds, fails for good, or the budget ends.

        Each attempt gets at most ``call_timeout`` and never outlives the budget.
        """
        deadline = time.monotonic() + self.config.retry_budget
        number = 0

        async def bounded() -> T:
            nonlocal number
            number += 1
            await self._client.connect()
            remaining = max(0.05, min(self.config.call_timeout, deadline - time.monotonic()))
            async with asyncio.timeout(remaining):
                return await attempt(number)

        # The first attempt runs bare: almost every call succeeds at once, and tenacity's
        # machinery costs ≈40-80 µs of CPU per call (two etcd calls per signed request id).
        try:
            return await bounded()
        except grpc.aio.AioRpcError as e:
            if not _is_transient(e):
                raise StateStoreError(
                    f"etcd at {', '.join(self.config.endpoints)} refused {what}: {_describe(e)}"
                ) from e
        except Exception as e:
            if not _is_transient(e):
                raise
        await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        try:
            async for attempt_state in AsyncRetrying(
                retry=retry_if_exception(_is_transient),
                stop=stop_after_delay(max(0.0, deadline - time.monotonic())),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                reraise=False,
            ):
                with attempt_state:
                    return await bounded()
        except RetryError as e:
            cause = e.last_attempt.exception()
            raise StateStoreError(
                f"etcd at {', '.join(self.config.endpoints)} did not answer {what} within "
                f"{self.config.retry_budget:g} s ({number} attempts; last error "
                f"{_describe(cause) if cause else 'none'}); check that a majority of etcd "
                "members is running and reachable"
            ) from cause
        except grpc.aio.AioRpcError as e:
            raise StateStoreError(
                f"etcd at {', '.join(self.config.endpoints)} refused {what}: {_describe(e)}"
            ) from e
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _range(self, key: str, *, prefix: bool = False, serializable: bool = False) -> Any:
        request = rpc.RangeRequest(key=key.encode(), serializable=serializable)
        if prefix:
            request.range_end = _range_end(key.encode())
        return await self._client.kvstub.Range(request, timeout=self.config.call_timeout)

    async def _txn(self, request: Any) -> Any:
        return await self._client.kvstub.Txn(request, timeout=self.config.call_timeout)

    def _cas_request(self, path: str, value: bytes, compare: list[Any]) -> Any:
        """put ``value`` if ``compare`` holds, else read the current record (one round trip)."""
        key = path.encode()
        return rpc.TxnRequest(
            compare=compare,
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )

    @staticmethod
    def _compare(path: str, target: str, revision: int) -> Any:
        compare = rpc.Compare(key=path.encode(), result=rpc.Compare.EQUAL)
        if target == "create":
            compare.target = rpc.Compare.CREATE
            compare.create_revision = revision
        else:
            compare.target = rpc.Compare.MOD
            compare.mod_revision = revision
        return compare

    @staticmethod
    def _current(response: Any) -> Any | None:
        """The record returned by the failure branch of ``_cas_request``, if it exists."""
        kvs = response.responses[0].response_range.kvs
        return kvs[0] if kvs else None

    # -- keys -------------------------------------------------------------------------------

    async def create_key(self, key: Key) -> VersionedKey:
        """Create the record only if no key has this name. Raises ``AlreadyExists``."""
        path = self.layout.key(key.name)
        value = _encode(key.to_dict())
        request = self._cas_request(path, value, [self._compare(path, "create", 0)])

        async def attempt(number: int) -> VersionedKey:
            response = await self._txn(request)
            if response.succeeded:
                return VersionedKey(key, response.header.revision)
            current = self._current(response)
            # A retry after a lost reply finds our own write: that is success, not a clash.
            if number > 1 and current is not None and current.value == value:
                return VersionedKey(key, current.mod_revision)
            raise AlreadyExists(
                f"a key named {key.name!r} already exists; choose another name or rotate it"
            )

        return await self._call(f"create of key {key.name!r}", attempt)

    async def get_key(self, name: str) -> VersionedKey:
        """The key record. Raises ``NotFound``."""
        path = self.layout.key(name)

        async def attempt(_: int) -> VersionedKey:
            response = await self._range(path)
            if not response.kvs:
                raise NotFound(f"no key named {name!r}; list keys with 'signet key list'")
            kv = response.kvs[0]
            return _decode_key(path, kv.value, kv.mod_revision)

        return await self._call(f"read of key {name!r}", attempt)

    async def update_key(self, key: Key, expected_mod_revision: int) -> VersionedKey:
        """Replace the record only if it is still at ``expected_mod_revision``.

        Raises ``Conflict`` when someone changed it first, ``NotFound`` when it is gone.
        """
        path = self.layout.key(key.name)
        value = _encode(key.to_dict())
        request = self._cas_request(
            path, value, [self._compare(path, "mod", expected_mod_revision)]
        )

        async def attempt(number: int) -> VersionedKey:
            response = await self._txn(request)
            if response.succeeded:
                return VersionedKey(key, response.header.revision)
            current = self._current(response)
            if current is None:
                raise NotFound(f"key {key.name!r} was deleted; nothing to update")
            if number > 1 and current.value == value:
                return VersionedKey(key, current.mod_revision)
            raise Conflict(
                f"key {key.name!r} changed at revision {current.mod_revision} after it was read "
                f"at revision {expected_mod_revision}; read it again and retry"
            )

        return await self._call(f"update of key {key.name!r}", attempt)

    async def list_keys(self) -> list[VersionedKey]:
        """Every key record, ordered by name."""
        return sorted((await self.snapshot()).keys.values(), key=lambda v: v.key.name)

    # -- policy -----------------------------------------------------------------------------

    async def get_policy(self) -> VersionedPolicy | None:
        path = self.layout.policy

        async def attempt(_: int) -> VersionedPolicy | None:
            response = await self._range(path)
            if not response.kvs:
                return None
            kv = response.kvs[0]
            return _decode_policy(path, kv.value, kv.mod_revision)

        return await self._call("read of the access policy", attempt)

    async def put_policy(
        self, policy: AccessPolicy, expected_mod_revision: int | None
    ) -> VersionedPolicy:
        """Store the policy: None = only if none exists, 0 = unconditionally, else CAS.

        Raises ``Conflict`` when the condition does not hold.
        """
        path = self.layout.policy
        value = _encode(policy.to_dict())
        if expected_mod_revision is None:
            compare = [self._compare(path, "create", 0)]
        elif expected_mod_revision == 0:
            compare = []  # an empty compare list always succeeds
        else:
            compare = [self._compare(path, "mod", expected_mod_revision)]
        request = self._cas_request(path, value, compare)

        async def attempt(number: int) -> VersionedPolicy:
            response = await self._txn(request)
            if response.succeeded:
                return VersionedPolicy(policy, response.header.revision)
            current = self._current(response)
            if number > 1 and current is not None and current.value == value:
                return VersionedPolicy(policy, current.mod_revision)
            if current is None:
                raise Conflict(
                    f"the access policy was deleted after it was read at revision "
                    f"{expected_mod_revision}; read it again and retry"
                )
            if expected_mod_revision is None:
                raise Conflict(
                    f"an access policy exists already (revision {current.mod_revision}); "
                    "read it and update it instead"
                )
            raise Conflict(
                f"the access policy changed at revision {current.mod_revision} after it was "
                f"read at revision {expected_mod_revision}; read it again and retry"
            )

        return await self._call("write of the access policy", attempt)

    # -- snapshot and watch -----------------------------------------------------------------

    async def snapshot(self) -> StateSnapshot:
        """Every key and the policy, read at one revision (the first page's header revision).

        Only ``[keys/, policy\\0)`` is read, the same range the watch covers, in pages of
        ``SNAPSHOT_PAGE`` records pinned to that revision: the rest of the prefix (TUF files,
        request ids, audit checkpoints) grows with use and must never make a signer unable
        to start. A page compacted away under us restarts the whole read.
        """

        async def attempt(_: int) -> StateSnapshot:
            keys: dict[str, VersionedKey] = {}
            policy: VersionedPolicy | None = None
            start = self.layout.keys_dir.encode()
            end = self.layout.policy.encode() + b"\0"
            revision = 0
            while True:
                request = rpc.RangeRequest(key=start, range_end=end, limit=SNAPSHOT_PAGE,
                                           revision=revision)
                try:
                    response = await self._client.kvstub.Range(
                        request, timeout=self.config.call_timeout)
                except grpc.aio.AioRpcError as e:
                    if revision == 0 or e.code() != grpc.StatusCode.OUT_OF_RANGE:
                        raise
                    # Compacted between two pages: start again at the newest revision.
                    keys, policy, revision = {}, None, 0
                    start = self.layout.keys_dir.encode()
                    continue
                if revision == 0:
                    revision = int(response.header.revision)
                for kv in response.kvs:
                    path = kv.key.decode()
                    name = self.layout.key_name(path)
                    if name is not None:
                        keys[name] = _decode_key(path, kv.value, kv.mod_revision)
                    elif path == self.layout.policy:
                        policy = _decode_policy(path, kv.value, kv.mod_revision)
                if not response.more or not response.kvs:
                    return StateSnapshot(revision, keys, policy)
                start = bytes(response.kvs[-1].key) + b"\0"

        return await self._call("snapshot of key state", attempt)

    def _event(self, event: aetcd.Event) -> StateEvent | None:
        """Map an etcd event to a key-state event; None for records that are not key state."""
        path = event.kv.key.decode()
        revision = event.kv.mod_revision  # for a delete: the revision of the deletion
        deleted = event.kind == aetcd.EventKind.DELETE
        name = self.layout.key_name(path)
        if name is not None:
            if deleted:
                return StateEvent(revision, "key-deleted", name=name)
            return StateEvent(
                revision, "key-put", name=name, key=_decode_key(path, event.kv.value, revision)
            )
        if path == self.layout.policy:
            if deleted:
                return StateEvent(revision, "policy-deleted")
            policy = _decode_policy(path, event.kv.value, revision)
            return StateEvent(revision, "policy-put", policy=policy)
        return None

    def watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        """Key and policy changes from ``start_revision`` on, in revision order.

        Raises ``WatchCompacted`` if that revision was compacted, ``StateStoreError`` when the
        stream breaks or cannot be opened within ``call_timeout``. The watch covers only
        ``keys/`` and ``policy`` (not signer registrations, which change on every ack). Nothing
        is retried here: the caller decides how to resume (last revision + 1, or a snapshot).
        """
        return self._watch(start_revision)

    async def _watch(self, start_revision: int) -> AsyncIterator[StateEvent]:
        endpoints = ", ".join(self.config.endpoints)
        # [keys/, policy\0) covers exactly the key records and the policy record.
        start = self.layout.keys_dir.encode()
        end = self.layout.policy.encode() + b"\0"
        try:
            await self._client.connect()
            handle = await self._client.watch(start, range_end=end, start_revision=start_revision)
        except aetcd.RevisionCompactedError as e:
            raise WatchCompacted(
                f"etcd compacted history up to revision {e.compacted_revision}; revision "
                f"{start_revision} is gone, re-read a snapshot",
                compact_revision=e.compacted_revision,
            ) from e
        except (aetcd.ClientError, grpc.aio.AioRpcError, TimeoutError) as e:
            raise StateStoreError(
                f"could not open a watch on etcd at {endpoints}: {_describe(e)}"
            ) from e
        try:
            async for event in handle:
                mapped = self._event(event)
                if mapped is not None:
                    yield mapped
            # aetcd ends the iterator silently when the client shuts the watcher down.
            raise StateStoreError(f"the watch on etcd at {endpoints} was closed")
        except aetcd.RevisionCompactedError as e:
            raise WatchCompacted(
                f"etcd compacted history up to revision {e.compacted_revision} while watching; "
                "re-read a snapshot",
                compact_revision=e.compacted_revision,
            ) from e
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise StateStoreError(f"the watch on etcd at {endpoints} broke: {_describe(e)}") from e
        finally:
            # Cancelling enqueues a request on a stream that may be stuck: never wait long.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.cancel(), timeout=1.0)

    # -- leases -----------------------------------------------------------------------------

    async def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease of ``ttl_seconds`` (etcd may round small TTLs up). Returns its id."""

        async def attempt(_: int) -> int:
            response = await self._client.leasestub.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl_seconds), timeout=self.config.call_timeout
            )
            if response.error:
                raise StateStoreError(f"etcd refused a lease: {response.error}")
            return int(response.ID)

        return await self._call("a lease grant", attempt)

    async def keep_alive(self, lease_id: int) -> int:
        """Refresh the lease once; the remaining TTL, 0 if the lease has expired.

        Not retried: a keep-alive's value lies in when it was sent, so the caller decides.
        Raises ``StateStoreError`` if etcd does not answer within ``call_timeout``.
        """
        try:
            await self._client.connect()
            async with asyncio.timeout(self.config.call_timeout):
                call = self._client.leasestub.LeaseKeepAlive(
                    iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]),
                    timeout=self.config.call_timeout,
                )
                async for reply in call:
                    return int(reply.TTL)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            raise StateStoreError(
                f"lease keep-alive to etcd at {', '.join(self.config.endpoints)} failed: "
                f"{_describe(e)}"
            ) from e
        raise StateStoreError("etcd closed the lease keep-alive stream without an answer")

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease (deleting keys attached to it). A lease already gone is fine."""

        async def attempt(_: int) -> None:
            try:
                await self._client.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease_id), timeout=self.config.call_timeout
                )
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("a lease revoke", attempt)

    async def current_revision(self) -> int:
        """The store revision now (a linearizable read)."""

        async def attempt(_: int) -> int:
            request = rpc.RangeRequest(key=self.layout.policy.encode(), count_only=True)
            response = await self._client.kvstub.Range(request, timeout=self.config.call_timeout)
            return int(response.header.revision)

        return await self._call("a revision read", attempt)

    # -- fencing seam -----------------------------------------------------------------------

    async def register_signer(self, signer_id: str, lease_id: int, applied_revision: int) -> None:
        """Record under the signer's lease the key-state revision it has applied.

        The record disappears with the lease, which is how a Revoke stops waiting for a signer
        that is gone.
        """
        path = self.layout.signer(signer_id)
        value = _encode({"signer_id": signer_id, "applied_revision": applied_revision})

        async def attempt(_: int) -> None:
            await self._client.kvstub.Put(
                rpc.PutRequest(key=path.encode(), value=value, lease=lease_id),
                timeout=self.config.call_timeout,
            )

        await self._call(f"registration of signer {signer_id!r}", attempt)

    async def get_or_create_record(self, path: str, value: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``value`` at ``path`` unless a record is there; return what is stored."""
        request = self._cas_request(path, _encode(dict(value)), [self._compare(path, "create", 0)])

        async def attempt(_: int) -> dict[str, Any]:
            response = await self._txn(request)
            if response.succeeded:
                return dict(value)
            current = self._current(response)
            if current is None:  # deleted between compare and read: try again
                raise StateStoreError(f"{path} vanished while being created")
            return dict(json.loads(current.value))

        return await self._call(f"a create of {path}", attempt)

    async def put_record(self, path: str, value: Mapping[str, Any]) -> int:
        """Overwrite ``path`` with ``value`` (for records with one writer, e.g. an audit
        checkpoint anchor). Returns the revision."""
        data = _encode(dict(value))

        async def attempt(_: int) -> int:
            response = await self._client.kvstub.Put(
                rpc.PutRequest(key=path.encode(), value=data), timeout=self.config.call_timeout)
            return int(response.header.revision)

        return await self._call(f"a write of {path}", attempt)

    async def get_record(self, path: str, *, serializable: bool = False
                         ) -> dict[str, Any] | None:
        """The JSON record at ``path``, or None. ``serializable``: answered by the member this
        client talks to from its own state, without a round through the leader — cheaper, but
        it may miss a write the cluster committed moments ago (kms.requests says when that is
        acceptable)."""
        async def attempt(_: int) -> dict[str, Any] | None:
            response = await self._range(path, serializable=serializable)
            return dict(json.loads(response.kvs[0].value)) if response.kvs else None

        return await self._call(f"a read of {path}", attempt)

    async def signer_registrations(self) -> SignerRegistrations:
        """Every registered signer's applied revision, in one range read."""

        async def attempt(_: int) -> SignerRegistrations:
            response = await self._range(self.layout.signers_dir, prefix=True)
            applied = {}
            for kv in response.kvs:
                record = json.loads(kv.value)
                applied[str(record["signer_id"])] = int(record["applied_revision"])
            return SignerRegistrations(int(response.header.revision), applied)

        return await self._call("a read of signer registrations", attempt)

    async def try_lead(self, role: str, candidate: str, lease_id: int) -> bool:
        """Claim ``role`` under ``lease_id`` if nobody holds it; True if ``candidate`` holds it.

        The claim vanishes with the lease, so a dead leader is replaced within one lease TTL.
        """
        path = self.layout.leader(role)
        request = rpc.TxnRequest(
            compare=[self._compare(path, "create", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=path.encode(), value=candidate.encode(), lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=path.encode()))],
        )

        async def attempt(_: int) -> bool:
            response = await self._txn(request)
            if response.succeeded:
                return True
            current = self._current(response)
            return current is not None and bytes(current.value) == candidate.encode()

        return await self._call(f"a claim of the {role} role", attempt)

    # -- request ids (kms.requests) -----------------------------------------------------------

    async def claim_request(self, path: str, value: bytes, lease_id: int
                            ) -> tuple[bool, bytes | None, int]:
        """Create ``path`` under ``lease_id`` unless it exists. Returns (created, the existing
        value or None, the record's mod_revision). A retry after a lost reply that finds the
        very value it wrote counts as created."""
        request = rpc.TxnRequest(
            compare=[self._compare(path, "create", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=path.encode(), value=value, lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=path.encode()))],
        )

        async def attempt(number: int) -> tuple[bool, bytes | None, int]:
            response = await self._txn(request)
            if response.succeeded:
                return True, None, int(response.header.revision)
            current = self._current(response)
            if current is None:
                raise StateStoreError(f"{path} vanished while being claimed")
            # A retry after a lost reply finds our own claim: that is a win.
            if number > 1 and bytes(current.value) == value:
                return True, None, int(current.mod_revision)
            return False, bytes(current.value), int(current.mod_revision)

        return await self._call("a claim of a request id", attempt)

    async def read_requests(self, paths: Sequence[str]) -> list[bytes | None]:
        """The values at ``paths`` (None where absent), in order, in one serializable read-only
        transaction (at most ``MAX_TXN_OPS`` paths): answered by the member this client talks
        to from its own state, without a round through the leader. Used by kms.requests for
        the lookups of concurrent requests; it may miss a write committed moments ago."""
        if len(paths) > MAX_TXN_OPS:
            raise ValueError(f"at most {MAX_TXN_OPS} paths per read")
        request = rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=path.encode(), serializable=True))
            for path in paths])

        async def attempt(_: int) -> list[bytes | None]:
            response = await self._txn(request)
            return [bytes(op.response_range.kvs[0].value) if op.response_range.kvs else None
                    for op in response.responses]

        return await self._call("a read of request ids", attempt)

    async def claim_requests(self, claims: Sequence[tuple[str, bytes]], lease_id: int
                             ) -> list[tuple[bool, bytes | None]]:
        """``claim_request`` for many distinct paths (at most ``MAX_TXN_OPS``): one transaction
        creates them all when none exists — the usual case, fresh request ids — else the ones
        that exist are answered with their value and the rest are tried again. Returns, in
        order, (created, the existing value or None)."""
        if len({path for path, _ in claims}) != len(claims) or len(claims) > MAX_TXN_OPS:
            raise ValueError(f"claims need distinct paths, at most {MAX_TXN_OPS}")
        outcome: dict[int, tuple[bool, bytes | None]] = {}
        todo = list(range(len(claims)))
        while todo:
            todo = await self._claim_round(claims, todo, lease_id, outcome)
        return [outcome[index] for index in range(len(claims))]

    async def _claim_round(self, claims: Sequence[tuple[str, bytes]], todo: list[int],
                           lease_id: int, outcome: dict[int, tuple[bool, bytes | None]]
                           ) -> list[int]:
        """One all-or-nothing transaction over ``todo``; returns what is left to claim."""
        keys = [claims[index][0].encode() for index in todo]
        request = rpc.TxnRequest(
            compare=[self._compare(claims[index][0], "create", 0) for index in todo],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=claims[index][1], lease=lease_id))
                for key, index in zip(keys, todo, strict=True)],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key)) for key in keys],
        )

        async def attempt(number: int) -> list[int]:
            response = await self._txn(request)
            if response.succeeded:
                outcome.update((index, (True, None)) for index in todo)
                return []
            left = []
            for index, op in zip(todo, response.responses, strict=True):
                kvs = op.response_range.kvs
                if not kvs:
                    left.append(index)  # free: claim it in the next round
                elif number > 1 and bytes(kvs[0].value) == claims[index][1]:
                    outcome[index] = (True, None)  # our own write, whose reply was lost
                else:
                    outcome[index] = (False, bytes(kvs[0].value))
            return left

        return await self._call("a claim of request ids", attempt)

    # -- plain records (the TUF repository, kms.tuf.store) ------------------------------------

    async def read_records(
        self, paths: Sequence[str] = (), *, prefixes: Sequence[str] = ()
    ) -> RecordRead:
        """Read ``paths`` and everything under ``prefixes`` in one transaction (one revision).
        Missing paths are absent from the result."""
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=p.encode())) for p in paths]
        ops += [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=p.encode(), range_end=_range_end(p.encode()))) for p in prefixes]
        request = rpc.TxnRequest(compare=[], success=ops, failure=[])

        async def attempt(_: int) -> RecordRead:
            response = await self._txn(request)
            records = {}
            for op in response.responses:
                for kv in op.response_range.kvs:
                    records[kv.key.decode()] = (bytes(kv.value), int(kv.mod_revision))
            return RecordRead(int(response.header.revision), records)

        return await self._call("a read of repository records", attempt)

    async def write_records(
        self,
        puts: Mapping[str, bytes],
        *,
        deletes: Sequence[str] = (),
        expect: Mapping[str, int] | None = None,
    ) -> int:
        """Put and delete in one transaction, only if every ``expect`` path is at that
        mod_revision (0: does not exist). Returns the new revision; raises ``Conflict`` naming
        the first path that did not match. Not retried after a lost compare."""
        compare = [self._compare(p, "mod", r) for p, r in (expect or {}).items()]
        success = [rpc.RequestOp(request_put=rpc.PutRequest(key=p.encode(), value=v))
                   for p, v in puts.items()]
        success += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=p.encode()))
                    for p in deletes]
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=p.encode()))
                   for p in (expect or {})]
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)

        async def attempt(number: int) -> int:
            response = await self._txn(request)
            if response.succeeded:
                return int(response.header.revision)
            found = {}
            for op in response.responses:
                for kv in op.response_range.kvs:
                    found[kv.key.decode()] = (bytes(kv.value), int(kv.mod_revision))
            # A retry after a lost reply finds our own writes: that is success.
            if number > 1 and puts and all(found.get(p, (None, 0))[0] == v
                                           for p, v in puts.items()):
                return max(r for _, r in found.values())
            for path, expected in (expect or {}).items():
                actual = found.get(path, (b"", 0))[1]
                if actual != expected:
                    raise Conflict(f"{path} is at revision {actual}, expected {expected}; "
                                   "someone else wrote it first")
            raise Conflict("a repository write lost a compare-and-swap")

        return await self._call("a write of repository records", attempt)

    async def close(self) -> None:
        """Close the channel and every watch on it."""
        with contextlib.suppress(Exception):
            await self._client.close()
