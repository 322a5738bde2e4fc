"""Key administration for the benchmark: direct calls where the cluster allows them, otherwise
an M-of-N ceremony approved with the development custodian keys in ``<state>/custodians``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from signer.client import SignetClient
from signer.errors import SignetError


class BenchAdmin:
    def __init__(self, client: SignetClient, state_dir: Path, approvals: int = 2) -> None:
        self._client = client
        self._keys = [state_dir / "custodians" / f"custodian-{n}.pem"
                      for n in range(1, approvals + 1)]

    def _ceremony(self, action: str, parameters: dict[str, Any]) -> tuple[float, tuple[str, ...]]:
        """Propose and approve; returns the fence seconds and the signers that acknowledged
        it, as the executing approval reported them."""
        from signer.ceremony_client import CeremonyClient

        ceremony = CeremonyClient(self._client)
        proposal = ceremony.propose(action, parameters)
        for key in self._keys:
            approval = ceremony.approve(proposal.id, key)
            if approval.executed:
                return approval.fence_seconds, approval.signers_acknowledged
        raise RuntimeError(f"ceremony {action} {parameters} did not execute")

    @staticmethod
    def _needs_ceremony(error: SignetError) -> bool:
        return error.code is grpc.StatusCode.PERMISSION_DENIED and "ceremony" in error.message

    def create_key(self, name: str, algorithm: str) -> None:
        from kms.domain.keys import Algorithm

        try:
            self._client.create_key(name, Algorithm.parse(algorithm))
        except SignetError as error:
            if not self._needs_ceremony(error):
                raise
            self._ceremony("create-key", {"name": name, "algorithm": algorithm})

    def rotate(self, name: str) -> None:
        try:
            self._client.rotate_key(name)
        except SignetError as error:
            if not self._needs_ceremony(error):
                raise
            self._ceremony("rotate", {"name": name})

    def revoke(self, name: str, version: int) -> tuple[float, tuple[str, ...]]:
        """Revoke; returns the fence time the server measured (seconds) and the signers that
        acknowledged it."""
        try:
            result = self._client.revoke_version(name, version)
        except SignetError as error:
            if not self._needs_ceremony(error):
                raise
            return self._ceremony("revoke", {"name": name, "version": version})
        return result.fence_seconds, result.signers_acknowledged
