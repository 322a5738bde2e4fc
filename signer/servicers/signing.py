"""The ``Signing`` service: what build pipelines call."""

from __future__ import annotations

from typing import Any

import grpc

from kms.signing import SigningService, StateView
from signer import convert
from signer._pb.signet.v1 import signing_pb2, signing_pb2_grpc
from signer.servicers.base import Deferred, ServicerBase, rpc

Context = grpc.aio.ServicerContext[Any, Any]


class SigningServicer(ServicerBase, signing_pb2_grpc.SigningServicer):
    def __init__(
        self, signing: Deferred[SigningService], view: Deferred[StateView], *, insecure: bool
    ) -> None:
        super().__init__(insecure=insecure)
        self._signing = signing
        self._view = view

    @rpc
    async def SignDigest(
        self, request: signing_pb2.SignDigestRequest, context: Context
    ) -> signing_pb2.SignDigestResponse:
        caller = self.caller(context)
        digest = convert.digest_from_pb(request.digest)
        signature = await self._signing.get().sign_digest(
            caller, request.key, request.key_version or None, digest,
            request_id=request.request_id, new_request_id=request.new_request_id,
        )
        return convert.signature_to_pb(signature)

    @rpc
    async def SignBatch(
        self, request: signing_pb2.SignBatchRequest, context: Context
    ) -> signing_pb2.SignBatchResponse:
        caller = self.caller(context)
        outcomes = await self._signing.get().sign_batch(
            caller, request.key, request.key_version or None,
            convert.digests_from_pb(request.digests), request_id=request.request_id,
            new_request_id=request.new_request_id,
        )
        return convert.batch_to_pb(outcomes)

    @rpc
    async def GetPublicKey(
        self, request: signing_pb2.GetPublicKeyRequest, context: Context
    ) -> signing_pb2.GetPublicKeyResponse:
        self.caller(context)  # any authenticated caller may read public keys
        key = self._view.get().key(request.key).key
        version = key.version(request.version) if request.version else key.primary
        return convert.public_key_to_pb(key.name, version, key.algorithm)
