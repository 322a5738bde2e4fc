"""Client calls for supply-chain signing and runtime attestation, on a ``SignetClient``'s
channels and failover (``SignetClient._call``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from signer._pb.signet.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
)
from signer.client import SignetClient, first_send_only, request_id_for


@dataclass(frozen=True)
class SignedStatement:
    envelope_json: bytes
    key: str
    key_version: int
    key_id: str
    revision: int


@dataclass(frozen=True)
class SignedImage:
    payload: bytes
    signature: bytes
    key: str
    key_version: int
    key_id: str
    revision: int


@dataclass(frozen=True)
class AttestationAnswer:
    allowed: bool
    discrepancies: tuple[str, ...]


class SupplyChainClient:
    """Raises ``SignetError`` with the server's status and message, like ``SignetClient``."""

    def __init__(self, client: SignetClient) -> None:
        self._client = client

    def sign_statement(
        self, key: str, statement_json: bytes, *, version: int | None = None,
        request_id: str | None = None,
    ) -> SignedStatement:
        request_id, new = request_id_for(request_id)
        send = first_send_only(signing_pb2.SignStatementRequest(
            key=key, key_version=version or 0, statement_json=statement_json,
            request_id=request_id, new_request_id=new,
        ))
        timeout = self._client._timeout
        r = self._client._call(
            lambda ch: signing_pb2_grpc.SigningStub(ch).SignStatement(send(), timeout=timeout)
        )
        return SignedStatement(r.envelope_json, r.key, r.key_version, r.key_id, r.revision)

    def sign_image(
        self, key: str, image_reference: str, *, manifest_digest: str = "",
        annotations: Mapping[str, str] | None = None, version: int | None = None,
        request_id: str | None = None,
    ) -> SignedImage:
        request_id, new = request_id_for(request_id)
        send = first_send_only(signing_pb2.SignImageRequest(
            key=key, key_version=version or 0, image_reference=image_reference,
            manifest_digest=manifest_digest, annotations=dict(annotations or {}),
            request_id=request_id, new_request_id=new,
        ))
        timeout = self._client._timeout
        r = self._client._call(
            lambda ch: signing_pb2_grpc.SigningStub(ch).SignImage(send(), timeout=timeout)
        )
        return SignedImage(r.payload, r.signature, r.key, r.key_version, r.key_id, r.revision)

    def attest(
        self, image_digest: str, measurements: Mapping[str, str],
        environment: Mapping[str, str], provenance_envelope: bytes = b"",
    ) -> AttestationAnswer:
        request = attestation_pb2.AttestRequest(
            image_digest=image_digest, measurements=dict(measurements),
            environment=dict(environment), provenance_envelope=provenance_envelope,
        )
        timeout = self._client._timeout
        r = self._client._call(
            lambda ch: attestation_pb2_grpc.AttestationStub(ch).Attest(request, timeout=timeout)
        )
        return AttestationAnswer(r.allowed, tuple(r.discrepancies))
