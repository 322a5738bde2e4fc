"""``GetTrustBundle``: the published repository plus a freshness statement for one nonce."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kms.errors import FailedPrecondition, InvalidArgument
from kms.ports import Clock
from kms.tuf.freshness import MAX_NONCE_BYTES, MIN_NONCE_BYTES, FreshnessStatement
from kms.tuf.repository import Publication
from kms.tuf.signing import HsmMetadataSigner
from kms.tuf.store import RepositoryView, TufRepositoryStore


@dataclass(frozen=True)
class TrustBundleResponse:
    repository: RepositoryView
    statement: bytes
    signature: bytes  # DER ECDSA over SHA-256(statement)
    key_id: str


class TrustBundleService:
    """Answers GetTrustBundle for this signer's region."""

    def __init__(self, *, repo: TufRepositoryStore, signer: HsmMetadataSigner, region: str,
                 clock: Clock) -> None:
        self._repo = repo
        self._signer = signer
        self._region = region
        self._clock = clock

    async def publication(self) -> Publication | None:
        """The current publication pointer (for metrics); None before the first one."""
        publication, _ = await self._repo.publication()
        return publication

    async def get(self, nonce: bytes, region: str,
                  known_root_version: int = 0) -> TrustBundleResponse:
        """The current repository and a statement binding ``nonce`` to it, signed by this
        region's online key.

        Raises ``InvalidArgument`` for a nonce outside 16..256 bytes, ``FailedPrecondition``
        for another region (naming the region to ask), ``Unavailable`` when nothing is
        published yet or the HSM or store cannot be reached.
        """
        if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            raise InvalidArgument(
                f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} random bytes, got "
                f"{len(nonce)}; send a fresh random nonce with every request"
            )
        if region and region != self._region:
            raise FailedPrecondition(
                f"this signer is in region {self._region!r} and can only vouch for it; ask a "
                f"signer of region {region!r} for its freshness statement"
            )
        if known_root_version < 0:
            raise InvalidArgument("known_root_version cannot be negative")
        view = await self._repo.current(known_root_version)
        statement = FreshnessStatement.create(
            nonce=nonce, region=self._region,
            timestamp_version=view.publication.timestamp_version,
            bundle_sha256=hashlib.sha256(view.bundle).hexdigest(),
            etcd_revision=view.revision, now=self._clock.now(),
            key_id=self._signer.public_key.keyid,
        ).to_bytes()
        signature = await self._signer.sign(statement)
        return TrustBundleResponse(view, statement, bytes.fromhex(signature.signature),
                                   signature.keyid)
