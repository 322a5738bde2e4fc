"""in-toto Statement v1 parsing: valid statements round trip, each defect names its field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kms.errors import InvalidArgument
from signer.payloads.intoto import MAX_STATEMENT_BYTES, STATEMENT_TYPE, Statement

HEX = "ab" * 32
VALID: dict[str, Any] = {
    "_type": STATEMENT_TYPE,
    "subject": [{"name": "registry.example.com/app", "digest": {"sha256": HEX, "sha512": "00"}}],
    "predicateType": "https://slsa.dev/provenance/v1",
    "predicate": {"buildDefinition": {}},
}


def test_a_valid_statement_round_trips() -> None:
    statement = Statement.from_json(json.dumps(VALID))
    assert statement.to_dict() == VALID
    assert statement.subject_digests() == {f"sha256:{HEX}"}
    assert Statement.from_json(statement.to_json()) == statement


def _broken(path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    target: Any = document
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("_type", "https://in-toto.io/Statement/v0.1", "'_type'"),
        ("subject", [], "'subject'"),
        ("subject", "x", "'subject'"),
        ("subject.0.name", "", r"'subject\[0\].name'"),
        ("subject.0.digest", {}, r"'subject\[0\].digest'"),
        ("subject.0.digest", {"sha512": "00"}, r"'subject\[0\].digest.sha256' is required"),
        ("subject.0.digest.sha256", "AB" * 32, r"'subject\[0\].digest.sha256' must be 64"),
        ("subject.0.digest.sha256", "ab" * 31, r"'subject\[0\].digest.sha256' must be 64"),
        ("predicateType", "", "'predicateType'"),
        ("predicateType", KeyError, "'predicateType'"),
        ("predicate", [], "'predicate'"),
        ("extra", 1, "unknown fields: extra"),
    ],
)
def test_each_defect_names_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Statement.from_dict(_broken(path, value))


def test_non_json_and_oversized_input_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        Statement.from_json(b"{")
    with pytest.raises(InvalidArgument, match="at most"):
        Statement.from_json(b" " * (MAX_STATEMENT_BYTES + 1))
