"""Supply-chain signing use cases: in-toto statements (DSSE) and container images (cosign).

The edge (``signer``) parses and encodes the wire formats and hands over the exact bytes the
signature must cover (the DSSE PAE, the simple-signing payload). This module decides: the
caller's statement policy, the key's algorithm, then signs SHA-256 of those bytes through
``SigningService`` (which authorises the key and fences the signature).
"""

from __future__ import annotations

import hashlib

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from kms.domain.provenance import Statement
from kms.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from kms.signing import Caller, Signature, SigningService, StateView

# Algorithms whose signature over SHA-256(message), made from the precomputed digest, is the
# same as a standard signature over the message, so DSSE and cosign verifiers accept it.
# The HSM's Ed25519 signs the digest bytes as the message (PureEdDSA), which is not.
MESSAGE_SIGNING_ALGORITHMS = frozenset({Algorithm.ECDSA_P256_SHA256, Algorithm.RSA_PSS_3072_SHA256})


class StatementSigning:
    """Sign statements and image payloads for authorised callers."""

    def __init__(self, *, signing: SigningService, view: StateView) -> None:
        self._signing = signing
        self._view = view

    def _policy_check(self, caller: Caller) -> bool:
        """Whether the access policy applies (not in the insecure development mode)."""
        if caller.unrestricted:
            return False
        if self._view.policy() is None:
            raise PermissionDenied(
                "no access policy is configured, so nobody may sign; apply one with "
                "'signet policy apply FILE'"
            )
        return True

    def _require_message_key(self, key_name: str) -> None:
        algorithm = self._view.key(key_name).key.algorithm
        if algorithm not in MESSAGE_SIGNING_ALGORITHMS:
            raise FailedPrecondition(
                f"key {key_name!r} is {algorithm.value}: Signet's HSM Ed25519 signs digests, "
                "which DSSE and cosign verifiers do not accept; use an ecdsa-p256 or "
                "rsa-pss-3072 key for statements and image signatures"
            )

    async def _sign_message(
        self, caller: Caller, key_name: str, version: int | None, message: bytes,
        *, request_id: str, new_request_id: bool,
    ) -> Signature:
        digest = Digest(DigestAlgorithm.SHA256, hashlib.sha256(message).digest())
        return await self._signing.sign_digest(
            caller, key_name, version, digest, request_id=request_id,
            new_request_id=new_request_id)

    async def sign_statement(
        self,
        caller: Caller,
        key_name: str,
        version: int | None,
        statement: Statement,
        pae: bytes,
        *,
        request_id: str = "",
        new_request_id: bool = False,
    ) -> Signature:
        """Sign a structurally valid in-toto statement whose DSSE PAE is ``pae``; the audit
        entry carries ``request_id`` (``new_request_id`` as in ``SigningService.sign_digest``).

        Raises ``InvalidArgument`` (no key name), ``PermissionDenied`` (key not granted, or no
        statement policy for the caller), ``FailedPrecondition`` naming the failing rule or an
        Ed25519 key, and whatever ``SigningService.sign_digest`` raises.
        """
        if not key_name:
            raise InvalidArgument("a key name is required")
        self._view.require_current()
        if self._policy_check(caller):
            policy = self._view.policy()
            assert policy is not None  # noqa: S101 -- checked by _policy_check
            policy.check_statement(caller.identity, key_name, statement)
        self._require_message_key(key_name)
        return await self._sign_message(caller, key_name, version, pae,
                                        request_id=request_id, new_request_id=new_request_id)

    async def sign_image(
        self,
        caller: Caller,
        key_name: str,
        version: int | None,
        image_name: str,
        payload: bytes,
        *,
        request_id: str = "",
        new_request_id: bool = False,
    ) -> Signature:
        """Sign a simple-signing ``payload`` for the image repository ``image_name``
        (``registry/repository``). Raises like :meth:`sign_statement`; a registry outside the
        caller's allow-list is ``FailedPrecondition`` naming the rule."""
        if not key_name:
            raise InvalidArgument("a key name is required")
        self._view.require_current()
        if self._policy_check(caller):
            policy = self._view.policy()
            assert policy is not None  # noqa: S101 -- checked by _policy_check
            policy.check_image(caller.identity, key_name, image_name)
        self._require_message_key(key_name)
        return await self._sign_message(caller, key_name, version, payload,
                                        request_id=request_id, new_request_id=new_request_id)
