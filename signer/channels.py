"""gRPC channels to Signet endpoints, with mTLS unless explicitly insecure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

# Reconnect within a second once a region is back: grpc's default backoff grows to 120 s,
# which would keep failed-over clients away from a recovered home region for minutes.
_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)


def open_channels(
    endpoints: Sequence[str], *, ca: Path | None = None, cert: Path | None = None,
    key: Path | None = None, insecure: bool = False, own_connections: bool = False,
) -> list[grpc.Channel]:
    """One channel per endpoint. With ``insecure`` the channels are plaintext (development
    clusters that run ``insecure: true``); otherwise TLS against ``ca`` with the client
    certificate ``cert``/``key``. With ``own_connections`` each channel gets its own TCP
    connection instead of sharing one with other channels to the same endpoint (grpc shares
    them by default), so that a signer's worker processes, which share the port through
    SO_REUSEPORT, each get some of them (docs/adr/0008)."""
    options = (*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)) if own_connections \
        else _OPTIONS
    if insecure:
        return [grpc.insecure_channel(e, options=options) for e in endpoints]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return [grpc.secure_channel(e, credentials, options=options) for e in endpoints]
