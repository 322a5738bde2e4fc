"""Errors raised by key management.

One small hierarchy. Each class names the *kind* of failure; the service edge maps the kind to a
gRPC status in exactly one table (``signer.errors``). Messages are written for the person who has
to act on them: say what was wrong and what would be accepted.
"""

from __future__ import annotations


class KmsError(Exception):
    """Base of every error raised by ``kms``."""

    def diagnostics(self) -> str:
        """A one-line explanation a person can act on."""
        return str(self)


class InvalidArgument(KmsError):
    """The request itself is malformed (bad digest length, unknown algorithm, bad name)."""


class NotFound(KmsError):
    """The named key or version does not exist."""


class AlreadyExists(KmsError):
    """A key with this name exists already."""


class FailedPrecondition(KmsError):
    """The request is well formed but the key's state forbids it (e.g. version not ACTIVE)."""


class Conflict(KmsError):
    """A compare-and-swap lost a race: someone else changed the record first.

    Retry from a fresh read."""


class PermissionDenied(KmsError):
    """The authenticated caller is not allowed to do this."""


class Unauthenticated(KmsError):
    """The caller presented no usable identity."""


class ResourceExhausted(KmsError):
    """A limit was reached (batch too large, rate limit)."""


class Unavailable(KmsError):
    """A dependency (etcd, HSM) is out of reach or this signer cannot prove it is current.

    Retrying later, or against another region, may succeed.
    """


class HsmError(Unavailable):
    """The HSM failed or could not be reached."""


class StateStoreError(Unavailable):
    """The key-state store (etcd) could not be reached within the retry budget."""


class WatchCompacted(StateStoreError):
    """A watch asked for history the store has compacted away: re-read a full snapshot."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision
