"""HSM-to-HSM key transport (DESIGN.md I1, "Facts about the components").

A multi-region key version moves between regions only wrapped, and only between HSMs:

1. Each region holds an RSA-3072 **transport key pair** in its HSM. The private half can only
   unwrap (no sign, no decrypt) and is sensitive and never extractable; the public half is
   registered in etcd when the region is onboarded.
2. The region that generated a version (its HSM holds it extractable and sensitive) makes a
   fresh AES-256 key in its own HSM, wraps the private key under it with
   ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649), and wraps the AES key with the target region's
   transport public key using RSA-OAEP (SHA-1/MGF1-SHA1: the only OAEP parameters SoftHSM
   2.6 accepts). The AES key and the imported transport public key are session objects and
   are destroyed right after.
3. The target region unwraps the AES key with its transport private key and the private key
   with the AES key, straight into its own token, with an explicit template (python-pkcs11's
   default one fails for private keys): same ``CKA_ID`` and label as in the origin region,
   sensitive, **not extractable**, sign only. So ``CKA_LOCAL`` is false there and
   ``CKA_NEVER_EXTRACTABLE`` false (it was extractable in the origin): the attributes show the
   key was unwrapped, not generated.

Nothing here ever sees a plaintext private or AES key: python-pkcs11 hands back handles and
the two wrapped blobs. Every function takes the python-pkcs11 session and runs on the HSM
thread, via ``Pkcs11Hsm.run_with_session`` (docs/adr/0002).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import DEFAULT, MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11_errors

from kms.domain.keys import Algorithm
from kms.errors import HsmError, InvalidArgument
from kms.hsm.pkcs11 import RSA_MODULUS_BITS

TRANSPORT_WRAP = Mechanism.RSA_PKCS_OAEP
# SoftHSM accepts OAEP only with SHA-1 and MGF1-SHA1 (measured; DESIGN.md). The label is empty.
TRANSPORT_WRAP_PARAM = (Mechanism.SHA_1, MGF.SHA1, None)
KEY_WRAP = Mechanism.AES_KEY_WRAP_PAD
AES_KEY_BYTES = 32

_KEY_TYPES = {
    Algorithm.ECDSA_P256_SHA256: KeyType.EC,
    Algorithm.RSA_PSS_3072_SHA256: KeyType.RSA,
}


@dataclass(frozen=True)
class WrappedKey:
    """A private key wrapped for one target region: the AES key under the target's transport
    key, and the private key under the AES key. Not secret, but never logged either."""

    wrapped_aes_key: bytes
    wrapped_private_key: bytes


@dataclass(frozen=True)
class TransportKey:
    hsm_id: bytes
    public_key_der: bytes  # SubjectPublicKeyInfo

    @property
    def public_key_pem(self) -> str:
        key = serialization.load_der_public_key(self.public_key_der)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


def generate_transport_key(session: Any, hsm_id: bytes, label: str) -> TransportKey:
    """Generate the region's RSA-3072 transport key pair on the token: the private key unwraps
    only, and is sensitive and never extractable. Raises PKCS#11 errors (the adapter
    translates them)."""
    public, _private = session.generate_keypair(
        KeyType.RSA, RSA_MODULUS_BITS, id=hsm_id, label=label, store=True,
        mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        public_template={
            Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.WRAP: True,
            Attribute.ENCRYPT: False, Attribute.VERIFY: False,
        },
        private_template={
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.UNWRAP: True, Attribute.DECRYPT: False,
            Attribute.SIGN: False, Attribute.DERIVE: False,
        },
    )
    der = rsa.RSAPublicNumbers(
        int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(public[Attribute.MODULUS], "big"),
    ).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TransportKey(hsm_id, der)


def transport_public_key(pem: str) -> rsa.RSAPublicKey:
    """Parse a registered transport public key. Raises ``InvalidArgument`` unless it is RSA
    with at least 3072 bits."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as error:
        raise InvalidArgument(f"the transport key is not a PEM public key: {error}") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < RSA_MODULUS_BITS:
        raise InvalidArgument("a region transport key must be RSA with at least 3072 bits")
    return key


def wrap_private_key(
    session: Any, hsm_id: bytes, algorithm: Algorithm, target_transport_pem: str
) -> WrappedKey:
    """Wrap the private key ``hsm_id`` (extractable) for the region whose transport public key
    is ``target_transport_pem``. Raises ``InvalidArgument`` for an algorithm that cannot be
    wrapped or a bad transport key, PKCS#11 errors otherwise (e.g. ``KeyUnextractable`` for a
    key generated non-extractable)."""
    if algorithm not in _KEY_TYPES:
        raise InvalidArgument(f"{algorithm.value} keys cannot be wrapped, so they stay regional")
    numbers = transport_public_key(target_transport_pem).public_numbers()
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=hsm_id)
    target = session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: False, Attribute.WRAP: True, Attribute.ENCRYPT: False,
        Attribute.VERIFY: False,
        Attribute.MODULUS: numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
        Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"),
    })
    aes = None
    try:
        # A one-use session key: it must be extractable to travel under the transport key.
        aes = session.generate_key(KeyType.AES, AES_KEY_BYTES * 8, store=False, template={
            Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
            Attribute.WRAP: True, Attribute.UNWRAP: False, Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
        })
        wrapped_private = aes.wrap_key(private, mechanism=KEY_WRAP)
        wrapped_aes = target.wrap_key(aes, mechanism=TRANSPORT_WRAP,
                                      mechanism_param=TRANSPORT_WRAP_PARAM)
    finally:
        for obj in (aes, target):
            if obj is not None:
                with contextlib.suppress(p11_errors.PKCS11Error):
                    obj.destroy()
    return WrappedKey(bytes(wrapped_aes), bytes(wrapped_private))


def unwrap_private_key(
    session: Any, transport_hsm_id: bytes, wrapped: WrappedKey, *, hsm_id: bytes, label: str,
    algorithm: Algorithm,
) -> None:
    """Unwrap ``wrapped`` into this token as a persistent private key with ``hsm_id`` and
    ``label``: sensitive, not extractable, sign only. An existing private key with that id
    is left alone (a retried unwrap is harmless). Raises ``InvalidArgument`` for an algorithm
    that cannot travel, ``HsmError`` when the blobs do not unwrap under this region's
    transport key, PKCS#11 errors otherwise."""
    key_type = _KEY_TYPES.get(algorithm)
    if key_type is None:
        raise InvalidArgument(f"{algorithm.value} keys cannot be unwrapped")
    if list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                 Attribute.ID: hsm_id})):
        return
    transport = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=transport_hsm_id)
    aes = None
    try:
        try:
            aes = transport.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped.wrapped_aes_key,
                mechanism=TRANSPORT_WRAP, mechanism_param=TRANSPORT_WRAP_PARAM, store=False,
                template={
                    Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.UNWRAP: True, Attribute.WRAP: False,
                    Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                },
            )
        except (p11_errors.EncryptedDataInvalid, p11_errors.WrappedKeyInvalid,
                p11_errors.WrappedKeyLenRange, p11_errors.GeneralError) as error:
            raise HsmError(
                f"the wrapped key for {label} does not unwrap under this region's transport "
                f"key ({type(error).__name__}); was it wrapped for another registration?"
            ) from None
        # The explicit template is what makes this work (the default one fails for private
        # keys), and it decides the protection of the copy: never extractable here, so a
        # replica cannot be wrapped onwards; only the origin region's HSM can.
        aes.unwrap_key(
            ObjectClass.PRIVATE_KEY, key_type, wrapped.wrapped_private_key, id=hsm_id,
            label=label, mechanism=KEY_WRAP, store=True, template={
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
                Attribute.UNWRAP: False, Attribute.DERIVE: False,
                # Public-key capabilities python-pkcs11 adds by default are invalid on a
                # private key (AttributeTypeInvalid): DEFAULT drops them from the template.
                Attribute.ENCRYPT: DEFAULT, Attribute.VERIFY: DEFAULT, Attribute.WRAP: DEFAULT,
            },
        )
    finally:
        if aes is not None:
            with contextlib.suppress(p11_errors.PKCS11Error):
                aes.destroy()


def holds_private_key(session: Any, hsm_id: bytes) -> bool:
    """Whether the token holds a private key with this CKA_ID."""
    return bool(list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                          Attribute.ID: hsm_id})))


def is_origin_copy(session: Any, hsm_id: bytes) -> bool:
    """Whether the private key was generated on this token (CKA_LOCAL) and may be wrapped out
    (CKA_EXTRACTABLE): only such a copy can serve other regions."""
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=hsm_id)
    values = private.get_attributes([Attribute.LOCAL, Attribute.EXTRACTABLE])
    return bool(values[Attribute.LOCAL]) and bool(values[Attribute.EXTRACTABLE])
