"""Client calls for custodian ceremonies, on a ``SignetClient``'s channels and failover, and
the custodian's side of an approval: checking the proposal and signing it locally.

The custodian's private key never leaves this process: ``sign_approval`` reads it, signs the
DSSE pre-authentication encoding of the approval statement (and, for a root rotation, the
proposed root), and only the signatures go to the server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.ceremony import root_signed_bytes
from kms.domain.ceremony import (
    APPROVAL_PAYLOAD_TYPE,
    Action,
    ApprovalStatement,
    CustodianSet,
    ProposalBody,
    approval_envelope,
    pae,
)
from kms.errors import InvalidArgument
from kms.tuf.signing import load_custodian_signer
from signer._pb.signet.v1 import ceremony_pb2, ceremony_pb2_grpc
from signer.client import KeyInfo, SignetClient
from signer.custodian_keys import is_pkcs11_uri, pkcs11_sign


@dataclass(frozen=True)
class ProposalInfo:
    id: str
    body: ProposalBody
    body_json: str
    status: str
    summary: str
    approvals: tuple[tuple[str, str, float], ...]  # (custodian, key id, approved at)
    required: int
    counted: tuple[str, ...]
    outcome: Mapping[str, Any]
    revision: int
    record: Mapping[str, Any]

    @classmethod
    def from_pb(cls, message: ceremony_pb2.Proposal) -> ProposalInfo:
        """Raises ``InvalidArgument`` when the body does not hash to the id: a custodian
        never signs what they were not shown."""
        if hashlib.sha256(message.body_json.encode()).hexdigest() != message.id:
            raise InvalidArgument(f"the server's proposal body does not hash to its id "
                                  f"{message.id[:16]}; refusing to use it")
        body = ProposalBody.from_dict(json.loads(message.body_json))
        if body.canonical().decode() != message.body_json:
            raise InvalidArgument("the server's proposal body is not in canonical form")
        return cls(
            id=message.id, body=body, body_json=message.body_json, status=message.status,
            summary=message.summary,
            approvals=tuple((a.custodian, a.key_id, a.approved_at.ToNanoseconds() / 1e9)
                            for a in message.approvals),
            required=message.required, counted=tuple(message.counted),
            outcome=json.loads(message.outcome_json or "{}"), revision=message.revision,
            record=json.loads(message.record_json or "{}"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "summary": self.summary,
                "body": self.body.to_dict(), "body_json": self.body_json,
                "approvals": [{"custodian": c, "key_id": k, "approved_at": t}
                              for c, k, t in self.approvals],
                "required": self.required, "counted": list(self.counted),
                "outcome": dict(self.outcome), "revision": self.revision}


@dataclass(frozen=True)
class ApprovalInfo:
    proposal: ProposalInfo
    executed: bool
    key: KeyInfo | None
    fence_seconds: float
    signers_acknowledged: tuple[str, ...]
    signers_lapsed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"proposal": self.proposal.to_dict(), "executed": self.executed,
                "key": None if self.key is None else self.key.to_dict(),
                "fence_seconds": self.fence_seconds,
                "signers_acknowledged": list(self.signers_acknowledged),
                "signers_lapsed": list(self.signers_lapsed)}


def sign_approval(proposal: ProposalInfo, key_path: Path | str) -> dict[str, Any]:
    """A DSSE approval envelope for ``proposal`` signed with the custodian key in
    ``key_path`` (PEM; Ed25519 or ECDSA P-256) or, for a ``pkcs11:`` URI, in the custodian's
    own token (ECDSA P-256; ``signer.custodian_keys``). Raises ``InvalidArgument`` for an
    unreadable key, naming the file but never its content, and ``HsmError`` for a token that
    cannot be used."""
    if isinstance(key_path, str) and is_pkcs11_uri(key_path):
        return _sign_approval_pkcs11(proposal, key_path)
    signer = load_custodian_signer(Path(key_path))
    root_signature = None
    if proposal.body.action is Action.ROTATE_ROOT:
        root = proposal.body.parameters["root"]
        root_signature = signer.sign(root_signed_bytes(root)).signature
    statement = ApprovalStatement(proposal.id, proposal.body.sha256, root_signature)
    signature = signer.sign(pae(APPROVAL_PAYLOAD_TYPE, statement.payload()))
    return approval_envelope(statement, signer.public_key.keyid,
                             bytes.fromhex(signature.signature))


def _sign_approval_pkcs11(proposal: ProposalInfo, uri: str) -> dict[str, Any]:
    root_bytes = (root_signed_bytes(proposal.body.parameters["root"])
                  if proposal.body.action is Action.ROTATE_ROOT else None)
    # The root first (its signature goes into the signed statement), then the statement.
    if root_bytes is None:
        root_signature = None
    else:
        _, (root_der,) = pkcs11_sign(uri, [root_bytes])
        root_signature = root_der.hex()
    statement = ApprovalStatement(proposal.id, proposal.body.sha256, root_signature)
    key, (signature,) = pkcs11_sign(uri, [pae(APPROVAL_PAYLOAD_TYPE, statement.payload())])
    return approval_envelope(statement, key.keyid, signature)


class CeremonyClient:
    """Raises ``SignetError`` with the server's status and message, like ``SignetClient``."""

    def __init__(self, client: SignetClient) -> None:
        self._client = client

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CeremonyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _invoke(self, method: str, request: Any) -> Any:
        timeout = self._client._timeout
        # Approvals that execute may generate a key and wait for the revocation fence.
        timeout = max(timeout, 30.0) if method == "Approve" else timeout
        return self._client._call(
            lambda ch: getattr(ceremony_pb2_grpc.CeremonyStub(ch), method)(request,
                                                                           timeout=timeout))

    def propose(self, action: Action | str, parameters: Mapping[str, Any], *,
                lifetime_seconds: float = 0) -> ProposalInfo:
        name = action.value if isinstance(action, Action) else action
        request = ceremony_pb2.ProposeRequest(
            action=name, parameters_json=json.dumps(dict(parameters)),
            lifetime_seconds=lifetime_seconds)
        return ProposalInfo.from_pb(self._invoke("Propose", request))

    def get(self, proposal_id: str) -> ProposalInfo:
        return ProposalInfo.from_pb(self._invoke("Get", ceremony_pb2.GetProposalRequest(
            id=proposal_id)))

    def list(self, *, include_closed: bool = False) -> list[ProposalInfo]:
        response = self._invoke("List", ceremony_pb2.ListProposalsRequest(
            include_closed=include_closed))
        return [ProposalInfo.from_pb(p) for p in response.proposals]

    def approve_envelope(self, proposal_id: str, envelope: Mapping[str, Any]) -> ApprovalInfo:
        """Send an approval envelope made elsewhere (e.g. on an offline machine)."""
        response = self._invoke("Approve", ceremony_pb2.ApproveRequest(
            id=proposal_id, envelope_json=json.dumps(dict(envelope))))
        return ApprovalInfo(
            ProposalInfo.from_pb(response.proposal), response.executed,
            KeyInfo.from_pb(response.key) if response.HasField("key") else None,
            response.fence_seconds, tuple(response.signers_acknowledged),
            tuple(response.signers_lapsed))

    def approve(self, proposal_id: str, key_path: Path | str) -> ApprovalInfo:
        """Fetch the proposal, check it hashes to ``proposal_id``, sign it locally with the
        custodian key in ``key_path`` (a PEM file, or a ``pkcs11:`` URI) and send the
        approval."""
        proposal = self.get(proposal_id)
        return self.approve_envelope(proposal_id, sign_approval(proposal, key_path))

    def cancel(self, proposal_id: str) -> ProposalInfo:
        return ProposalInfo.from_pb(self._invoke("Cancel", ceremony_pb2.CancelProposalRequest(
            id=proposal_id)))

    def custodians(self) -> tuple[CustodianSet, int]:
        response = self._invoke("GetCustodians", ceremony_pb2.GetCustodiansRequest())
        return CustodianSet.from_dict(json.loads(response.custodian_set_json)), response.revision
