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
    lease_ttl_seconds: 5

Relative paths are resolved against the file's folder. ``insecure: true`` turns mTLS off for
development; the signer then warns on every start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kms.errors import InvalidArgument


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


@dataclass(frozen=True)
class ServerConfig:
    region: str
    listen: str
    etcd: EtcdSettings
    hsm: HsmSettings
    tls: TlsFiles | None
    insecure: bool = False
    lease_ttl_seconds: int = 5

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
        etcd_tls = None if etcd.get("tls") is None else tls_files(etcd["tls"], "etcd.tls", "ca")

        hsm = section("hsm")
        label = hsm.get("token_label")
        if not isinstance(label, str) or not label:
            raise InvalidArgument("config hsm.token_label must name the PKCS#11 token")
        pin_file = hsm.get("pin_file")
        pin_env = hsm.get("pin_env")
        if pin_file is None and pin_env is None:
            raise InvalidArgument("config hsm needs pin_file or pin_env (never the PIN itself)")
        if "pin" in hsm:
            raise InvalidArgument(
                "config hsm.pin is not accepted: keep the PIN out of config files; "
                "use pin_file or pin_env"
            )
        module = hsm.get("module")
        ttl = data.get("lease_ttl_seconds", 5)
        if not isinstance(ttl, int) or not 1 <= ttl <= 60:
            raise InvalidArgument("config lease_ttl_seconds must be a whole number from 1 to 60")
        return cls(
            region=region,
            listen=listen,
            etcd=EtcdSettings(
                endpoints=tuple(endpoints),
                tls=etcd_tls,
                prefix=str(etcd.get("prefix", "/signet/v1")),
            ),
            hsm=HsmSettings(
                token_label=label,
                module=None if module is None else str(module),
                pin_file=None if pin_file is None else path(pin_file, "hsm.pin_file"),
                pin_env=None if pin_env is None else str(pin_env),
            ),
            tls=tls,
            insecure=insecure,
            lease_ttl_seconds=ttl,
        )
