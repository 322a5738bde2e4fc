"""Conversions between domain objects and protobuf messages. The only place that does them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from kms.admin import RevokeResult
from kms.domain.keys import (
    Algorithm,
    Digest,
    DigestAlgorithm,
    KeyVersion,
    Replication,
    VersionState,
)
from kms.errors import InvalidArgument, KmsError
from kms.ports import VersionedKey
from kms.signing import Signature
from signer._pb.signet.v1 import common_pb2, keys_pb2, signing_pb2
from signer.errors import status_for

_ALGORITHMS = {
    Algorithm.ECDSA_P256_SHA256: common_pb2.ECDSA_P256_SHA256,
    Algorithm.ED25519: common_pb2.ED25519,
    Algorithm.RSA_PSS_3072_SHA256: common_pb2.RSA_PSS_3072_SHA256,
}
_ALGORITHMS_BACK = {v: k for k, v in _ALGORITHMS.items()}
_DIGESTS = {
    common_pb2.SHA256: DigestAlgorithm.SHA256,
    common_pb2.SHA384: DigestAlgorithm.SHA384,
    common_pb2.SHA512: DigestAlgorithm.SHA512,
}
_REPLICATION = {
    common_pb2.REPLICATION_UNSPECIFIED: Replication.REGIONAL,
    common_pb2.REGIONAL: Replication.REGIONAL,
    common_pb2.MULTI_REGION: Replication.MULTI_REGION,
}
_REPLICATION_BACK = {Replication.REGIONAL: common_pb2.REGIONAL,
                     Replication.MULTI_REGION: common_pb2.MULTI_REGION}
_STATES = {state: common_pb2.VersionState.Value(state.value) for state in VersionState}


def algorithm_to_pb(algorithm: Algorithm) -> common_pb2.KeyAlgorithm.ValueType:
    return _ALGORITHMS[algorithm]


def algorithm_from_pb(value: int) -> Algorithm:
    try:
        return _ALGORITHMS_BACK[value]  # type: ignore[index]
    except KeyError:
        choices = ", ".join(a.value for a in Algorithm)
        raise InvalidArgument(
            f"key algorithm is missing or unknown ({value}); use {choices}"
        ) from None


def replication_from_pb(value: int) -> Replication:
    try:
        return _REPLICATION[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"unknown replication {value}") from None


def digest_from_pb(message: common_pb2.Digest) -> Digest:
    """Raises ``InvalidArgument`` for an unknown algorithm or a wrong length."""
    try:
        algorithm = _DIGESTS[message.algorithm]
    except KeyError:
        raise InvalidArgument(
            "digest algorithm is missing or unknown; use SHA256, SHA384 or SHA512"
        ) from None
    return Digest(algorithm, message.value)


def digests_from_pb(messages: Iterable[common_pb2.Digest]) -> list[Digest | KmsError]:
    """One ``Digest`` per message, or the ``InvalidArgument`` that message alone gets."""
    digests: list[Digest | KmsError] = []
    append = digests.append
    for message in messages:
        try:
            append(digest_from_pb(message))
        except KmsError as error:
            append(error)
    return digests


def digest_to_pb(digest: Digest) -> common_pb2.Digest:
    back = {v: k for k, v in _DIGESTS.items()}
    return common_pb2.Digest(algorithm=back[digest.algorithm], value=digest.value)


def public_key_pem(der: bytes) -> str:
    key = serialization.load_der_public_key(der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def signature_to_pb(signature: Signature) -> signing_pb2.SignDigestResponse:
    return signing_pb2.SignDigestResponse(
        signature=signature.signature,
        key=signature.key,
        key_version=signature.version,
        key_id=signature.key_id,
        algorithm=_ALGORITHMS[signature.algorithm],
        revision=signature.revision,
        region=signature.region,
    )


def batch_to_pb(outcomes: Sequence[Signature | KmsError]) -> signing_pb2.SignBatchResponse:
    """A ``SignBatchResponse`` with one result per outcome, in order. Fills the repeated
    field in place (``add()`` and scalar assignments): about a third of the CPU per item of
    building a ``SignDigestResponse`` and a ``SignBatchResult`` by keyword, then copying both
    in (measured: ≈1 µs against ≈3 µs per item)."""
    response = signing_pb2.SignBatchResponse()
    add = response.results.add
    for outcome in outcomes:
        result = add()
        if isinstance(outcome, KmsError):
            result.error.CopyFrom(item_error_to_pb(outcome))
            continue
        message = result.signature
        message.signature = outcome.signature
        message.key = outcome.key
        message.key_version = outcome.version
        message.key_id = outcome.key_id
        message.algorithm = _ALGORITHMS[outcome.algorithm]
        message.revision = outcome.revision
        message.region = outcome.region
    return response


def item_error_to_pb(error: KmsError) -> signing_pb2.ItemError:
    return signing_pb2.ItemError(code=status_for(error).value[0], message=error.diagnostics())


def version_to_pb(version: KeyVersion) -> keys_pb2.KeyVersion:
    message = keys_pb2.KeyVersion(
        number=version.number,
        state=_STATES[version.state],
        key_id=version.key_id,
        public_key_pem=public_key_pem(version.public_key_der),
        created_at=_timestamp(version.created_at),
        state_changed_at=_timestamp(version.state_changed_at),
        revoked=version.revoked,
    )
    if version.retire_at is not None:
        message.retire_at.CopyFrom(_timestamp(version.retire_at))
    if version.destroy_after is not None:
        message.destroy_after.CopyFrom(_timestamp(version.destroy_after))
    return message


def revoke_to_pb(result: RevokeResult) -> keys_pb2.RevokeVersionResponse:
    return keys_pb2.RevokeVersionResponse(
        key=key_to_pb(result.key),
        fence_seconds=result.fence.seconds,
        signers_acknowledged=list(result.fence.acknowledged),
        signers_lapsed=list(result.fence.lapsed),
        revision=result.fence.revision,
    )


def key_to_pb(versioned: VersionedKey) -> keys_pb2.Key:
    key = versioned.key
    return keys_pb2.Key(
        name=key.name,
        algorithm=_ALGORITHMS[key.algorithm],
        replication=_REPLICATION_BACK[key.replication],
        primary_version=key.primary_version,
        min_sign_version=key.min_sign_version,
        versions=[version_to_pb(v) for v in key.versions],
        created_at=_timestamp(key.created_at),
        rotation_period_seconds=key.rotation_period_seconds or 0,
        revision=versioned.mod_revision,
    )


def public_key_to_pb(name: str, version: KeyVersion, algorithm: Algorithm
                     ) -> signing_pb2.GetPublicKeyResponse:
    return signing_pb2.GetPublicKeyResponse(
        key=name,
        version=version.number,
        key_id=version.key_id,
        algorithm=_ALGORITHMS[algorithm],
        public_key_pem=public_key_pem(version.public_key_der),
        state=_STATES[version.state],
    )
