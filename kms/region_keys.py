"""Per-region service keys held in the HSM: one key pair per (role, region), e.g. the key that
signs audit checkpoints. The first signer of a region to start generates it; the record in
etcd (public key + HSM object id) lets every signer of the region sharing that token use it.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from kms.domain.keys import Algorithm
from kms.ports import Hsm

log = logging.getLogger(__name__)


class RecordStore(Protocol):
    async def get_record(self, path: str) -> dict[str, Any] | None: ...

    async def get_or_create_record(self, path: str, value: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RegionKey:
    role: str
    region: str
    algorithm: Algorithm
    hsm_id: bytes
    public_key_der: bytes


async def ensure_region_key(
    store: RecordStore, path: str, hsm: Hsm, *, role: str, region: str,
    algorithm: Algorithm = Algorithm.ECDSA_P256_SHA256,
) -> RegionKey:
    """The region's key for ``role``, generated in ``hsm`` if the region has none yet.

    Two signers starting at once may both generate; the compare-and-swap keeps one and the
    loser removes its own key pair again. Raises ``HsmError`` or ``StateStoreError``.
    """
    stored = await store.get_record(path)
    if stored is not None:
        return _region_key(stored)
    pair = await hsm.generate_key_pair(
        label=f"signet-{role}/{region}", algorithm=algorithm, extractable=False
    )
    proposed = {
        "role": role, "region": region, "algorithm": algorithm.value,
        "hsm_id": pair.hsm_id.hex(),
        "public_key_der": base64.b64encode(pair.public_key_der).decode(),
    }
    stored = await store.get_or_create_record(path, proposed)
    if stored["hsm_id"] != proposed["hsm_id"]:
        await hsm.destroy_key_pair(pair.hsm_id)
    else:
        log.info("generated the %s key of region %s in the HSM", role, region)
    return _region_key(stored)


def _region_key(stored: dict[str, Any]) -> RegionKey:
    return RegionKey(str(stored["role"]), str(stored["region"]), Algorithm(stored["algorithm"]),
                     bytes.fromhex(stored["hsm_id"]), base64.b64decode(stored["public_key_der"]))
