"""in-toto Statement v1 (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md).

Parsing is strict: every field is checked, and an error names the field, so a pipeline learns
exactly what to fix before anything is signed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kms.errors import InvalidArgument

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = frozenset({"_type", "subject", "predicateType", "predicate"})
MAX_STATEMENT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Subject:
    """A software artifact the statement is about, identified by its SHA-256 digest."""

    name: str
    digest: Mapping[str, str]

    @property
    def sha256(self) -> str:
        return self.digest["sha256"]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": dict(self.digest)}


@dataclass(frozen=True)
class Statement:
    subjects: tuple[Subject, ...]
    predicate_type: str
    predicate: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.subjects:
            raise InvalidArgument("statement field 'subject' must list at least one artifact")

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": STATEMENT_TYPE,
            "subject": [s.to_dict() for s in self.subjects],
            "predicateType": self.predicate_type,
            "predicate": dict(self.predicate),
        }

    def to_json(self) -> bytes:
        """Canonical-enough bytes: sorted keys, compact separators (what is signed)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def subject_digests(self) -> frozenset[str]:
        """Every subject as ``sha256:<hex>``."""
        return frozenset(f"sha256:{s.sha256}" for s in self.subjects)

    @classmethod
    def from_dict(cls, data: Any) -> Statement:
        """Validate and build; raises ``InvalidArgument`` naming the offending field."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("an in-toto statement must be a JSON object")
        unknown = set(data) - _FIELDS
        if unknown:
            raise InvalidArgument(
                f"statement has unknown fields: {', '.join(sorted(unknown))}; "
                "a Statement v1 has _type, subject, predicateType and predicate"
            )
        if data.get("_type") != STATEMENT_TYPE:
            raise InvalidArgument(
                f"statement field '_type' must be {STATEMENT_TYPE!r}, got {data.get('_type')!r}"
            )
        raw_subjects = data.get("subject")
        if not isinstance(raw_subjects, list) or not raw_subjects:
            raise InvalidArgument("statement field 'subject' must be a non-empty list")
        subjects = tuple(_subject(raw, index) for index, raw in enumerate(raw_subjects))
        predicate_type = data.get("predicateType")
        if not isinstance(predicate_type, str) or not predicate_type:
            raise InvalidArgument("statement field 'predicateType' must be a non-empty URI")
        predicate = data.get("predicate", {})
        if not isinstance(predicate, Mapping):
            raise InvalidArgument("statement field 'predicate' must be a JSON object")
        return cls(subjects, predicate_type, predicate)

    @classmethod
    def from_json(cls, text: bytes | str) -> Statement:
        """Raises ``InvalidArgument`` for oversized input, invalid JSON or a bad statement."""
        if len(text) > MAX_STATEMENT_BYTES:
            raise InvalidArgument(
                f"the statement is {len(text)} bytes; at most {MAX_STATEMENT_BYTES} are accepted"
            )
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"the statement is not valid JSON: {error}") from None
        return cls.from_dict(data)


def _subject(raw: Any, index: int) -> Subject:
    where = f"subject[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"statement field '{where}' must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"statement field '{where}.name' must be a non-empty string")
    digest = raw.get("digest")
    if not isinstance(digest, Mapping) or not digest:
        raise InvalidArgument(f"statement field '{where}.digest' must be a non-empty object")
    for algorithm, value in digest.items():
        if not isinstance(value, str):
            raise InvalidArgument(f"statement field '{where}.digest.{algorithm}' must be a string")
    sha256 = digest.get("sha256")
    if sha256 is None:
        raise InvalidArgument(f"statement field '{where}.digest.sha256' is required")
    if not _SHA256_HEX.match(sha256):
        raise InvalidArgument(
            f"statement field '{where}.digest.sha256' must be 64 lowercase hex characters, "
            f"got {sha256!r}"
        )
    return Subject(name, dict(digest))
