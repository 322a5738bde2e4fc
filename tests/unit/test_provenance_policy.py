"""Statement policy: each rule accepts a valid SLSA v1 statement and rejects a crafted
violation with a message naming the rule; the access policy's ``statements`` section."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from kms.domain.policy import AccessPolicy
from kms.domain.provenance import (
    SLSA_PROVENANCE_V1,
    BaseImagesAllowed,
    BuilderAllowed,
    MaxAge,
    PredicateTypeAllowed,
    ResolvedDependenciesRequired,
    SourceRefAllowed,
    SourceRepositoryAllowed,
    StatementRule,
    SubjectRegistriesAllowed,
    VerificationPolicy,
    evaluate,
)
from kms.errors import FailedPrecondition, InvalidArgument, KmsError, PermissionDenied

BASE_HEX = "ba" * 32
FINISHED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def slsa_statement(subject_hex: str = "cd" * 32,
                   subject_name: str = "registry.example.com/app") -> dict[str, Any]:
    """A valid SLSA Provenance v1 statement as ``signet provenance create`` writes it."""
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": subject_name, "digest": {"sha256": subject_hex}}],
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": "https://signet.dev/provenance/pipeline/v1",
                "externalParameters": {"source": {
                    "repository": "https://git.example.com/acme/app.git",
                    "ref": "refs/heads/main", "commit": "1" * 40}},
                "resolvedDependencies": [
                    {"uri": "git+https://git.example.com/acme/app@refs/heads/main",
                     "digest": {"gitCommit": "1" * 40}},
                    {"uri": "oci://registry.example.com/base/python",
                     "digest": {"sha256": BASE_HEX}, "annotations": {"role": "base-image"}},
                    {"uri": "pkg:pypi/click@8.1.7", "name": "click"},
                ],
            },
            "runDetails": {
                "builder": {"id": "https://ci.example.com/builders/main"},
                "metadata": {"finishedOn": FINISHED.strftime("%Y-%m-%dT%H:%M:%SZ")},
            },
        },
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = document
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return mutate


EXTERNAL = "predicate.buildDefinition.externalParameters"
DEPS = "predicate.buildDefinition.resolvedDependencies"

# (rule, a violation of it): the rule accepts slsa_statement() and rejects the mutated one.
CASES: list[tuple[StatementRule, Callable[[dict[str, Any]], None]]] = [
    (PredicateTypeAllowed((SLSA_PROVENANCE_V1,)), _set("predicateType", "https://spdx.dev/x")),
    (BuilderAllowed(("https://ci.example.com/builders/*",)),
     _set("predicate.runDetails.builder.id", "https://evil.example.com/laptop")),
    (SourceRepositoryAllowed(("https://git.example.com/acme/*",)),
     _set(f"{EXTERNAL}.source.repository", "https://git.example.com/other/app")),
    (SourceRefAllowed(("refs/heads/main", "refs/tags/v*")),
     _set(f"{EXTERNAL}.source.ref", "refs/heads/feature")),
    (BaseImagesAllowed(("registry.example.com/base/*",)),
     _set(f"{DEPS}.1.uri", "oci://docker.io/library/python")),
    (BaseImagesAllowed((f"sha256:{BASE_HEX}",)),
     _set(f"{DEPS}.1.digest", {"sha256": "ee" * 32})),
    (BaseImagesAllowed(("registry.example.com/base/*",)), _set(f"{DEPS}.1.digest", {})),
    (SubjectRegistriesAllowed(("registry.example.com",)),
     _set("subject.0.name", "docker.io/acme/app")),
    (ResolvedDependenciesRequired(), _set(DEPS, [])),
    (MaxAge(3600, FINISHED.timestamp() + 60),
     _set("predicate.runDetails.metadata.finishedOn", "2024-04-01T00:00:00Z")),
]


@pytest.mark.parametrize(("rule", "violate"), CASES, ids=lambda c: getattr(c, "name", ""))
def test_each_rule_accepts_valid_and_names_itself_when_violated(
    rule: StatementRule, violate: Callable[[dict[str, Any]], None]
) -> None:
    statement = slsa_statement()
    rule.check(statement)
    bad = copy.deepcopy(statement)
    violate(bad)
    with pytest.raises((FailedPrecondition, InvalidArgument), match=f"rule '{rule.name}' failed"):
        rule.check(bad)


def test_source_is_found_in_github_workflow_parameters_and_git_dependencies() -> None:
    github = slsa_statement()
    github["predicate"]["buildDefinition"]["externalParameters"] = {
        "workflow": {"repository": "https://git.example.com/acme/app", "ref": "refs/tags/v1"}}
    SourceRefAllowed(("refs/tags/v*",)).check(github)
    only_deps = slsa_statement()
    only_deps["predicate"]["buildDefinition"]["externalParameters"] = {}
    SourceRepositoryAllowed(("https://git.example.com/acme/app",)).check(only_deps)
    SourceRefAllowed(("refs/heads/main",)).check(only_deps)


def test_slsa_rules_refuse_other_predicates_and_missing_fields() -> None:
    other = slsa_statement()
    other["predicateType"] = "https://spdx.dev/Document"
    with pytest.raises(FailedPrecondition, match="rule 'slsa-builder-id' failed: needs a SLSA"):
        BuilderAllowed(("*",)).check(other)
    no_builder = slsa_statement()
    del no_builder["predicate"]["runDetails"]["builder"]
    with pytest.raises(InvalidArgument, match=r"rule 'slsa-builder-id' failed: .*builder\.id"):
        BuilderAllowed(("*",)).check(no_builder)


def test_evaluate_reports_every_rule() -> None:
    statement = slsa_statement()
    statement["predicate"]["runDetails"]["builder"]["id"] = "https://evil/"
    results = evaluate([PredicateTypeAllowed((SLSA_PROVENANCE_V1,)),
                        BuilderAllowed(("https://ci.example.com/*",))], statement)
    assert [(r.rule, r.passed) for r in results] == [
        ("predicate-type", True), ("slsa-builder-id", False)]
    assert "https://evil/" in results[1].message


PIPELINE = "spiffe://ci/pipeline"


def access_policy(statements: dict[str, Any] | None) -> AccessPolicy:
    binding: dict[str, Any] = {"identity": PIPELINE, "sign": ["release"]}
    if statements is not None:
        binding["statements"] = statements
    return AccessPolicy.from_dict({"version": 1, "bindings": [binding]})


def test_access_policy_statements_section_gates_statement_signing() -> None:
    policy = access_policy({
        "predicate_types": [SLSA_PROVENANCE_V1],
        "builder_ids": ["https://ci.example.com/*"],
        "subject_registries": ["registry.example.com"],
        "require_resolved_dependencies": True,
    })
    assert AccessPolicy.from_dict(policy.to_dict()) == policy
    policy.check_statement(PIPELINE, "release", slsa_statement())
    bad = slsa_statement()
    bad["predicate"]["runDetails"]["builder"]["id"] = "https://laptop/"
    with pytest.raises(FailedPrecondition, match="rule 'slsa-builder-id' failed"):
        policy.check_statement(PIPELINE, "release", bad)
    with pytest.raises(PermissionDenied):
        policy.check_statement(PIPELINE, "other-key", slsa_statement())
    policy.check_image(PIPELINE, "release", "registry.example.com/app")
    with pytest.raises(FailedPrecondition, match="rule 'subject-registries' failed"):
        policy.check_image(PIPELINE, "release", "docker.io/library/app")


def test_without_a_statements_section_statements_are_denied_but_images_are_not_limited() -> None:
    policy = access_policy(None)
    with pytest.raises(PermissionDenied, match="'statements' section"):
        policy.check_statement(PIPELINE, "release", slsa_statement())
    policy.check_image(PIPELINE, "release", "docker.io/library/app")


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        ({}, "predicate_types must list"),
        ({"predicate_types": ["x"], "builder_ids": "x"}, "builder_ids must be a list"),
        ({"predicate_types": ["x"], "require_resolved_dependencies": "yes"}, "true or false"),
        ({"predicate_types": ["x"], "colour": 1}, "unknown fields: colour"),
    ],
)
def test_malformed_statements_sections_are_refused(statements: dict[str, Any],
                                                  message: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"bindings\[0\].statements.*{message}"):
        access_policy(statements)


def test_verification_policy_builds_rules_and_validates() -> None:
    policy = VerificationPolicy.from_dict({
        "version": 1, "trusted_keys": ["release"], "builder_ids": ["https://ci.example.com/*"],
        "max_age_seconds": 600, "subject_registries": ["registry.example.com"],
    })
    names = [r.name for r in policy.statement_rules(now=0.0)]
    assert names == ["predicate-type", "subject-registries", "slsa-builder-id", "max-age"]
    assert policy.is_trusted_key("release")
    assert not policy.is_trusted_key("release-old")
    for document, message in [
        ({"version": 2, "trusted_keys": ["a"]}, "version"),
        ({"version": 1}, "trusted_keys"),
        ({"version": 1, "trusted_keys": ["a"], "max_age_seconds": -1}, "max_age_seconds"),
        ({"version": 1, "trusted_keys": ["a"], "maxage": 1}, "unknown fields"),
    ]:
        with pytest.raises(KmsError, match=message):
            VerificationPolicy.from_dict(document)
