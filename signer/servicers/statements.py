"""``Signing.SignStatement`` and ``Signing.SignImage``: parse the wire format, delegate to
``kms.statements``, encode the envelope or payload. The two RPCs belong to the ``Signing``
service, so this servicer extends ``SigningServicer`` and replaces it in the server."""

from __future__ import annotations

from typing import Any

import grpc

from kms.errors import InvalidArgument
from kms.signing import SigningService, StateView
from kms.statements import StatementSigning
from signer._pb.signet.v1 import signing_pb2
from signer.payloads.dsse import INTOTO_PAYLOAD_TYPE, Envelope, EnvelopeSignature, pae
from signer.payloads.intoto import Statement
from signer.payloads.simplesigning import ImageReference, SimpleSigningPayload
from signer.servicers.base import Deferred, rpc
from signer.servicers.signing import SigningServicer

Context = grpc.aio.ServicerContext[Any, Any]


class SupplyChainSigningServicer(SigningServicer):
    def __init__(
        self,
        signing: Deferred[SigningService],
        view: Deferred[StateView],
        statements: Deferred[StatementSigning],
        *,
        insecure: bool,
    ) -> None:
        super().__init__(signing, view, insecure=insecure)
        self._statements = statements

    @rpc
    async def SignStatement(
        self, request: signing_pb2.SignStatementRequest, context: Context
    ) -> signing_pb2.SignStatementResponse:
        caller = self.caller(context)
        statement = Statement.from_json(request.statement_json)
        # What is signed is the normalised statement, so the envelope holds exactly the
        # statement that passed policy (no duplicate keys or ignored whitespace tricks).
        payload = statement.to_json()
        signature = await self._statements.get().sign_statement(
            caller, request.key, request.key_version or None, statement.to_dict(),
            pae(INTOTO_PAYLOAD_TYPE, payload), request_id=request.request_id,
            new_request_id=request.new_request_id,
        )
        signed = EnvelopeSignature(signature.key_id, signature.signature)
        envelope = Envelope(payload, INTOTO_PAYLOAD_TYPE, (signed,))
        return signing_pb2.SignStatementResponse(
            envelope_json=envelope.to_json(),
            key=signature.key,
            key_version=signature.version,
            key_id=signature.key_id,
            revision=signature.revision,
        )

    @rpc
    async def SignImage(
        self, request: signing_pb2.SignImageRequest, context: Context
    ) -> signing_pb2.SignImageResponse:
        caller = self.caller(context)
        image = ImageReference.parse(request.image_reference)
        if request.manifest_digest:
            if image.digest and image.digest != request.manifest_digest:
                raise InvalidArgument(
                    f"image reference digest {image.digest} differs from manifest_digest "
                    f"{request.manifest_digest}"
                )
            image = ImageReference.parse(f"{image.name}@{request.manifest_digest}")
        payload = SimpleSigningPayload.for_image(image, dict(request.annotations)).to_json()
        signature = await self._statements.get().sign_image(
            caller, request.key, request.key_version or None, image.name, payload,
            request_id=request.request_id, new_request_id=request.new_request_id,
        )
        return signing_pb2.SignImageResponse(
            payload=payload,
            signature=signature.signature,
            key=signature.key,
            key_version=signature.version,
            key_id=signature.key_id,
            revision=signature.revision,
        )
