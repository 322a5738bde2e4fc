"""The access policy: who may sign with which key, who administers."""

from typing import Any

import pytest

from kms.domain.policy import AccessPolicy
from kms.errors import InvalidArgument, PermissionDenied

POLICY = AccessPolicy.from_dict({
    "version": 1,
    "bindings": [
        {"identity": "spiffe://ci/*", "sign": ["release-*"]},
        {"identity": "spiffe://ci/nightly", "sign": ["nightly"]},
        {"identity": "spiffe://ops/admin", "admin": True},
    ],
})


@pytest.mark.parametrize(
    ("identity", "key"),
    [
        ("spiffe://ci/app", "release-1"),
        ("spiffe://ci/nightly", "nightly"),
        ("spiffe://ci/nightly", "release-2"),
    ],
)
def test_bindings_grant_signing(identity: str, key: str) -> None:
    POLICY.check_sign(identity, key)


@pytest.mark.parametrize(
    ("identity", "key"),
    [
        ("spiffe://ci/app", "nightly"),
        ("spiffe://other/app", "release-1"),
        ("spiffe://ops/admin", "release-1"),  # administering is not signing
    ],
)
def test_everything_not_granted_is_denied(identity: str, key: str) -> None:
    with pytest.raises(PermissionDenied, match=identity):
        POLICY.check_sign(identity, key)


def test_only_admin_bindings_administer() -> None:
    POLICY.check_admin("spiffe://ops/admin")
    with pytest.raises(PermissionDenied, match="admin: true"):
        POLICY.check_admin("spiffe://ci/app")


def test_policy_round_trips() -> None:
    assert AccessPolicy.from_dict(POLICY.to_dict()) == POLICY


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a mapping"),
        ({"version": 2, "bindings": []}, "version must be 1"),
        ({"version": 1}, "'bindings' must be a list"),
        ({"version": 1, "bindings": ["x"]}, r"bindings\[0\] must be a mapping"),
        ({"version": 1, "bindings": [{"sign": ["*"]}]}, r"bindings\[0\].identity"),
        ({"version": 1, "bindings": [{"identity": "a", "sign": "*"}]}, "list of key-name"),
        ({"version": 1, "bindings": [{"identity": "a", "admin": "yes"}]}, "true or false"),
        ({"version": 1, "bindings": [{"identity": "a", "root": True}]}, "unknown fields: root"),
    ],
)
def test_malformed_policies_name_the_problem(document: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        AccessPolicy.from_dict(document)
