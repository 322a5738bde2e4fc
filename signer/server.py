"""Wiring: build the adapters from a config, start the gRPC server, stop cleanly.

Start-up is sealed: gRPC health reports NOT_SERVING until the HSM is logged in and a fresh key
state has been read from etcd; only then does it switch to SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import gc
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from kms.admin import KeyAdministration
from kms.audit.checkpoint import Checkpoint, HsmCheckpointSigner
from kms.audit.log import AuditLog
from kms.ceremony import Ceremonies
from kms.errors import KmsError
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
from kms.maintenance import KeyMaintenance
from kms.ports import AuditRecorder, Hsm, SystemClock
from kms.region_keys import ensure_region_key
from kms.replication import KeyReplicator
from kms.requests import RequestLedger
from kms.signing import InflightSignatures, SigningService, StateView
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.state.fence import SignerFence
from kms.state.view import KeyStateView
from kms.statements import StatementSigning
from kms.tuf.service import TrustBundleService
from signer._pb.signet.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    ceremony_pb2,
    ceremony_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from signer.config import ServerConfig
from signer.dashboard import DashboardSources, dashboard_routes, proposal_listing
from signer.dev.softhsm import find_softhsm_module
from signer.guard import DenialAuditor, GuardInterceptor
from signer.limits import Limiter
from signer.servicers.attestation import (
    AttestationServicer,
    AttestationSetup,
    load_attestation_setup,
)
from signer.servicers.base import Deferred
from signer.servicers.ceremony import CeremonyServicer
from signer.servicers.keys import KeyAdminServicer
from signer.servicers.statements import SupplyChainSigningServicer
from signer.servicers.trust import TrustServicer, start_trust_distribution
from signer.telemetry import (
    TelemetryInterceptor,
    TracedAudit,
    TracedHsm,
    etcd_observer,
    metrics,
    setup_tracing,
)
from signer.verification import resolver_from_keys

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAMES = (
    signing_pb2.DESCRIPTOR.services_by_name["Signing"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name,
    attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name,
    trust_pb2.DESCRIPTOR.services_by_name["Trust"].full_name,
    ceremony_pb2.DESCRIPTOR.services_by_name["Ceremony"].full_name,
)
INSECURE_WARNING = (
    "INSECURE DEVELOPMENT MODE: mTLS is OFF and every caller may sign with every key and "
    "administer everything. Never run this outside a throwaway development machine."
)
NO_CEREMONIES_WARNING = (
    "INSECURE DEVELOPMENT MODE: custodian ceremonies are OFF (ceremonies.required: false or "
    "insecure: true); administrators create, rotate, revoke and destroy keys and change the "
    "policy without any custodian approval. Never run this outside a development machine."
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
    guard: GuardInterceptor

    async def stop(self, grace: float = 10.0) -> None:
        """Drain, then stop: health says NOT_SERVING, new calls get UNAVAILABLE (retry
        elsewhere), calls in flight finish (at most ``grace`` seconds), and only then does
        the gRPC server shut down and everything behind it close."""
        await self.health.enter_graceful_shutdown()
        left = await self.guard.drain(grace)
        if left:
            log.warning("stopping with %d calls still running after %g s", left, grace)
        await self.server.stop(0.5)
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


async def _start_replication(
    config: ServerConfig, *, hsm: Pkcs11Hsm, store: EtcdKeyStateStore, view: KeyStateView,
    signer_id: str,
) -> KeyReplicator | None:
    """This region's transport key and replicator (docs/adr/0010). A failure leaves signing
    up (regional keys and replicas already here still sign) and is logged."""
    replicator = KeyReplicator(hsm=hsm, store=store, view=view, region=config.region,
                               signer_id=signer_id,
                               bootstrap_register=config.multi_region.bootstrap_register)
    try:
        await replicator.start()
    except KmsError as error:
        log.error(  # noqa: TRY400 - the diagnostics say it all; no traceback in the log
            "multi-region replication is off in this signer: %s", error.diagnostics())
        return None
    return replicator


def _replication_tasks(replicator: KeyReplicator | None) -> list[asyncio.Task[None]]:
    if replicator is None:
        return []
    return [asyncio.create_task(replicator.run(), name="key-replication")]


def _request_ledger(config: ServerConfig, store: EtcdKeyStateStore, signer_id: str
                    ) -> RequestLedger | None:
    """Request-id idempotency (kms.requests), unless the window is 0."""
    window = config.multi_region.request_window_seconds
    if not window:
        return None
    return RequestLedger(store, signer_id=signer_id, window_seconds=window,
                         group_linger=config.multi_region.request_group_linger_ms / 1000)


@dataclass
class _Services:
    """The back ends the servicers use, set once start-up has finished (until then every call
    answers UNAVAILABLE while health says NOT_SERVING)."""

    attestation: Deferred[AttestationSetup] | None  # None: Attest answers FAILED_PRECONDITION
    signing: Deferred[SigningService] = field(default_factory=Deferred)
    admin: Deferred[KeyAdministration] = field(default_factory=Deferred)
    state: Deferred[StateView] = field(default_factory=Deferred)
    view: Deferred[KeyStateView] = field(default_factory=Deferred)
    statements: Deferred[StatementSigning] = field(default_factory=Deferred)
    trust: Deferred[TrustBundleService] = field(default_factory=Deferred)
    ceremonies: Deferred[Ceremonies] = field(default_factory=Deferred)


def _add_services(server: grpc.aio.Server, config: ServerConfig, services: _Services) -> None:
    insecure = config.insecure
    signing_pb2_grpc.add_SigningServicer_to_server(
        SupplyChainSigningServicer(services.signing, services.state, services.statements,
                                   insecure=insecure), server)
    attestation_pb2_grpc.add_AttestationServicer_to_server(
        AttestationServicer(services.attestation,
                            lambda: resolver_from_keys(services.view.get().all_keys()),
                            insecure=insecure), server)
    keys_pb2_grpc.add_KeyAdminServicer_to_server(
        KeyAdminServicer(services.admin, insecure=insecure), server)
    trust_pb2_grpc.add_TrustServicer_to_server(
        TrustServicer(services.trust, insecure=insecure), server)
    ceremony_pb2_grpc.add_CeremonyServicer_to_server(
        CeremonyServicer(services.ceremonies, SystemClock(), insecure=insecure), server)


async def _open_hsm(config: ServerConfig) -> Pkcs11Hsm:
    """Log in to the configured token; the PIN lives only for the call."""
    pin = load_pin(
        str(config.hsm.pin_file) if config.hsm.pin_file else None, config.hsm.pin_env
    )
    return await Pkcs11Hsm.open(
        config.hsm.module or find_softhsm_module(), config.hsm.token_label, pin,
        signing=config.hsm.signing,
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
        ),
        observer=etcd_observer(),
    )


def _instrumented(config: ServerConfig, hsm: Hsm, audit: AuditRecorder
                  ) -> tuple[Hsm, AuditRecorder]:
    """The HSM and audit ports with tracing wrappers, or bare with ``telemetry.enabled``
    false (no span or metric per call; the cost is measured in bench/README.md)."""
    if not config.telemetry.enabled:
        return hsm, audit
    return TracedHsm(hsm), TracedAudit(audit)


def _start_telemetry(config: ServerConfig, signer_id: str) -> None:
    """Trace export and the Prometheus endpoint, as configured (both off by default)."""
    settings = config.telemetry
    metrics()  # registered from the start, so alerts see zero baselines
    if settings.otlp_endpoint or settings.console_traces:
        setup_tracing(service_name="signet-signer", region=config.region, signer_id=signer_id,
                      otlp_endpoint=settings.otlp_endpoint or None,
                      otlp_insecure=settings.otlp_insecure, console=settings.console_traces)
    if settings.metrics_listen:
        host, _, port = settings.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host)
        log.info("Prometheus metrics at http://%s/metrics", settings.metrics_listen)


async def _export_gauges(view: KeyStateView, audit: AuditLog,
                         trust: Deferred[TrustBundleService], interval: float = 1.0) -> None:
    """Keep the gauges that describe state (not events) current."""
    recorded = metrics()
    rounds = 0
    while True:
        if rounds % 5 == 0:  # the bundle pointer is one etcd read; every 5 s is plenty
            with contextlib.suppress(KmsError):
                publication = await trust.get().publication()
                if publication is not None:
                    recorded.bundle_version.set(publication.timestamp_version)
                    recorded.bundle_age.set(max(0.0, time.time()
                                                - publication.timestamp_signed_at))
        rounds += 1
        recorded.lease_current.set(1 if view.current else 0)
        recorded.key_state_revision.set(view.revision)
        recorded.audit_entries.set(audit.size)
        checkpoint = audit.last_checkpoint
        if checkpoint is not None:
            written = datetime.datetime.strptime(checkpoint.time, "%Y-%m-%dT%H:%M:%S.%fZ")
            age = time.time() - written.replace(tzinfo=datetime.UTC).timestamp()
            recorded.audit_checkpoint_age.set(max(0.0, age))
        await asyncio.sleep(interval)


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


async def _listen(server: grpc.aio.Server, config: ServerConfig) -> int:
    if config.insecure:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, _server_credentials(config))
    await server.start()
    log.info("listening on %s (port %d), region %s", config.listen, port, config.region)
    return port


def _grpc_server(config: ServerConfig, health: HealthServicer, limits: Limiter | None
                 ) -> tuple[grpc.aio.Server, DenialAuditor, GuardInterceptor]:
    """The gRPC server with health and reflection, and its interceptors: per-identity limits
    and audited denials (docs/adr/0012) inside telemetry when that is on, so refused calls
    still show in the metrics. The auditor writes once the audit log is attached."""
    denials = DenialAuditor(config.limits, count_event=metrics().security_events)
    guard = GuardInterceptor(config.limits, denials, insecure=config.insecure, limiter=limits)
    server = grpc.aio.server(
        interceptors=[TelemetryInterceptor(), guard] if config.telemetry.enabled else [guard],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    return server, denials, guard


async def start(config: ServerConfig, *, listen_when_ready: bool = False,
                limits: Limiter | None = None) -> RunningSigner:
    """Open the HSM and etcd, start the server, and mark it SERVING once everything is ready.

    By default the port answers from the start (health NOT_SERVING, calls UNAVAILABLE until
    ready); with ``listen_when_ready`` it is bound only once everything is ready, which is
    what a worker sharing the port with its siblings wants.

    Raises ``KmsError`` subclasses with a message a person can act on when a dependency cannot
    be reached.
    """
    if config.insecure:
        log.warning(INSECURE_WARNING)
    if not config.ceremonies_required:
        log.warning(NO_CEREMONIES_WARNING)
    health = HealthServicer()
    server, denials, guard = _grpc_server(config, health, limits)
    await _set_health(health, serving=False)
    services = _Services(attestation=None if config.attestation is None else Deferred())
    _add_services(server, config, services)
    signing, admin, state, statements = (
        services.signing, services.admin, services.state, services.statements)
    attestation, trust_service = services.attestation, services.trust
    # A worker sharing the port with SO_REUSEPORT listens only once ready, so the kernel
    # never hands a new connection to a worker that is still starting (docs/adr/0008).
    port = 0 if listen_when_ready else await _listen(server, config)

    hsm = await _open_hsm(config)
    store = _etcd_store(config)
    clock = SystemClock()
    process_name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    signer_id = f"{config.region}/{process_name}"
    _start_telemetry(config, signer_id)
    inflight = InflightSignatures()
    view = KeyStateView(
        store, clock, lease_ttl=config.lease_ttl_seconds, signer_id=signer_id, registry=store,
        fence_gate=inflight.drained_below,
    )
    await view.start()
    audit = await _open_audit(config, store, hsm, clock, signer_id=signer_id,
                              process_name=process_name)
    traced_hsm, traced_audit = _instrumented(config, hsm, audit)
    denials.attach(traced_audit)
    replicator = await _start_replication(config, hsm=hsm, store=store, view=view,
                                          signer_id=signer_id)
    administration = KeyAdministration(
        hsm=traced_hsm, store=store, view=view, clock=clock, audit=traced_audit,
        fence=SignerFence(store, clock, timeout=config.lifecycle.fence_timeout_seconds),
        settings=config.lifecycle.settings, ceremonies_required=config.ceremonies_required,
        region=config.region, replicator=replicator,
    )
    ceremonies = Ceremonies(
        records=store, layout=store.layout, admin=administration, hsm=traced_hsm, view=view,
        clock=clock, fence=SignerFence(store, clock,
                                       timeout=config.lifecycle.fence_timeout_seconds),
        settings=config.lifecycle.settings, audit=traced_audit,
        min_lifetime_seconds=config.ceremony_min_lifetime_seconds)
    services.ceremonies.set(ceremonies)
    maintenance = KeyMaintenance(
        admin=administration, registry=store, hsm=hsm, view=view, clock=clock,
        signer_id=signer_id, interval=config.lifecycle.maintenance_interval_seconds,
        purge_closed_proposals=functools.partial(ceremonies.purge_closed,
                                                 config.ceremony_retention_seconds),
    )
    background = [asyncio.create_task(maintenance.run(), name="key-maintenance"),
                  *_replication_tasks(replicator)]
    # Trust distribution (docs/adr/0007): a failure here leaves signing up and answers
    # GetTrustBundle with UNAVAILABLE, since verifiers can use another region meanwhile.
    # The dashboard shares the /tuf/ port, so only worker 0 serves it (signer/workers.py).
    try:
        distribution = await start_trust_distribution(
            config, store=store, hsm=hsm, view=view, clock=clock, signer_id=signer_id,
            routes=dashboard_routes(config.dashboard, DashboardSources(
                region=config.region, signer_id=signer_id, view=view, store=store,
                audit_directory=audit.directory, audit_log_id=audit.log_id,
                trust=trust_service.get, registry=metrics().registry,
                ceremonies=proposal_listing(store, clock.now))))
        trust_service.set(distribution.service)
        background += distribution.tasks
    except KmsError as error:
        log.error(  # noqa: TRY400 - the diagnostics say it all; no traceback in the log
            "trust distribution is off in this signer: %s", error.diagnostics())

    state.set(view)
    services.view.set(view)
    signing.set(SigningService(hsm=traced_hsm, view=view, region=config.region,
                               audit=traced_audit, inflight=inflight,
                               requests=_request_ledger(config, store, signer_id)))
    statements.set(StatementSigning(signing=signing.get(), view=view))
    if attestation is not None and config.attestation is not None:
        attestation.set(load_attestation_setup(
            config.attestation, audit=audit, count_event=metrics().security_events))
    admin.set(administration)
    await _set_health(health, serving=True)
    if listen_when_ready:
        port = await _listen(server, config)
    background.append(asyncio.create_task(_follow_health(health, view), name="health"))
    background.append(asyncio.create_task(_export_gauges(view, audit, trust_service),
                                          name="gauges"))
    log.info("serving: HSM token %r open, key state at revision %d",
             config.hsm.token_label, view.revision)
    return RunningSigner(server, port, health, view, hsm, store, background, audit, guard)


# Container allocations (net of frees) between two young-generation collections: CPython's
# 700 made a busy worker collect ~50 times a second, 2 % of its CPU (docs/adr/0013).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Once the signer is up: move everything allocated so far (modules, config, protobuf
    descriptors, key state) out of the collector's reach with ``gc.freeze()``, and collect
    the young generation after ``GC_YOUNG_THRESHOLD`` net container allocations instead of
    700. Requests free almost everything they allocate by reference counting, so cycles are
    still collected, just less often."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def serve(
    config: ServerConfig, *, on_ready: Callable[[int], None] | None = None,
    listen_when_ready: bool = False, limits: Limiter | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop. ``limits``: the per-identity
    limits this worker shares with its siblings (signer/limits.py); None keeps its own."""
    running = await start(config, listen_when_ready=listen_when_ready, limits=limits)
    tune_gc()
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
