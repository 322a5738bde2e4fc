"""The access policy: which caller identities may sign with which keys, and who administers.

A policy is a small document, applied from YAML or JSON with ``signet policy apply FILE`` and
stored in etcd::

    version: 1
    bindings:
      - identity: spiffe://signet.dev/pipeline/*   # fnmatch pattern over the URI SAN
        sign: ["release-*", "ci"]                  # key-name patterns this identity may use
      - identity: spiffe://signet.dev/admin
        admin: true                                # may create keys and change the policy
      - identity: spiffe://signet.dev/pipeline
        sign: ["release"]
        statements:                                # may sign in-toto statements (SignStatement)
          predicate_types: ["https://slsa.dev/provenance/v1"]
          builder_ids: ["https://ci.example.com/*"]  # rules: kms/domain/provenance.py

Anything a binding does not grant is denied. A caller may sign a statement with a key only if a
binding matching the caller grants the key *and* has a ``statements`` section the statement
passes. Image signatures (SignImage) are limited to those sections' ``subject_registries``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kms.domain.provenance import Statement, StatementPolicy
from kms.errors import FailedPrecondition, InvalidArgument, PermissionDenied

POLICY_VERSION = 1
_BINDING_FIELDS = frozenset({"identity", "sign", "admin", "description", "statements"})


@dataclass(frozen=True)
class Binding:
    identity: str
    sign: tuple[str, ...] = ()
    admin: bool = False
    description: str = ""
    statements: StatementPolicy | None = None

    def matches(self, identity: str) -> bool:
        return fnmatch.fnmatchcase(identity, self.identity)

    def may_sign(self, key_name: str) -> bool:
        return any(fnmatch.fnmatchcase(key_name, pattern) for pattern in self.sign)


@dataclass(frozen=True)
class AccessPolicy:
    bindings: tuple[Binding, ...]

    def check_sign(self, identity: str, key_name: str) -> None:
        """Raise ``PermissionDenied`` unless some binding lets ``identity`` sign with the key."""
        if not any(b.matches(identity) and b.may_sign(key_name) for b in self.bindings):
            raise PermissionDenied(
                f"identity {identity!r} may not sign with key {key_name!r}; "
                "ask an administrator to add a binding to the access policy"
            )

    def check_admin(self, identity: str) -> None:
        """Raise ``PermissionDenied`` unless some binding makes ``identity`` an administrator."""
        if not any(b.matches(identity) and b.admin for b in self.bindings):
            raise PermissionDenied(
                f"identity {identity!r} may not administer keys or policy; "
                "an administrator binding (admin: true) is required"
            )

    def _statement_policies(self, identity: str, key_name: str) -> list[StatementPolicy]:
        return [
            b.statements for b in self.bindings
            if b.statements is not None and b.matches(identity) and b.may_sign(key_name)
        ]

    def check_statement(self, identity: str, key_name: str, statement: Statement) -> None:
        """Raise unless some binding that lets ``identity`` sign with the key has a
        ``statements`` section the statement passes. ``PermissionDenied`` when no binding
        allows statements at all; otherwise the failing rule's ``FailedPrecondition`` or
        ``InvalidArgument`` (the first binding's, when several bindings apply)."""
        self.check_sign(identity, key_name)
        policies = self._statement_policies(identity, key_name)
        if not policies:
            raise PermissionDenied(
                f"identity {identity!r} may not sign statements with key {key_name!r}: no "
                "binding for it has a 'statements' section; ask an administrator to add one"
            )
        first_error: Exception | None = None
        for policy in policies:
            try:
                policy.check(statement)
            except (FailedPrecondition, InvalidArgument) as error:
                first_error = first_error or error
            else:
                return
        assert first_error is not None  # noqa: S101 -- policies is non-empty
        raise first_error

    def check_image(self, identity: str, key_name: str, image_name: str) -> None:
        """Raise ``PermissionDenied`` unless ``identity`` may sign with the key, and
        ``FailedPrecondition`` naming the rule if every applicable ``statements`` section
        restricts registries and none allows this image's registry."""
        self.check_sign(identity, key_name)
        policies = self._statement_policies(identity, key_name)
        if any(p.registries is None for p in policies) or not policies:
            return
        errors = []
        for policy in policies:
            try:
                policy.check_image(image_name)
            except FailedPrecondition as error:
                errors.append(error)
            else:
                return
        raise errors[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": POLICY_VERSION,
            "bindings": [
                {
                    "identity": b.identity,
                    "sign": list(b.sign),
                    "admin": b.admin,
                    **({"description": b.description} if b.description else {}),
                    **({"statements": b.statements.to_dict()} if b.statements else {}),
                }
                for b in self.bindings
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> AccessPolicy:
        """Validate and build a policy; raises ``InvalidArgument`` naming the offending field."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("the policy must be a mapping with 'version' and 'bindings'")
        if data.get("version") != POLICY_VERSION:
            raise InvalidArgument(
                f"policy version must be {POLICY_VERSION}, got {data.get('version')!r}"
            )
        raw_bindings = data.get("bindings")
        if not isinstance(raw_bindings, list):
            raise InvalidArgument("policy 'bindings' must be a list")
        bindings = []
        for index, raw in enumerate(raw_bindings):
            where = f"bindings[{index}]"
            if not isinstance(raw, Mapping):
                raise InvalidArgument(f"{where} must be a mapping")
            unknown = set(raw) - _BINDING_FIELDS
            if unknown:
                raise InvalidArgument(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
            identity = raw.get("identity")
            if not isinstance(identity, str) or not identity:
                raise InvalidArgument(f"{where}.identity must be a non-empty string")
            sign = raw.get("sign", [])
            if not isinstance(sign, list) or not all(isinstance(p, str) and p for p in sign):
                raise InvalidArgument(f"{where}.sign must be a list of key-name patterns")
            admin = raw.get("admin", False)
            if not isinstance(admin, bool):
                raise InvalidArgument(f"{where}.admin must be true or false")
            description = raw.get("description", "")
            if not isinstance(description, str):
                raise InvalidArgument(f"{where}.description must be a string")
            raw_statements = raw.get("statements")
            statements = (
                None if raw_statements is None
                else StatementPolicy.from_dict(raw_statements, f"{where}.statements")
            )
            bindings.append(Binding(identity, tuple(sign), admin, description, statements))
        return cls(tuple(bindings))
