"""``cluster.json``: how clients find a Signet cluster and which credentials they use.

Written by ``signet dev up``; an operator can write one by hand for a real cluster::

    {
      "version": 1,
      "home_region": "local",
      "regions": {"local": {"grpc_endpoints": ["127.0.0.1:7443"]}},
      "etcd_endpoints": ["127.0.0.1:2379"],
      "ca": "ca/ca.pem",
      "identities": {
        "admin": {"uri": "spiffe://signet.dev/admin",
                  "cert": "ca/admin.pem", "key": "ca/admin-key.pem"},
        "pipeline": {"uri": "spiffe://signet.dev/pipeline", "cert": "...", "key": "..."}
      },
      "insecure": false
    }

Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLUSTER_FILE_VERSION = 1


class ClusterFileError(ValueError):
    """``cluster.json`` is missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class Identity:
    uri: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class Region:
    name: str
    grpc_endpoints: tuple[str, ...]


@dataclass(frozen=True)
class ClusterFile:
    path: Path
    home_region: str
    regions: dict[str, Region]
    etcd_endpoints: tuple[str, ...]
    ca: Path | None
    identities: dict[str, Identity]
    insecure: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def endpoints(self, region: str | None = None) -> list[str]:
        """Every gRPC endpoint, the home (or given) region's first."""
        first = region or self.home_region
        if first not in self.regions:
            raise ClusterFileError(
                f"region {first!r} is not in {self.path}; known: {', '.join(self.regions)}"
            )
        ordered = [*self.regions[first].grpc_endpoints]
        for name, entry in self.regions.items():
            if name != first:
                ordered.extend(entry.grpc_endpoints)
        return ordered

    def identity(self, name: str) -> Identity:
        try:
            return self.identities[name]
        except KeyError:
            raise ClusterFileError(
                f"identity {name!r} is not in {self.path}; known: {', '.join(self.identities)}"
            ) from None

    @classmethod
    def load(cls, path: Path) -> ClusterFile:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterFileError(
                f"cluster file {path} does not exist; start a dev cluster with "
                "'signet dev up --state-dir DIR' or pass --cluster FILE"
            ) from None
        except (OSError, json.JSONDecodeError) as error:
            raise ClusterFileError(f"cannot read cluster file {path}: {error}") from None
        return cls.from_dict(data, path=path)

    @classmethod
    def from_dict(cls, data: Any, *, path: Path) -> ClusterFile:
        base = path.parent

        def resolve(value: Any) -> Path:
            if not isinstance(value, str):
                raise ClusterFileError(f"{path}: expected a file path, got {value!r}")
            p = Path(value)
            return p if p.is_absolute() else base / p

        if not isinstance(data, Mapping) or data.get("version") != CLUSTER_FILE_VERSION:
            raise ClusterFileError(f"{path} is not a version {CLUSTER_FILE_VERSION} cluster file")
        try:
            regions = {
                name: Region(name, tuple(entry["grpc_endpoints"]))
                for name, entry in data["regions"].items()
            }
            identities = {
                name: Identity(str(entry["uri"]), resolve(entry["cert"]), resolve(entry["key"]))
                for name, entry in data.get("identities", {}).items()
            }
            known = {"version", "home_region", "regions", "etcd_endpoints", "ca", "identities",
                     "insecure"}
            return cls(
                path=path,
                home_region=str(data.get("home_region") or next(iter(regions))),
                regions=regions,
                etcd_endpoints=tuple(data.get("etcd_endpoints", ())),
                ca=None if data.get("ca") is None else resolve(data["ca"]),
                identities=identities,
                insecure=bool(data.get("insecure", False)),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, AttributeError, StopIteration) as error:
            raise ClusterFileError(f"{path} is malformed: {error!r}") from None

    def to_dict(self) -> dict[str, Any]:
        def rel(p: Path) -> str:
            try:
                return str(p.relative_to(self.path.parent))
            except ValueError:
                return str(p)

        return {
            "version": CLUSTER_FILE_VERSION,
            "home_region": self.home_region,
            "regions": {
                name: {"grpc_endpoints": list(r.grpc_endpoints)} for name, r in self.regions.items()
            },
            "etcd_endpoints": list(self.etcd_endpoints),
            "ca": None if self.ca is None else rel(self.ca),
            "identities": {
                name: {"uri": i.uri, "cert": rel(i.cert), "key": rel(i.key)}
                for name, i in self.identities.items()
            },
            "insecure": self.insecure,
            **self.extra,
        }

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(self.path)
