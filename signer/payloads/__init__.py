"""Wire formats of what Signet signs for supply chains: DSSE envelopes, in-toto Statements and
cosign simple-signing payloads. Pure: no I/O, no clock, no gRPC.

Malformed input raises ``kms.errors.InvalidArgument`` naming the field; a signature that does
not verify raises :class:`VerificationError`. Nothing here returns a bool for "verified".
"""

from __future__ import annotations

from kms.errors import KmsError


class VerificationError(KmsError):
    """A signature, subject or policy check failed. The message names what failed and why."""
