"""A minimal signer config, for unit tests of one of its sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from signer.config import ServerConfig

MINIMAL: dict[str, Any] = {
    "region": "r1", "listen": "127.0.0.1:7443", "insecure": True,
    "etcd": {"endpoints": ["127.0.0.1:2379"]},
    "hsm": {"token_label": "t", "pin_env": "PIN"},
    "trust": {"http_listen": "127.0.0.1:8443"},
}


def server_config(**sections: Any) -> ServerConfig:
    """``MINIMAL`` with ``sections`` replacing its top-level sections, loaded as the signer
    loads ``/etc/signet/signer.yaml``."""
    return ServerConfig.from_dict({**MINIMAL, **sections}, base=Path("/etc/signet"))
