"""Freshness statements: a region's signed answer to one client nonce (DESIGN.md I5).

The statement is canonical JSON (sorted keys, no spaces)::

    {"bundle_sha256": hex, "etcd_revision": int, "format": "signet-trust-freshness/v1",
     "key_id": hex, "nonce": base64, "region": str, "time": RFC 3339 UTC,
     "timestamp_version": int}

and the signature is DER ECDSA P-256 over SHA-256 of exactly those bytes, by the region's
online key (whose public key the trust bundle lists under ``online_keys``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kms.tuf.repository import canonical_json, format_time

FRESHNESS_FORMAT = "signet-trust-freshness/v1"
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 256
_FIELDS = frozenset({"bundle_sha256", "etcd_revision", "format", "key_id", "nonce", "region",
                     "time", "timestamp_version"})


@dataclass(frozen=True)
class FreshnessStatement:
    nonce: bytes
    region: str
    timestamp_version: int
    bundle_sha256: str
    etcd_revision: int
    time: str
    key_id: str

    def to_bytes(self) -> bytes:
        return canonical_json({
            "format": FRESHNESS_FORMAT,
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
            "region": self.region,
            "timestamp_version": self.timestamp_version,
            "bundle_sha256": self.bundle_sha256,
            "etcd_revision": self.etcd_revision,
            "time": self.time,
            "key_id": self.key_id,
        })

    @classmethod
    def create(cls, *, nonce: bytes, region: str, timestamp_version: int, bundle_sha256: str,
               etcd_revision: int, now: float, key_id: str) -> FreshnessStatement:
        return cls(nonce, region, timestamp_version, bundle_sha256, etcd_revision,
                   format_time(now), key_id)

    @classmethod
    def from_bytes(cls, data: bytes) -> FreshnessStatement:
        """Parse a statement; it must be canonical and complete. Raises ``ValueError``."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"freshness statement is not JSON: {error}") from None
        if not isinstance(document, Mapping) or set(document) != _FIELDS:
            raise ValueError("freshness statement has missing or unknown fields")
        if document["format"] != FRESHNESS_FORMAT:
            raise ValueError(f"freshness statement format is {document['format']!r}")
        statement = cls(
            nonce=base64.b64decode(_str(document, "nonce"), validate=True),
            region=_str(document, "region"),
            timestamp_version=_int(document, "timestamp_version"),
            bundle_sha256=_str(document, "bundle_sha256"),
            etcd_revision=_int(document, "etcd_revision"),
            time=_str(document, "time"),
            key_id=_str(document, "key_id"),
        )
        if statement.to_bytes() != data:
            raise ValueError("freshness statement is not in canonical form")
        return statement


def _str(document: Mapping[str, Any], name: str) -> str:
    value = document[name]
    if not isinstance(value, str):
        raise TypeError(f"freshness statement field {name} must be a string")
    return value


def _int(document: Mapping[str, Any], name: str) -> int:
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"freshness statement field {name} must be a non-negative integer")
    return value
