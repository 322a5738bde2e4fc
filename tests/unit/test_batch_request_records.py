"""The stored form of a SignBatch result (request-id idempotency): a retry decodes exactly
the outcomes the first attempt returned, signatures and per-item errors alike."""

from __future__ import annotations

import json

from kms.domain.keys import Algorithm
from kms.errors import InvalidArgument, KmsError, Unavailable
from kms.signing import Signature, _batch_from_record, _batch_record


def test_a_batch_record_round_trips_through_json() -> None:
    results: list[Signature | KmsError] = [
        Signature(b"\x30\x01", "release", 3, "ab" * 32, Algorithm.ECDSA_P256_SHA256, 42,
                  "eu-west"),
        InvalidArgument("item 1: digest must be 32 bytes"),
        Signature(b"\x30\x02", "release", 3, "ab" * 32, Algorithm.ECDSA_P256_SHA256, 42,
                  "eu-west"),
        Unavailable("HSM busy"),
    ]
    decoded = _batch_from_record(json.loads(json.dumps(_batch_record(results))))
    assert decoded[0] == results[0]
    assert decoded[2] == results[2]
    assert type(decoded[1]) is InvalidArgument
    assert str(decoded[1]) == str(results[1])
    assert type(decoded[3]) is Unavailable


def test_an_unknown_error_kind_decodes_as_the_base_error() -> None:
    record = _batch_record([
        Signature(b"s", "k", 1, "cd" * 32, Algorithm.ED25519, 1, "local"),
        KmsError("odd")])
    record["items"][1]["error"] = "SystemExit"
    decoded = _batch_from_record(record)
    assert type(decoded[1]) is KmsError
