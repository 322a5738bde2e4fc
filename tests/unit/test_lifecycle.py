"""Every legal and illegal lifecycle transition of a key version, table-driven."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kms.domain.keys import Algorithm, Key, Replication, VersionState
from kms.errors import FailedPrecondition, InvalidArgument

A, R, D, DS, X, RV = (VersionState.ACTIVE, VersionState.RETIRED, VersionState.DISABLED,
                      VersionState.DESTROY_SCHEDULED, VersionState.DESTROYED,
                      VersionState.REVOKED)


def base() -> Key:
    """Version 1 RETIRED, version 2 ACTIVE primary."""
    key = Key.new(name="k", algorithm=Algorithm.ECDSA_P256_SHA256,
                  replication=Replication.REGIONAL, public_key_der=b"p1", hsm_id=b"h1", now=0.0)
    return key.rotate(now=10.0, public_key_der=b"p2", hsm_id=b"h2")


# Each starting point: (description, key, version number under test).
def starting_points() -> dict[str, tuple[Key, int]]:
    key = base()
    return {
        "active-primary": (key, 2),
        "active-in-grace": (base().rotate(now=20.0, public_key_der=b"p3", hsm_id=b"h3",
                                          retire_grace_seconds=60).rotate(
            now=21.0, public_key_der=b"p4", hsm_id=b"h4", retire_grace_seconds=60), 3),
        "retired": (key, 1),
        "disabled-from-active": (key.disable(2, now=20.0), 2),
        "disabled-from-retired": (key.disable(1, now=20.0), 1),
        "destroy-scheduled": (key.schedule_destroy(1, now=20.0, waiting_seconds=30), 1),
        "destroy-scheduled-revoked": (
            key.revoke(1, now=15.0).schedule_destroy(1, now=20.0, waiting_seconds=30), 1),
        "destroyed": (key.schedule_destroy(1, now=20.0, waiting_seconds=0).destroy_due(21.0)[0],
                      1),
        "revoked": (key.revoke(2, now=20.0), 2),
    }


ACTIONS: dict[str, Callable[[Key, int], Key]] = {
    "disable": lambda k, n: k.disable(n, now=100.0),
    "enable": lambda k, n: k.enable(n, now=100.0),
    "revoke": lambda k, n: k.revoke(n, now=100.0),
    "schedule-destroy": lambda k, n: k.schedule_destroy(n, now=100.0, waiting_seconds=30),
    "cancel-destroy": lambda k, n: k.cancel_destroy(n, now=100.0),
}

# Expected state after the action, or None when it must be refused with FAILED_PRECONDITION.
EXPECTED: dict[tuple[str, str], VersionState | None] = {
    ("active-primary", "disable"): D,
    ("active-primary", "enable"): None,
    ("active-primary", "revoke"): RV,
    ("active-primary", "schedule-destroy"): None,  # rotate first
    ("active-primary", "cancel-destroy"): None,
    ("active-in-grace", "disable"): D,
    ("active-in-grace", "enable"): None,
    ("active-in-grace", "revoke"): RV,
    ("active-in-grace", "schedule-destroy"): DS,
    ("active-in-grace", "cancel-destroy"): None,
    ("retired", "disable"): D,
    ("retired", "enable"): None,
    ("retired", "revoke"): RV,
    ("retired", "schedule-destroy"): DS,
    ("retired", "cancel-destroy"): None,
    ("disabled-from-active", "disable"): None,
    ("disabled-from-active", "enable"): A,
    ("disabled-from-active", "revoke"): RV,
    ("disabled-from-active", "schedule-destroy"): DS,
    ("disabled-from-active", "cancel-destroy"): None,
    ("disabled-from-retired", "disable"): None,
    ("disabled-from-retired", "enable"): R,
    ("disabled-from-retired", "revoke"): RV,
    ("disabled-from-retired", "schedule-destroy"): DS,
    ("disabled-from-retired", "cancel-destroy"): None,
    ("destroy-scheduled", "disable"): None,
    ("destroy-scheduled", "enable"): None,
    ("destroy-scheduled", "revoke"): RV,
    ("destroy-scheduled", "schedule-destroy"): None,
    ("destroy-scheduled", "cancel-destroy"): R,
    ("destroy-scheduled-revoked", "disable"): None,
    ("destroy-scheduled-revoked", "enable"): None,
    ("destroy-scheduled-revoked", "revoke"): DS,  # already revoked: nothing changes
    ("destroy-scheduled-revoked", "schedule-destroy"): None,
    ("destroy-scheduled-revoked", "cancel-destroy"): RV,  # back to REVOKED, never further
    ("destroyed", "disable"): None,
    ("destroyed", "enable"): None,
    ("destroyed", "revoke"): None,
    ("destroyed", "schedule-destroy"): None,
    ("destroyed", "cancel-destroy"): None,
    ("revoked", "disable"): None,
    ("revoked", "enable"): None,
    ("revoked", "revoke"): RV,  # idempotent
    ("revoked", "schedule-destroy"): DS,
    ("revoked", "cancel-destroy"): None,
}


@pytest.mark.parametrize(("start", "action"), sorted(EXPECTED), ids=lambda v: v)
def test_transition(start: str, action: str) -> None:
    key, number = starting_points()[start]
    expected = EXPECTED[(start, action)]
    if expected is None:
        with pytest.raises(FailedPrecondition, match=f"version {number}"):
            ACTIONS[action](key, number)
        return
    after = ACTIONS[action](key, number)
    assert after.version(number).state is expected
    # Nothing else moved.
    for other in after.versions:
        if other.number != number:
            assert other == key.version(other.number)


def test_the_table_covers_every_start_and_action() -> None:
    assert set(EXPECTED) == {(s, a) for s in starting_points() for a in ACTIONS}


def test_revocation_is_permanent_through_destruction() -> None:
    key = base().revoke(1, now=5.0)
    assert key.version(1).revoked
    scheduled = key.schedule_destroy(1, now=6.0, waiting_seconds=0)
    assert scheduled.version(1).revoked
    assert not scheduled.version(1).verifiable
    destroyed, gone = scheduled.destroy_due(7.0)
    assert [v.number for v in gone] == [1]
    assert destroyed.version(1).state is X
    assert destroyed.version(1).revoked


def test_rotation_retires_the_previous_primary_at_once_or_after_grace() -> None:
    key = base()
    assert key.primary_version == 2
    assert key.version(1).state is R
    assert key.version(1).retired_at == 10.0
    graced = key.rotate(now=20.0, public_key_der=b"p3", hsm_id=b"h3", retire_grace_seconds=5)
    assert graced.primary_version == 3
    assert graced.version(2).state is A
    assert graced.retire_due(24.0) == graced
    retired = graced.retire_due(25.0)
    assert retired.version(2).state is R
    assert retired.version(3).state is A


def test_rotation_leaves_a_revoked_or_disabled_primary_alone() -> None:
    revoked = base().revoke(2, now=11.0)
    rotated = revoked.rotate(now=12.0, public_key_der=b"p3", hsm_id=b"h3")
    assert rotated.version(2).state is RV
    assert rotated.primary_version == 3


def test_destruction_waits_for_its_period() -> None:
    key = base().schedule_destroy(1, now=100.0, waiting_seconds=30)
    assert key.destroy_due(129.9)[1] == []
    after, gone = key.destroy_due(130.0)
    assert [v.number for v in gone] == [1]
    assert after.version(1).state is X


def test_automatic_rotation_is_due_after_its_period() -> None:
    key = Key.new(name="k", algorithm=Algorithm.ED25519, replication=Replication.REGIONAL,
                  public_key_der=b"p", hsm_id=b"h", now=0.0, rotation_period_seconds=60)
    assert not key.due_for_rotation(59.9)
    assert key.due_for_rotation(60.0)
    rotated = key.rotate(now=60.0, public_key_der=b"q", hsm_id=b"i")
    assert not rotated.due_for_rotation(119.0)


def test_min_sign_version_is_bounded_by_the_primary() -> None:
    key = base()
    assert key.set_min_sign_version(2).min_sign_version == 2
    for bad in (0, 3):
        with pytest.raises(InvalidArgument):
            key.set_min_sign_version(bad)


def test_records_with_lifecycle_fields_round_trip() -> None:
    key = base().rotate(now=20.0, public_key_der=b"p3", hsm_id=b"h3", retire_grace_seconds=9)
    key = key.revoke(1, now=21.0).disable(2, now=22.0)
    assert Key.from_dict(key.to_dict()) == key
