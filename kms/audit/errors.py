"""Errors raised by the audit log and its offline verifier.

``AuditUnavailable`` is an ``Unavailable``: when the log cannot make a record durable, the
signature it was meant to cover is not returned and the caller sees ``UNAVAILABLE`` (I3, fail
closed). ``AuditVerificationError`` says that a copy of a log is not what its checkpoints claim;
it always names the place (line, entry index or checkpoint) and what is wrong there.
"""

from __future__ import annotations

from kms.errors import KmsError, Unavailable


class AuditUnavailable(Unavailable):
    """An audit record could not be made durable (disk full, read-only or removed file, log
    closed). Nothing that depended on the record may be returned. Retrying later may succeed
    once the operator has fixed the store."""


class AuditLogCorrupt(AuditUnavailable):
    """The log on disk is not safe to extend (a malformed line before the end, entries missing
    that a checkpoint covers, another process holding it). The operator has to look at it."""


class AuditVerificationError(KmsError):
    """A log, checkpoint or proof failed verification.

    ``where`` names the place (``entries.jsonl line 7``, ``entry 6``, ``checkpoint 3``…),
    ``problem`` says what is wrong there.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem

    def diagnostics(self) -> str:
        return f"{self.where}: {self.problem}"
