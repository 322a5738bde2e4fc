"""Pure multi-region rules: home regions on key records, where a key may sign, and which error
a missing replica gives."""

from __future__ import annotations

import grpc
import pytest

from kms.domain.keys import Algorithm, Key, Replication
from kms.errors import FailedPrecondition, HsmError, Unavailable
from kms.replication import check_region, missing_replica
from signer.errors import status_for


def key(replication: Replication, home: str | None) -> Key:
    return Key.new(name="k", algorithm=Algorithm.ECDSA_P256_SHA256, replication=replication,
                   public_key_der=b"der", hsm_id=b"id", now=1.0, home_region=home)


def test_home_region_round_trips_and_old_records_stay_unchanged() -> None:
    with_home = key(Replication.REGIONAL, "us-east")
    assert Key.from_dict(with_home.to_dict()) == with_home
    without = key(Replication.REGIONAL, None)
    assert "home_region" not in without.to_dict()
    assert Key.from_dict(without.to_dict()).home_region is None


def test_a_regional_key_signs_only_at_home() -> None:
    check_region(key(Replication.REGIONAL, "us-east"), "us-east")
    check_region(key(Replication.REGIONAL, None), "anywhere")  # records from before regions
    check_region(key(Replication.MULTI_REGION, "us-east"), "eu-west")
    with pytest.raises(FailedPrecondition, match="lives in region 'us-east'"):
        check_region(key(Replication.REGIONAL, "us-east"), "eu-west")


def test_a_missing_replica_is_unavailable_and_names_the_home_region() -> None:
    error = missing_replica(key(Replication.MULTI_REGION, "eu-west"), 1, "ap-south")
    assert isinstance(error, Unavailable)
    assert "not yet replicated to region 'ap-south'" in str(error)
    assert "region 'eu-west'" in str(error)
    assert status_for(error) is grpc.StatusCode.UNAVAILABLE
    assert isinstance(missing_replica(key(Replication.REGIONAL, "eu-west"), 1, "x"),
                      FailedPrecondition)


def test_a_key_missing_from_its_own_region_is_an_hsm_problem() -> None:
    for replication in Replication:
        error = missing_replica(key(replication, "eu-west"), 1, "eu-west")
        assert isinstance(error, HsmError)  # UNAVAILABLE, not "lives elsewhere"
        assert "does not hold key" in str(error)
