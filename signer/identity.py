"""Who is calling: the URI SAN (SPIFFE-style) of the caller's mTLS client certificate."""

from __future__ import annotations

import functools
from typing import Any

import grpc
from cryptography import x509

from kms.errors import Unauthenticated
from kms.signing import Caller

INSECURE_CALLER = Caller(identity="insecure://anonymous", unrestricted=True)


@functools.lru_cache(maxsize=4096)
def identity_from_pem(pem: bytes) -> str:
    """The single URI SAN of a client certificate; raises ``Unauthenticated`` otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise Unauthenticated(
            "the client certificate has no URI subject alternative name; Signet identifies "
            "callers by a URI SAN such as spiffe://example.org/pipeline"
        ) from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise Unauthenticated(
            f"the client certificate must carry exactly one URI SAN, it has {len(uris)}"
        )
    return uris[0]


def caller_from_context(
    context: grpc.aio.ServicerContext[Any, Any], *, insecure: bool
) -> Caller:
    """The authenticated caller of an RPC. In the explicit insecure development mode every
    caller is unrestricted; otherwise a verified client certificate is required."""
    if insecure:
        return INSECURE_CALLER
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise Unauthenticated(
            "no client certificate was presented; Signet requires mTLS with a certificate "
            "issued by the cluster CA"
        )
    return Caller(identity=identity_from_pem(next(iter(pems))))
