"""The ``KeyAdmin`` service: keys and the access policy."""

from __future__ import annotations

import json
from typing import Any

import grpc

from kms.admin import KeyAdministration
from kms.domain.policy import AccessPolicy
from kms.errors import InvalidArgument, NotFound
from signer import convert
from signer._pb.signet.v1 import keys_pb2, keys_pb2_grpc
from signer.servicers.base import Deferred, ServicerBase, rpc
from signer.telemetry import metrics

Context = grpc.aio.ServicerContext[Any, Any]


class KeyAdminServicer(ServicerBase, keys_pb2_grpc.KeyAdminServicer):
    def __init__(self, admin: Deferred[KeyAdministration], *, insecure: bool) -> None:
        super().__init__(insecure=insecure)
        self._admin = admin

    @rpc
    async def CreateKey(self, request: keys_pb2.CreateKeyRequest, context: Context) -> keys_pb2.Key:
        caller = self.caller(context)
        if request.rotation_period_seconds < 0:
            raise InvalidArgument("rotation_period_seconds must not be negative")
        created = await self._admin.get().create_key(
            caller,
            name=request.name,
            algorithm=convert.algorithm_from_pb(request.algorithm),
            replication=convert.replication_from_pb(request.replication),
            rotation_period_seconds=request.rotation_period_seconds or None,
        )
        return convert.key_to_pb(created)

    @rpc
    async def GetKey(self, request: keys_pb2.GetKeyRequest, context: Context) -> keys_pb2.Key:
        caller = self.caller(context)
        return convert.key_to_pb(await self._admin.get().get_key(caller, request.name))

    @rpc
    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: Context
    ) -> keys_pb2.ListKeysResponse:
        keys = await self._admin.get().list_keys(self.caller(context))
        return keys_pb2.ListKeysResponse(keys=[convert.key_to_pb(k) for k in keys])

    @rpc
    async def RotateKey(self, request: keys_pb2.RotateKeyRequest, context: Context) -> keys_pb2.Key:
        caller = self.caller(context)
        if request.retire_grace_seconds < 0:
            raise InvalidArgument("retire_grace_seconds must not be negative")
        rotated = await self._admin.get().rotate(
            caller, request.name, retire_grace_seconds=request.retire_grace_seconds
        )
        return convert.key_to_pb(rotated)

    @rpc
    async def DisableVersion(
        self, request: keys_pb2.VersionRequest, context: Context
    ) -> keys_pb2.Key:
        caller = self.caller(context)
        return convert.key_to_pb(
            await self._admin.get().disable(caller, request.name, _version(request.version))
        )

    @rpc
    async def EnableVersion(
        self, request: keys_pb2.VersionRequest, context: Context
    ) -> keys_pb2.Key:
        caller = self.caller(context)
        return convert.key_to_pb(
            await self._admin.get().enable(caller, request.name, _version(request.version))
        )

    @rpc
    async def RevokeVersion(
        self, request: keys_pb2.VersionRequest, context: Context
    ) -> keys_pb2.RevokeVersionResponse:
        caller = self.caller(context)
        result = await self._admin.get().revoke(caller, request.name, _version(request.version))
        metrics().fence_seconds.observe(result.fence.seconds)
        return convert.revoke_to_pb(result)

    @rpc
    async def ScheduleDestroy(
        self, request: keys_pb2.ScheduleDestroyRequest, context: Context
    ) -> keys_pb2.Key:
        caller = self.caller(context)
        if request.waiting_seconds < 0:
            raise InvalidArgument("waiting_seconds must not be negative")
        scheduled = await self._admin.get().schedule_destroy(
            caller, request.name, _version(request.version),
            waiting_seconds=request.waiting_seconds or None,
        )
        return convert.key_to_pb(scheduled)

    @rpc
    async def CancelDestroy(
        self, request: keys_pb2.VersionRequest, context: Context
    ) -> keys_pb2.Key:
        caller = self.caller(context)
        return convert.key_to_pb(
            await self._admin.get().cancel_destroy(caller, request.name, _version(request.version))
        )

    @rpc
    async def SetMinSignVersion(
        self, request: keys_pb2.VersionRequest, context: Context
    ) -> keys_pb2.Key:
        caller = self.caller(context)
        return convert.key_to_pb(await self._admin.get().set_min_sign_version(
            caller, request.name, _version(request.version)))

    @rpc
    async def SetPolicy(
        self, request: keys_pb2.SetPolicyRequest, context: Context
    ) -> keys_pb2.SetPolicyResponse:
        caller = self.caller(context)
        try:
            document = json.loads(request.policy_json)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"the policy is not valid JSON: {error}") from None
        policy = AccessPolicy.from_dict(document)
        stored = await self._admin.get().set_policy(caller, policy, request.expected_revision)
        return keys_pb2.SetPolicyResponse(revision=stored.mod_revision)

    @rpc
    async def GetPolicy(
        self, request: keys_pb2.GetPolicyRequest, context: Context
    ) -> keys_pb2.GetPolicyResponse:
        stored = await self._admin.get().get_policy(self.caller(context))
        if stored is None:
            raise NotFound("no access policy has been applied yet")
        return keys_pb2.GetPolicyResponse(
            policy_json=json.dumps(stored.policy.to_dict(), sort_keys=True),
            revision=stored.mod_revision,
        )


def _version(number: int) -> int:
    if number < 1:
        raise InvalidArgument("a version number (1 or more) is required")
    return number
