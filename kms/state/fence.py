"""Waiting for every signer to acknowledge a key-state revision (DESIGN.md, "Fencing" step 3).

A signer acknowledges revision R by registering, under its lease, that it has applied R. A
signer whose lease lapses loses its registration, and with it the right to sign (its own
lease proof runs out first). So once every registration shows R or more, no signer can still
sign with state older than R.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kms.errors import Unavailable
from kms.ports import Clock, FenceRegistry


@dataclass(frozen=True)
class FenceReport:
    revision: int
    seconds: float
    acknowledged: tuple[str, ...]  # signers that applied the revision
    lapsed: tuple[str, ...]  # signers that were registered and lost their lease instead


class SignerFence:
    def __init__(self, registry: FenceRegistry, clock: Clock, *, timeout: float) -> None:
        self._registry = registry
        self._clock = clock
        self._timeout = timeout

    async def wait(self, revision: int) -> FenceReport:
        """Return once every registered signer has applied ``revision`` or lost its lease.

        Raises ``Unavailable`` naming the signers still behind after the timeout (the change
        is committed either way; waiting again is safe), or when etcd cannot be read.
        """
        started = self._clock.monotonic()
        seen: set[str] = set()
        pause = 0.001
        while True:
            registrations = await self._registry.signer_registrations()
            seen.update(registrations.applied)
            behind = sorted(s for s, applied in registrations.applied.items()
                            if applied < revision)
            if not behind:
                acknowledged = tuple(sorted(registrations.applied))
                lapsed = tuple(sorted(seen - set(registrations.applied)))
                return FenceReport(revision, self._clock.monotonic() - started,
                                   acknowledged, lapsed)
            if self._clock.monotonic() - started > self._timeout:
                raise Unavailable(
                    f"the change is committed at revision {revision}, but signers "
                    f"{', '.join(behind)} have not acknowledged it within {self._timeout:g} s; "
                    "they cannot sign once their leases lapse — retry to wait again"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)
