"""The Trust service (GetTrustBundle) and the wiring of trust distribution in a signer:
the region's online key, the TUF publisher task and the ``/tuf/`` HTTP server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from kms.ports import Clock, Hsm
from kms.state.etcd import EtcdKeyStateStore
from kms.state.view import KeyStateView
from kms.tuf.publisher import TufPublisher, ensure_online_key
from kms.tuf.repository import ExpiryPolicy
from kms.tuf.service import TrustBundleService
from kms.tuf.signing import HsmMetadataSigner
from kms.tuf.store import TufRepositoryStore
from signer._pb.signet.v1 import trust_pb2, trust_pb2_grpc
from signer.config import ServerConfig
from signer.http import RouteHandler, server_tls_context, start_tuf_http
from signer.servicers.base import Deferred, ServicerBase, rpc

log = logging.getLogger(__name__)


class TrustServicer(ServicerBase, trust_pb2_grpc.TrustServicer):
    """Converts and delegates. Trust bundles are public: any caller that passed the mTLS
    handshake may ask; no access-policy binding is needed."""

    def __init__(self, service: Deferred[TrustBundleService], *, insecure: bool) -> None:
        super().__init__(insecure=insecure)
        self._service = service

    @rpc
    async def GetTrustBundle(
        self, request: trust_pb2.GetTrustBundleRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trust_pb2.GetTrustBundleResponse:
        answer = await self._service.get().get(
            bytes(request.nonce), request.region, request.known_root_version)
        view = answer.repository
        return trust_pb2.GetTrustBundleResponse(
            roots=list(view.roots), timestamp=view.timestamp, snapshot=view.snapshot,
            targets=view.targets, trust_bundle=view.bundle,
            freshness_statement=answer.statement, freshness_signature=answer.signature,
            freshness_key_id=answer.key_id, region=request.region or "",
        )


@dataclass
class TrustDistribution:
    service: TrustBundleService
    publisher: TufPublisher
    http_port: int | None
    tasks: list[asyncio.Task[None]]


async def start_trust_distribution(
    config: ServerConfig, *, store: EtcdKeyStateStore, hsm: Hsm, view: KeyStateView,
    clock: Clock, signer_id: str, routes: Mapping[str, RouteHandler] | None = None,
) -> TrustDistribution:
    """Ensure the region's online key, start the publisher and the ``/tuf/`` server (which
    also serves ``routes``, e.g. the dashboard).

    Returned tasks run until cancelled (cancelling the HTTP task closes its socket). Raises
    ``KmsError`` when the online key cannot be ensured (wrong HSM token, etcd or HSM down).
    """
    repo = TufRepositoryStore(store, store.layout)
    online_key = await ensure_online_key(repo, hsm, config.region, clock)
    signer = HsmMetadataSigner(hsm, online_key)
    trust = config.trust
    publisher = TufPublisher(
        repo=repo, signer=signer, online_key=online_key, view=view, registry=store,
        clock=clock, signer_id=signer_id,
        expiry=ExpiryPolicy(trust.timestamp_expiry_seconds, trust.timestamp_resign_seconds,
                            trust.metadata_expiry_seconds),
    )
    tasks = [asyncio.create_task(publisher.run(), name="tuf-publisher")]
    port = None
    if trust.http_listen:
        tls = None
        if config.tls is not None:
            tls = server_tls_context(config.tls.cert, config.tls.key)
        http = await start_tuf_http(trust.http_listen, repo.read_file, tls, routes)
        port = http.port
        scheme = "http" if tls is None else "https"
        log.info("serving the TUF repository at %s://%s:%d/tuf/", scheme,
                 trust.http_listen.rpartition(":")[0], port)

        async def serve_until_cancelled() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await http.stop()

        tasks.append(asyncio.create_task(serve_until_cancelled(), name="tuf-http"))
    service = TrustBundleService(repo=repo, signer=signer, region=config.region, clock=clock)
    return TrustDistribution(service, publisher, port, tasks)

