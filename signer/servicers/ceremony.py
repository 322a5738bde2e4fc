"""The ``Ceremony`` service: custodian ceremonies (docs/adr/0009-custodian-ceremonies.md)."""

from __future__ import annotations

import json
from typing import Any

import grpc

from kms.ceremony import ApprovalResult, Ceremonies, StoredProposal
from kms.domain.ceremony import Action, canonical_json
from kms.errors import InvalidArgument
from signer import convert
from signer._pb.signet.v1 import ceremony_pb2, ceremony_pb2_grpc
from signer.servicers.base import Deferred, ServicerBase, rpc

Context = grpc.aio.ServicerContext[Any, Any]
MAX_JSON_BYTES = 1024 * 1024


def _json_object(text: str, what: str) -> Any:
    if len(text) > MAX_JSON_BYTES:
        raise InvalidArgument(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def proposal_to_pb(stored: StoredProposal, now: float) -> ceremony_pb2.Proposal:
    proposal = stored.proposal
    message = ceremony_pb2.Proposal(
        id=proposal.id,
        body_json=proposal.body.canonical().decode(),
        status=proposal.status_at(now).value,
        summary=proposal.body.describe(),
        required=stored.required,
        counted=list(stored.counted),
        outcome_json=json.dumps(dict(proposal.outcome), sort_keys=True),
        revision=stored.revision,
        record_json=canonical_json(proposal.to_dict()).decode(),
    )
    for approval in proposal.approvals:
        item = message.approvals.add(custodian=approval.custodian, key_id=approval.key_id)
        item.approved_at.FromNanoseconds(int(approval.approved_at * 1e9))
    return message


class CeremonyServicer(ServicerBase, ceremony_pb2_grpc.CeremonyServicer):
    def __init__(self, ceremonies: Deferred[Ceremonies], clock: Any, *, insecure: bool) -> None:
        super().__init__(insecure=insecure)
        self._ceremonies = ceremonies
        self._clock = clock

    @rpc
    async def Propose(self, request: ceremony_pb2.ProposeRequest, context: Context
                      ) -> ceremony_pb2.Proposal:
        caller = self.caller(context)
        if request.lifetime_seconds < 0:
            raise InvalidArgument("lifetime_seconds must not be negative")
        stored = await self._ceremonies.get().propose(
            caller, Action.parse(request.action),
            _json_object(request.parameters_json, "parameters_json"),
            lifetime_seconds=request.lifetime_seconds or None)
        return proposal_to_pb(stored, self._clock.now())

    @rpc
    async def Get(self, request: ceremony_pb2.GetProposalRequest, context: Context
                  ) -> ceremony_pb2.Proposal:
        stored = await self._ceremonies.get().get(self.caller(context), _id(request.id))
        return proposal_to_pb(stored, self._clock.now())

    @rpc
    async def List(self, request: ceremony_pb2.ListProposalsRequest, context: Context
                   ) -> ceremony_pb2.ListProposalsResponse:
        found = await self._ceremonies.get().list(self.caller(context),
                                                 include_closed=request.include_closed)
        now = self._clock.now()
        return ceremony_pb2.ListProposalsResponse(
            proposals=[proposal_to_pb(s, now) for s in found])

    @rpc
    async def Approve(self, request: ceremony_pb2.ApproveRequest, context: Context
                      ) -> ceremony_pb2.ApproveResponse:
        caller = self.caller(context)
        envelope = _json_object(request.envelope_json, "envelope_json")
        result = await self._ceremonies.get().approve(caller, _id(request.id), envelope)
        return _approve_to_pb(result, self._clock.now())

    @rpc
    async def Cancel(self, request: ceremony_pb2.CancelProposalRequest, context: Context
                     ) -> ceremony_pb2.Proposal:
        stored = await self._ceremonies.get().cancel(self.caller(context), _id(request.id))
        return proposal_to_pb(stored, self._clock.now())

    @rpc
    async def GetCustodians(self, request: ceremony_pb2.GetCustodiansRequest, context: Context
                            ) -> ceremony_pb2.CustodianSet:
        custodians, revision = await self._ceremonies.get().get_custodians(self.caller(context))
        return ceremony_pb2.CustodianSet(
            custodian_set_json=json.dumps(custodians.to_dict(), sort_keys=True),
            revision=revision)


def _approve_to_pb(result: ApprovalResult, now: float) -> ceremony_pb2.ApproveResponse:
    response = ceremony_pb2.ApproveResponse(proposal=proposal_to_pb(result.stored, now),
                                            executed=result.executed)
    if result.key is not None:
        response.key.CopyFrom(convert.key_to_pb(result.key))
    if result.fence is not None:
        response.fence_seconds = result.fence.seconds
        response.signers_acknowledged.extend(result.fence.acknowledged)
        response.signers_lapsed.extend(result.fence.lapsed)
    return response


def _id(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidArgument("a proposal id is 64 lowercase hex digits (see "
                              "'signet ceremony list')")
    return value
