"""The signer's configuration file (YAML or JSON), validated into frozen dataclasses.

Example::

    region: eu-west
    listen: 127.0.0.1:7443
    tls: {cert: server.pem, key: server-key.pem, client_ca: ca.pem}
    etcd:
      endpoints: [127.0.0.1:2379, 127.0.0.1:2479, 127.0.0.1:2579]
      tls: {ca: ca.pem, cert: etcd-client.pem, key: etcd-client-key.pem}   # optional
    hsm:
      module: /usr/lib/softhsm/libsofthsm2.so   # any PKCS#11 module; optional for SoftHSM
      token_label: signet-eu-west
      pin_file: /run/secrets/hsm-pin           # or pin_env: SIGNET_HSM_PIN
      signing: auto                             # inline | thread; auto: inline for SoftHSM
                                                # (docs/adr/0013); thread for network HSMs
    lease_ttl_seconds: 5
    workers: 2                                  # optional; default: one per core (docs/adr/0008)
    audit:                                      # optional; these are the defaults
      directory: audit                          # one log folder per signer process inside
      checkpoint_every_entries: 10000
      checkpoint_every_seconds: 10
    lifecycle:                                  # optional; these are the defaults
      default_destroy_wait_seconds: 2592000     # 30 days
      min_destroy_wait_seconds: 86400           # lower only for tests and demos
      maintenance_interval_seconds: 1           # rotation / retirement / destruction checks
      fence_timeout_seconds: 10                 # default: twice the lease TTL
    trust:                                      # optional; TUF repository (docs/adr/0007)
      http_listen: 127.0.0.1:0                  # /tuf/ over HTTPS (HTTP when insecure); "" off
      timestamp_expiry_seconds: 86400           # timestamp.json lifetime
      timestamp_resign_seconds: 3600            # renew the timestamp when it is this old
      metadata_expiry_seconds: 604800           # snapshot and targets lifetime
    telemetry:                                  # optional; everything off by default
      enabled: true                             # false: no RPC interceptor, spans or metrics
                                                # wrappers at all (the fastest path)
      metrics_listen: 127.0.0.1:9464            # Prometheus /metrics; "" off; worker N: port+N
      otlp_endpoint: otel-collector:4317        # OTLP/gRPC trace export; "" off
      otlp_insecure: false                      # plaintext to the collector
      console_traces: false                     # print spans (development)
    attestation:                                # optional; without it Attest is refused
      baseline: baseline.yaml                   # expected measurements (kms/attestation.py)
      policy: verification-policy.yaml          # who may sign the provenance, what it shows

    multi_region:                               # optional (docs/adr/0010); these are defaults
      bootstrap_register: false                 # dev only: register this region's transport
                                                # key without the onboarding ceremony
      request_window_seconds: 600               # remember sign request ids this long; 0 off
      request_group_linger_ms: 5                # a busy worker's request-id lookup waits this
                                                # long for others to share its etcd round trip

    limits:                                     # optional (docs/adr/0012); these are defaults
      per_identity_rps: 2000                    # token-bucket refill per caller identity; 0 off
      per_identity_burst: 4000                  # bucket size
      per_identity_concurrency: 256             # calls in flight per identity; 0 off
      identities:                               # optional: other limits for some identities
        spiffe://example.org/release: {per_identity_rps: 5000, per_identity_burst: 10000}

    ceremonies:                                 # optional (docs/adr/0009)
      required: true                            # lifecycle changes need custodian ceremonies
      retention_seconds: 2592000                # delete closed proposals after 30 days
                                                # (the audit log keeps them for good)
    dashboard:                                  # optional; off without a token file
      token_file: /run/secrets/dashboard-token  # read-only bearer token (never in the config)
      reports_dir: drills                       # optional: drill reports (*.json) to list
      admission_log: admission-decisions.jsonl  # optional: `signet admission serve` decisions

Relative paths are resolved against the file's folder. ``insecure: true`` turns mTLS off for
development; the signer then warns on every start. ``ceremonies: {required: false}`` is the
INSECURE development mode in which administrators call the lifecycle RPCs (CreateKey,
RotateKey, RevokeVersion…) directly, without custodians; ``insecure: true`` implies it. The
signer logs a WARNING on every start in that mode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from kms.admin import LifecycleSettings
from kms.errors import InvalidArgument
from kms.hsm.pkcs11 import SIGNING_MODES
from kms.state.etcd import EtcdConfig
from signer.limits import IdentityLimits, LimitsConfig

DEFAULT_CEREMONY_RETENTION_SECONDS = 30 * 86_400.0


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    tls: TlsFiles | None = None
    prefix: str = "/signet/v1"


@dataclass(frozen=True)
class HsmSettings:
    token_label: str
    module: str | None = None
    pin_file: Path | None = None
    pin_env: str | None = None
    signing: str = "auto"  # kms.hsm.pkcs11.SIGNING_MODES


@dataclass(frozen=True)
class LifecycleConfig:
    """``lifecycle:`` section. Destruction waits ``default_destroy_wait_seconds`` (30 days)
    unless a request asks for longer; no request may ask for less than
    ``min_destroy_wait_seconds`` (1 day) — lower it only for tests and demos."""

    default_destroy_wait_seconds: float = 30 * 86_400
    min_destroy_wait_seconds: float = 86_400
    maintenance_interval_seconds: float = 1.0
    fence_timeout_seconds: float = 0.0  # 0: twice the lease TTL

    @property
    def settings(self) -> LifecycleSettings:
        return LifecycleSettings(self.default_destroy_wait_seconds, self.min_destroy_wait_seconds)


@dataclass(frozen=True)
class AuditConfig:
    """``audit:`` section. Each signer process writes its own log in a new folder under
    ``directory`` (``<host>-<pid>-<random>``); checkpoints are signed by the region's audit key
    in the HSM and anchored in etcd."""

    directory: Path
    checkpoint_every_entries: int = 10_000
    checkpoint_every_seconds: float = 10.0


@dataclass(frozen=True)
class TrustConfig:
    """``trust:`` section: where ``/tuf/`` is served and how long online metadata lives."""

    http_listen: str = "127.0.0.1:0"
    timestamp_expiry_seconds: float = 86_400.0
    timestamp_resign_seconds: float = 3_600.0
    metadata_expiry_seconds: float = 7 * 86_400.0


@dataclass(frozen=True)
class TelemetryConfig:
    """``telemetry:`` section (docs/operator-guide.md). ``metrics_listen`` "" turns the
    Prometheus endpoint off; ``otlp_endpoint`` "" turns trace export off. ``enabled`` false
    drops the per-RPC interceptor and the HSM/audit tracing wrappers (no spans, no RPC or
    signature metrics; the state gauges stay) — measured in bench/README.md."""

    enabled: bool = True
    metrics_listen: str = ""
    otlp_endpoint: str = ""
    otlp_insecure: bool = False
    console_traces: bool = False


@dataclass(frozen=True)
class AttestationConfig:
    """``attestation:`` section: the files runtime attestation (``Attest``) decides with — the
    baseline of expected measurements and the verification policy the workload's provenance
    must pass (docs/verification-policy.md). They are read when the signer starts."""

    baseline: Path
    policy: Path


@dataclass(frozen=True)
class DashboardConfig:
    """``dashboard:`` section: the read-only operator page at ``/dashboard`` on the ``/tuf/``
    HTTPS port (``signer/dashboard.py``). ``token_file`` holds the bearer token; the files
    are read when the signer starts (the token) or on each page (reports, decisions)."""

    token_file: Path
    reports_dir: Path | None = None
    admission_log: Path | None = None


@dataclass(frozen=True)
class MultiRegionConfig:
    """``multi_region:`` section (docs/adr/0010-multi-region.md)."""

    bootstrap_register: bool = False
    request_window_seconds: float = 600.0
    request_group_linger_ms: float = 5.0


def _is_number(value: Any) -> bool:
    """An int or a float; YAML's ``true``/``false`` are not numbers here."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _multi_region(raw: Any) -> MultiRegionConfig:
    if not isinstance(raw, Mapping) or set(raw) - {"bootstrap_register",
                                                   "request_window_seconds",
                                                   "request_group_linger_ms"}:
        raise InvalidArgument("config 'multi_region' must be a mapping with only "
                              "bootstrap_register, request_window_seconds and "
                              "request_group_linger_ms")
    register = raw.get("bootstrap_register", False)
    window = raw.get("request_window_seconds", 600)
    linger = raw.get("request_group_linger_ms", 5)
    if not isinstance(register, bool):
        raise InvalidArgument("config multi_region.bootstrap_register must be true or false")
    if not _is_number(window) or not (window == 0 or 1 <= window <= 86_400):
        raise InvalidArgument("config multi_region.request_window_seconds must be 0 (off) or "
                              "from 1 to 86400")
    if not _is_number(linger) or not 0 <= linger <= 100:
        raise InvalidArgument("config multi_region.request_group_linger_ms must be from 0 "
                              "(never wait) to 100")
    return MultiRegionConfig(register, float(window), float(linger))


@dataclass(frozen=True)
class ServerConfig:
    region: str
    listen: str
    etcd: EtcdSettings
    hsm: HsmSettings
    tls: TlsFiles | None
    insecure: bool = False
    lease_ttl_seconds: int = 5
    lifecycle: LifecycleConfig = LifecycleConfig()
    audit: AuditConfig = AuditConfig(Path("audit"))
    trust: TrustConfig = TrustConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    workers: int | None = None  # None: one per core (see ``worker_count``)
    # False only in the insecure development mode: lifecycle RPCs then skip ceremonies.
    ceremonies_required: bool = True
    # Closed (executed, cancelled, failed, expired) proposals are deleted after this long.
    ceremony_retention_seconds: float = DEFAULT_CEREMONY_RETENTION_SECONDS
    ceremony_min_lifetime_seconds: float = 60.0  # shortest proposal lifetime accepted
    attestation: AttestationConfig | None = None
    multi_region: MultiRegionConfig = MultiRegionConfig()
    limits: LimitsConfig = LimitsConfig()  # noqa: RUF009 - frozen, immutable
    dashboard: DashboardConfig | None = None  # None: no token file configured, dashboard off

    def worker_count(self, override: int | None = None) -> int:
        """How many worker processes ``signet serve`` runs: ``override`` (``--workers``), else
        ``workers:``, else one per core. More than one needs a fixed listen port, since a port
        picked by the kernel (``:0``) cannot be shared; without an explicit count such a config
        runs one process. Raises ``InvalidArgument`` for an explicit count above one on port 0.
        """
        explicit = override if override is not None else self.workers
        if explicit is not None and explicit < 1:
            raise InvalidArgument("the number of workers must be 1 or more")
        fixed_port = self.listen.rpartition(":")[2] not in ("", "0")
        if explicit is None:
            return (os.cpu_count() or 1) if fixed_port else 1
        if explicit > 1 and not fixed_port:
            raise InvalidArgument(
                f"{explicit} workers cannot share listen port 0 (each would get its own "
                "port); give 'listen' a fixed port, or run one worker"
            )
        return explicit

    @classmethod
    def load(cls, path: Path) -> ServerConfig:
        """Read and validate a config file; raises ``InvalidArgument`` naming the problem."""
        try:
            text = path.read_text()
        except OSError as error:
            raise InvalidArgument(f"cannot read config file {path}: {error.strerror}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise InvalidArgument(f"config file {path} is not valid: {error}") from None
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_dict(cls, data: Any, *, base: Path) -> ServerConfig:
        if not isinstance(data, Mapping):
            raise InvalidArgument("the config must be a mapping")

        def path(value: Any, where: str) -> Path:
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"config {where} must be a file path")
            p = Path(value)
            return p if p.is_absolute() else base / p

        def section(name: str) -> Mapping[str, Any]:
            value = data.get(name)
            if not isinstance(value, Mapping):
                raise InvalidArgument(f"config needs a '{name}' section")
            return value

        def tls_files(value: Any, where: str, ca_field: str) -> TlsFiles:
            if not isinstance(value, Mapping):
                raise InvalidArgument(f"config {where} must be a mapping")
            return TlsFiles(
                cert=path(value.get("cert"), f"{where}.cert"),
                key=path(value.get("key"), f"{where}.key"),
                ca=path(value.get(ca_field), f"{where}.{ca_field}"),
            )

        region = data.get("region", "local")
        listen = data.get("listen")
        if not isinstance(region, str) or not region:
            raise InvalidArgument("config 'region' must be a non-empty string")
        if not isinstance(listen, str) or ":" not in listen:
            raise InvalidArgument("config 'listen' must be host:port, e.g. 127.0.0.1:7443")
        insecure = data.get("insecure", False)
        if not isinstance(insecure, bool):
            raise InvalidArgument("config 'insecure' must be true or false")
        tls = None if insecure else tls_files(data.get("tls"), "tls", "client_ca")

        etcd = section("etcd")
        endpoints = etcd.get("endpoints")
        if not isinstance(endpoints, list) or not endpoints or not all(
            isinstance(e, str) and ":" in e for e in endpoints
        ):
            raise InvalidArgument("config etcd.endpoints must be a list of host:port")
        try:
            EtcdConfig(endpoints=tuple(endpoints)).grpc_target()
        except ValueError as error:
            raise InvalidArgument(f"config etcd.endpoints: {error}") from None
        etcd_tls = None if etcd.get("tls") is None else tls_files(etcd["tls"], "etcd.tls", "ca")

        hsm = _hsm(section("hsm"), path)
        ttl = data.get("lease_ttl_seconds", 5)
        if not isinstance(ttl, int) or not 1 <= ttl <= 60:
            raise InvalidArgument("config lease_ttl_seconds must be a whole number from 1 to 60")
        lifecycle = _lifecycle(data.get("lifecycle", {}), ttl)
        raw_audit = data.get("audit", {})
        if not isinstance(raw_audit, Mapping):
            raise InvalidArgument("config 'audit' must be a mapping")
        audit = _audit(raw_audit, path(raw_audit.get("directory", "audit"), "audit.directory"))
        return cls(
            region=region,
            listen=listen,
            etcd=EtcdSettings(
                endpoints=tuple(endpoints),
                tls=etcd_tls,
                prefix=str(etcd.get("prefix", "/signet/v1")),
            ),
            hsm=hsm,
            tls=tls,
            insecure=insecure,
            lease_ttl_seconds=ttl,
            lifecycle=lifecycle,
            audit=audit,
            trust=_trust(data.get("trust", {})),
            telemetry=_telemetry(data.get("telemetry", {})),
            workers=_workers(data.get("workers")),
            attestation=_attestation(data.get("attestation"), base),
            ceremonies_required=_ceremonies_required(data.get("ceremonies", {}), insecure),
            ceremony_retention_seconds=_ceremony_retention(data.get("ceremonies", {})),
            ceremony_min_lifetime_seconds=_ceremony_min_lifetime(data.get("ceremonies", {})),
            dashboard=_dashboard(data.get("dashboard"), base),
            multi_region=_multi_region(data.get("multi_region", {})),
            limits=_limits(data.get("limits", {})),
        )


def _hsm(raw: Mapping[str, Any], path: Callable[[Any, str], Path]) -> HsmSettings:
    label = raw.get("token_label")
    if not isinstance(label, str) or not label:
        raise InvalidArgument("config hsm.token_label must name the PKCS#11 token")
    pin_file = raw.get("pin_file")
    pin_env = raw.get("pin_env")
    if pin_file is None and pin_env is None:
        raise InvalidArgument("config hsm needs pin_file or pin_env (never the PIN itself)")
    if "pin" in raw:
        raise InvalidArgument(
            "config hsm.pin is not accepted: keep the PIN out of config files; "
            "use pin_file or pin_env"
        )
    module = raw.get("module")
    signing = raw.get("signing", "auto")
    if signing not in SIGNING_MODES:
        raise InvalidArgument(
            f"config hsm.signing must be one of {', '.join(SIGNING_MODES)}, not {signing!r}: "
            "inline signs on the event loop (modules that compute in-process, like SoftHSM), "
            "thread hands each signature to the HSM thread (modules that wait on a network)")
    return HsmSettings(
        token_label=label,
        module=None if module is None else str(module),
        pin_file=None if pin_file is None else path(pin_file, "hsm.pin_file"),
        pin_env=None if pin_env is None else str(pin_env),
        signing=signing,
    )


def _ceremonies_required(raw: Any, insecure: bool) -> bool:
    if not isinstance(raw, Mapping) or set(raw) - {
            "required", "retention_seconds", "min_lifetime_seconds"}:
        raise InvalidArgument("config 'ceremonies' must be a mapping with only 'required', "
                              "'retention_seconds' and 'min_lifetime_seconds'")
    required = raw.get("required", True)
    if not isinstance(required, bool):
        raise InvalidArgument("config ceremonies.required must be true or false (false is the "
                              "insecure development mode)")
    return required and not insecure


def _ceremony_min_lifetime(raw: Any) -> float:
    value = raw.get("min_lifetime_seconds", 60) if isinstance(raw, Mapping) else 60
    if not _is_number(value) or not 1 <= value <= 60:
        raise InvalidArgument("config ceremonies.min_lifetime_seconds must be 1 to 60 seconds "
                              "(lower than 60 only for tests)")
    return float(value)


def _ceremony_retention(raw: Any) -> float:
    value = raw.get("retention_seconds", DEFAULT_CEREMONY_RETENTION_SECONDS) \
        if isinstance(raw, Mapping) else DEFAULT_CEREMONY_RETENTION_SECONDS
    if not _is_number(value) or value < 0:
        raise InvalidArgument("config ceremonies.retention_seconds must be a number of seconds "
                              "(0 or more) after which closed proposals are deleted")
    return float(value)


def _workers(raw: Any) -> int | None:
    if raw is not None and (
        isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 256
    ):
        raise InvalidArgument("config 'workers' must be a whole number from 1 to 256")
    return raw


def _lifecycle(raw: Any, lease_ttl: int) -> LifecycleConfig:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config 'lifecycle' must be a mapping")
    unknown = set(raw) - set(LifecycleConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"config lifecycle has unknown fields: {sorted(unknown)}")
    numbers = {}
    for field_name, value in raw.items():
        if not _is_number(value) or value < 0:
            raise InvalidArgument(
                f"config lifecycle.{field_name} must be a number of seconds (>= 0)"
            )
        numbers[field_name] = float(value)
    lifecycle = LifecycleConfig(**numbers)
    if lifecycle.min_destroy_wait_seconds > lifecycle.default_destroy_wait_seconds:
        raise InvalidArgument(
            "config lifecycle.min_destroy_wait_seconds exceeds default_destroy_wait_seconds"
        )
    if not lifecycle.fence_timeout_seconds:
        lifecycle = replace(lifecycle, fence_timeout_seconds=2.0 * lease_ttl)
    return lifecycle


def _audit(raw: Mapping[str, Any], directory: Path) -> AuditConfig:
    unknown = set(raw) - set(AuditConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"config audit has unknown fields: {sorted(unknown)}")
    every_entries = raw.get("checkpoint_every_entries", 10_000)
    every_seconds = raw.get("checkpoint_every_seconds", 10.0)
    if not isinstance(every_entries, int) or every_entries < 1:
        raise InvalidArgument("config audit.checkpoint_every_entries must be 1 or more")
    if not isinstance(every_seconds, int | float) or every_seconds <= 0:
        raise InvalidArgument("config audit.checkpoint_every_seconds must be positive")
    return AuditConfig(directory, every_entries, float(every_seconds))


def _trust(raw: Any) -> TrustConfig:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config 'trust' must be a mapping")
    unknown = set(raw) - set(TrustConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"config trust has unknown fields: {sorted(unknown)}")
    listen = raw.get("http_listen", TrustConfig.http_listen)
    if not isinstance(listen, str) or (listen and ":" not in listen):
        raise InvalidArgument("config trust.http_listen must be host:port, or empty for none")
    numbers = {}
    for name in ("timestamp_expiry_seconds", "timestamp_resign_seconds",
                 "metadata_expiry_seconds"):
        value = raw.get(name, getattr(TrustConfig, name))
        if not _is_number(value) or value <= 0:
            raise InvalidArgument(f"config trust.{name} must be a positive number of seconds")
        numbers[name] = float(value)
    trust = TrustConfig(http_listen=listen, **numbers)
    if trust.timestamp_resign_seconds >= trust.timestamp_expiry_seconds:
        raise InvalidArgument("config trust.timestamp_resign_seconds must be below "
                              "timestamp_expiry_seconds, or the timestamp expires unrenewed")
    if trust.metadata_expiry_seconds < 2 * trust.timestamp_expiry_seconds:
        raise InvalidArgument("config trust.metadata_expiry_seconds must be at least twice "
                              "timestamp_expiry_seconds")
    return trust


_IDENTITY_LIMIT_FIELDS = ("per_identity_rps", "per_identity_burst", "per_identity_concurrency")


def _limits(raw: Any) -> LimitsConfig:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config 'limits' must be a mapping")
    numeric = {name: f for name, f in LimitsConfig.__dataclass_fields__.items()
               if name != "identities"}
    unknown = set(raw) - set(numeric) - {"identities"}
    if unknown:
        raise InvalidArgument(f"config limits has unknown fields: {sorted(unknown)}")
    values: dict[str, Any] = {
        name: _limit_value(f"limits.{name}", raw.get(name, f.default), f.type in (int, "int"))
        for name, f in numeric.items()}
    _check_burst("limits", values["per_identity_rps"], values["per_identity_burst"])
    named = raw.get("identities") or {}
    if not isinstance(named, Mapping):
        raise InvalidArgument("config limits.identities must map identities (URIs) to limits")
    identities = {}
    for identity, overrides in named.items():
        where = f"limits.identities[{identity!r}]"
        if not isinstance(identity, str) or not identity:
            raise InvalidArgument("config limits.identities keys must be identity URIs")
        if not isinstance(overrides, Mapping) or not overrides:
            raise InvalidArgument(f"config {where} must set some of {list(_IDENTITY_LIMIT_FIELDS)}")
        unknown = set(overrides) - set(_IDENTITY_LIMIT_FIELDS)
        if unknown:
            raise InvalidArgument(f"config {where} has unknown fields: {sorted(unknown)}; "
                                  f"it may set {list(_IDENTITY_LIMIT_FIELDS)}")
        own = {name: _limit_value(f"{where}.{name}", overrides.get(name, values[name]),
                                  numeric[name].type in (int, "int"))
               for name in _IDENTITY_LIMIT_FIELDS}
        _check_burst(where, own["per_identity_rps"], own["per_identity_burst"])
        identities[identity] = IdentityLimits(own["per_identity_rps"], own["per_identity_burst"],
                                              own["per_identity_concurrency"])
    return LimitsConfig(**values, identities=identities)


def _limit_value(where: str, value: Any, whole: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int if whole else int | float) \
            or value < 0 or value > 1_000_000:
        kind = "a whole number" if whole else "a number"
        raise InvalidArgument(f"config {where} must be {kind} from 0 to 1000000")
    return value if whole else float(value)


def _check_burst(where: str, rps: float, burst: int) -> None:
    if rps and burst < 1:
        raise InvalidArgument(f"config {where}.per_identity_burst must be at least 1 while "
                              "per_identity_rps is on")


def _telemetry(raw: Any) -> TelemetryConfig:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config 'telemetry' must be a mapping")
    unknown = set(raw) - set(TelemetryConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"config telemetry has unknown fields: {sorted(unknown)}")
    for name in ("metrics_listen", "otlp_endpoint"):
        if not isinstance(raw.get(name, ""), str):
            raise InvalidArgument(f"config telemetry.{name} must be a string")
    listen = raw.get("metrics_listen", "")
    if listen and ":" not in listen:
        raise InvalidArgument("config telemetry.metrics_listen must be host:port, or empty")
    for name in ("enabled", "otlp_insecure", "console_traces"):
        if not isinstance(raw.get(name, False), bool):
            raise InvalidArgument(f"config telemetry.{name} must be true or false")
    if raw.get("enabled") is False and (raw.get("otlp_endpoint") or raw.get("console_traces")):
        raise InvalidArgument("config telemetry.enabled is false, so there are no traces to "
                              "export: remove otlp_endpoint and console_traces, or enable it")
    return TelemetryConfig(**raw)


def _attestation(raw: Any, base: Path) -> AttestationConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config 'attestation' must be a mapping")
    unknown = set(raw) - set(AttestationConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"config attestation has unknown fields: {sorted(unknown)}")
    files = {}
    for name in ("baseline", "policy"):
        value = raw.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"config attestation.{name} must be a file path")
        files[name] = Path(value) if Path(value).is_absolute() else base / value
    return AttestationConfig(**files)


def _dashboard(raw: Any, base: Path) -> DashboardConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config 'dashboard' must be a mapping")
    if "token" in raw:
        raise InvalidArgument("config dashboard.token is not accepted: keep the token out of "
                              "config files; use token_file")
    unknown = set(raw) - set(DashboardConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"config dashboard has unknown fields: {sorted(unknown)}")

    def file(name: str) -> Path:
        value = raw.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"config dashboard.{name} must be a file path")
        return Path(value) if Path(value).is_absolute() else base / value

    return DashboardConfig(
        token_file=file("token_file"),
        reports_dir=file("reports_dir") if raw.get("reports_dir") is not None else None,
        admission_log=file("admission_log") if raw.get("admission_log") is not None else None,
    )
