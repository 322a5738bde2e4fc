"""Wiring: build the adapters from a config, start the gRPC server, stop cleanly.

Start-up is sealed: gRPC health reports NOT_SERVING until the HSM is logged in and a fresh key
state has been read from etcd; only then does it switch to SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kms.admin import KeyAdministration
from kms.audit.checkpoint import Checkpoint, HsmCheckpointSigner
from kms.audit.log import AuditLog
from kms.errors import KmsError
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
from kms.maintenance import KeyMaintenance
from kms.ports import SystemClock
from kms.region_keys import ensure_region_key
from kms.signing import InflightSignatures, SigningService, StateView
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.state.fence import SignerFence
from kms.state.view import KeyStateView
from kms.statements import StatementSigning
from kms.tuf.service import TrustBundleService
from signer._pb.signet.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from signer.config import ServerConfig
from signer.dev.softhsm import find_softhsm_module
from signer.servicers.attestation import AttestationServicer
from signer.servicers.base import Deferred
from signer.servicers.keys import KeyAdminServicer
from signer.servicers.statements import SupplyChainSigningServicer
from signer.servicers.trust import TrustServicer, start_trust_distribution
from signer.verification import resolver_from_keys

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAMES = (
    signing_pb2.DESCRIPTOR.services_by_name["Signing"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name,
    attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name,
    trust_pb2.DESCRIPTOR.services_by_name["Trust"].full_name,
)
INSECURE_WARNING = (
    "INSECURE DEVELOPMENT MODE: mTLS is OFF and every caller may sign with every key and "
    "administer everything. Never run this outside a throwaway development machine."
)


@dataclass
class RunningSigner:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    view: KeyStateView
    hsm: Pkcs11Hsm
    store: EtcdKeyStateStore
    background: list[asyncio.Task[None]]
    audit: AuditLog

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.audit.close()  # writes a final signed checkpoint
        await self.view.stop()
        await self.store.close()
        await self.hsm.close()


async def _open_audit(
    config: ServerConfig, store: EtcdKeyStateStore, hsm: Pkcs11Hsm, clock: SystemClock,
    *, signer_id: str, process_name: str,
) -> AuditLog:
    """This process's audit log, its checkpoints signed by the region's audit key in the HSM
    and anchored in etcd."""
    key = await ensure_region_key(
        store, store.layout.region_key("audit", config.region), hsm,
        role="audit", region=config.region,
    )
    signer = HsmCheckpointSigner(hsm, key.hsm_id, key.algorithm, key.public_key_der)

    async def anchor(checkpoint: Checkpoint) -> None:
        await store.put_record(store.layout.audit_checkpoint(signer_id), checkpoint.to_dict())

    directory = config.audit.directory / process_name
    log.info("audit log %s in %s", signer_id, directory)
    return await AuditLog.open(
        directory, signer_id, signer=signer, clock=clock, anchor=anchor,
        checkpoint_every_entries=config.audit.checkpoint_every_entries,
        checkpoint_every_seconds=config.audit.checkpoint_every_seconds,
    )


async def _open_hsm(config: ServerConfig) -> Pkcs11Hsm:
    """Log in to the configured token; the PIN lives only for the call."""
    pin = load_pin(
        str(config.hsm.pin_file) if config.hsm.pin_file else None, config.hsm.pin_env
    )
    return await Pkcs11Hsm.open(
        config.hsm.module or find_softhsm_module(), config.hsm.token_label, pin
    )


def _etcd_store(config: ServerConfig) -> EtcdKeyStateStore:
    tls = config.etcd.tls
    return EtcdKeyStateStore(
        EtcdConfig(
            endpoints=config.etcd.endpoints,
            ca_file=None if tls is None else tls.ca,
            cert_file=None if tls is None else tls.cert,
            key_file=None if tls is None else tls.key,
            prefix=config.etcd.prefix,
        )
    )


async def _set_health(health: HealthServicer, *, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in (*SERVICE_NAMES, ""):
        await health.set(name, status)


async def _follow_health(health: HealthServicer, view: KeyStateView,
                         interval: float = 0.5) -> None:
    """Report NOT_SERVING while this signer cannot prove its key state is current (etcd out
    of reach, lease lapsed, watch broken), so probes and load balancers route around it."""
    serving = True
    while True:
        await asyncio.sleep(interval)
        current = view.current
        if current != serving:
            serving = current
            await _set_health(health, serving=serving)
            if serving:
                log.info("key state is current again: health SERVING")
            else:
                log.warning("cannot prove key state is current: health NOT_SERVING")


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    if config.tls is None:
        raise ValueError("TLS files are required unless the server runs insecure")
    # require_client_auth: grpcio cannot request a certificate without requiring it, so a
    # caller without one is refused in the TLS handshake (docs/adr/0003-mtls-identity.md).
    return grpc.ssl_server_credentials(
        [(config.tls.key.read_bytes(), config.tls.cert.read_bytes())],
        root_certificates=config.tls.ca.read_bytes(),
        require_client_auth=True,
    )


async def start(config: ServerConfig) -> RunningSigner:
    """Open the HSM and etcd, start the server, and mark it SERVING once everything is ready.

    Raises ``KmsError`` subclasses with a message a person can act on when a dependency cannot
    be reached.
    """
    if config.insecure:
        log.warning(INSECURE_WARNING)
    health = HealthServicer()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await _set_health(health, serving=False)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    signing: Deferred[SigningService] = Deferred()
    admin: Deferred[KeyAdministration] = Deferred()
    state: Deferred[StateView] = Deferred()
    statements: Deferred[StatementSigning] = Deferred()
    signing_pb2_grpc.add_SigningServicer_to_server(
        SupplyChainSigningServicer(signing, state, statements, insecure=config.insecure), server
    )
    # No baseline is configurable yet, so Attest answers FAILED_PRECONDITION (issue 5).
    attestation_pb2_grpc.add_AttestationServicer_to_server(
        AttestationServicer(None, lambda: resolver_from_keys(view.all_keys()),
                            insecure=config.insecure), server
    )
    keys_pb2_grpc.add_KeyAdminServicer_to_server(
        KeyAdminServicer(admin, insecure=config.insecure), server
    )
    trust_service: Deferred[TrustBundleService] = Deferred()
    trust_pb2_grpc.add_TrustServicer_to_server(
        TrustServicer(trust_service, insecure=config.insecure), server
    )
    if config.insecure:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, _server_credentials(config))
    await server.start()
    log.info("listening on %s (port %d), region %s", config.listen, port, config.region)

    hsm = await _open_hsm(config)
    store = _etcd_store(config)
    clock = SystemClock()
    process_name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    signer_id = f"{config.region}/{process_name}"
    inflight = InflightSignatures()
    view = KeyStateView(
        store, clock, lease_ttl=config.lease_ttl_seconds, signer_id=signer_id, registry=store,
        fence_gate=inflight.drained_below,
    )
    await view.start()
    audit = await _open_audit(config, store, hsm, clock, signer_id=signer_id,
                              process_name=process_name)
    administration = KeyAdministration(
        hsm=hsm, store=store, view=view, clock=clock, audit=audit,
        fence=SignerFence(store, clock, timeout=config.lifecycle.fence_timeout_seconds),
        settings=config.lifecycle.settings,
    )
    maintenance = KeyMaintenance(
        admin=administration, registry=store, hsm=hsm, view=view, clock=clock,
        signer_id=signer_id, interval=config.lifecycle.maintenance_interval_seconds,
    )
    background = [asyncio.create_task(maintenance.run(), name="key-maintenance")]
    # Trust distribution (docs/adr/0007): a failure here leaves signing up and answers
    # GetTrustBundle with UNAVAILABLE, since verifiers can use another region meanwhile.
    try:
        distribution = await start_trust_distribution(
            config, store=store, hsm=hsm, view=view, clock=clock, signer_id=signer_id)
        trust_service.set(distribution.service)
        background += distribution.tasks
    except KmsError as error:
        log.error(  # noqa: TRY400 - the diagnostics say it all; no traceback in the log
            "trust distribution is off in this signer: %s", error.diagnostics())

    state.set(view)
    signing.set(SigningService(hsm=hsm, view=view, region=config.region, audit=audit,
                               inflight=inflight))
    statements.set(StatementSigning(signing=signing.get(), view=view))
    admin.set(administration)
    await _set_health(health, serving=True)
    background.append(asyncio.create_task(_follow_health(health, view), name="health"))
    log.info("serving: HSM token %r open, key state at revision %d",
             config.hsm.token_label, view.revision)
    return RunningSigner(server, port, health, view, hsm, store, background, audit)


async def serve(config: ServerConfig, *, on_ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    running = await start(config)
    if on_ready is not None:
        on_ready(running.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await running.stop()
