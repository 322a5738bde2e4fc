"""Statement policy: which in-toto statements a caller may have signed, and which provenance a
verifier accepts.

Pure: statements are plain JSON objects (already structurally validated at the edge), time is
passed in. Every check is a small named rule; a rule that fails raises ``FailedPrecondition``
(or ``InvalidArgument`` when the statement lacks a field the rule needs) with a message that
starts with ``rule '<name>' failed``. Verification evaluates all rules and reports each one.

Signing side, per access-policy binding (``statements:``)::

    statements:
      predicate_types: ["https://slsa.dev/provenance/v1"]
      builder_ids: ["https://ci.example.com/builders/*"]        # fnmatch patterns
      source_repositories: ["https://git.example.com/acme/*"]
      source_refs: ["refs/heads/main", "refs/tags/v*"]
      base_images: ["registry.example.com/base/*", "sha256:<hex>"]
      subject_registries: ["registry.example.com"]
      require_resolved_dependencies: true

The SLSA rules apply to statements whose predicateType is SLSA Provenance v1.
The verification policy file has the same rule fields plus ``trusted_keys``, ``predicate_type``
and ``max_age_seconds`` (docs/verification-policy.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import unquote

from kms.errors import FailedPrecondition, InvalidArgument, KmsError

SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
_IMAGE_SCHEMES = ("pkg:docker/", "oci://", "docker://")

Statement = Mapping[str, Any]


class StatementRule(Protocol):
    """One named check over a statement. ``check`` returns on success and raises
    ``FailedPrecondition`` or ``InvalidArgument`` naming the rule on failure."""

    @property
    def name(self) -> str: ...

    def check(self, statement: Statement) -> None: ...


def _fail(rule: str, message: str) -> FailedPrecondition:
    return FailedPrecondition(f"rule '{rule}' failed: {message}")


def _missing(rule: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"rule '{rule}' failed: {message}")


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def normalize_repository(url: str) -> str:
    """``git+https://host/org/repo.git`` → ``https://host/org/repo`` so patterns stay simple."""
    url = url.removeprefix("git+")
    return url.removesuffix("/").removesuffix(".git")


# --- reading SLSA Provenance v1 ---------------------------------------------------------


@dataclass(frozen=True)
class ImageDependency:
    """A container image the build used (a base image), from ``resolvedDependencies``."""

    name: str  # registry/repository, no tag or digest
    sha256: str | None


@dataclass(frozen=True)
class SlsaFacts:
    """The facts the rules look at, read from a SLSA Provenance v1 statement."""

    builder_id: str | None
    source_repository: str | None
    source_ref: str | None
    resolved_dependencies: tuple[Mapping[str, Any], ...]
    images: tuple[ImageDependency, ...]
    finished_on: str | None

    @classmethod
    def read(cls, rule: str, statement: Statement) -> SlsaFacts:
        """Raises ``FailedPrecondition`` if the statement is not SLSA v1, ``InvalidArgument``
        if its predicate has the wrong shape."""
        if statement.get("predicateType") != SLSA_PROVENANCE_V1:
            raise _fail(
                rule,
                f"needs a SLSA Provenance v1 predicate ({SLSA_PROVENANCE_V1}), got "
                f"{statement.get('predicateType')!r}",
            )
        predicate = _mapping(rule, statement.get("predicate"), "predicate")
        build = _mapping(rule, predicate.get("buildDefinition"), "predicate.buildDefinition")
        external = _mapping(
            rule,
            build.get("externalParameters", {}),
            "predicate.buildDefinition.externalParameters",
        )
        raw_deps = build.get("resolvedDependencies", [])
        if not isinstance(raw_deps, list) or not all(isinstance(d, Mapping) for d in raw_deps):
            raise _missing(
                rule, "predicate.buildDefinition.resolvedDependencies must be a list of objects"
            )
        run = _mapping(rule, predicate.get("runDetails", {}), "predicate.runDetails")
        builder = _mapping(rule, run.get("builder", {}), "predicate.runDetails.builder")
        metadata = _mapping(rule, run.get("metadata", {}), "predicate.runDetails.metadata")
        repository, ref = _source(external, raw_deps)
        builder_id = builder.get("id")
        finished = metadata.get("finishedOn") or metadata.get("startedOn")
        return cls(
            builder_id=builder_id if isinstance(builder_id, str) else None,
            source_repository=repository,
            source_ref=ref,
            resolved_dependencies=tuple(raw_deps),
            images=tuple(i for i in (_image(d) for d in raw_deps) if i is not None),
            finished_on=finished if isinstance(finished, str) else None,
        )


def _mapping(rule: str, value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _missing(rule, f"statement field '{where}' must be an object")
    return value


def _split_git_uri(uri: str) -> tuple[str, str | None]:
    """``git+https://host/repo@refs/heads/main`` → (``https://host/repo``, ``refs/heads/main``)."""
    scheme, sep, rest = uri.partition("://")
    # Only an '@' after the host part separates a ref (``ssh://git@host/repo`` has a user).
    host, slash, path = rest.partition("/")
    path, at, ref = path.rpartition("@") if "@" in path else (path, "", "")
    repository = normalize_repository(f"{scheme}{sep}{host}{slash}{path}")
    return repository, (ref or None) if at else None


def _source(
    external: Mapping[str, Any], deps: Sequence[Mapping[str, Any]]
) -> tuple[str | None, str | None]:
    # Different build types put the source in different places; look where the common ones do:
    # Signet's own (source.repository/ref), GitHub Actions (workflow.repository/ref), plain keys,
    # and finally the first git resolved dependency.
    for candidate in (external.get("source"), external.get("workflow"), external):
        if isinstance(candidate, str) and candidate.startswith("git+"):
            return _split_git_uri(candidate)
        if isinstance(candidate, Mapping) and isinstance(candidate.get("repository"), str):
            ref = candidate.get("ref")
            return (
                normalize_repository(candidate["repository"]),
                ref if isinstance(ref, str) else None,
            )
    for dep in deps:
        uri = dep.get("uri")
        if isinstance(uri, str) and uri.startswith("git+"):
            return _split_git_uri(uri)
    return None, None


def image_name(reference: str) -> str:
    """``registry/repo:tag@sha256:…``, optionally with a scheme or purl query, as
    ``registry/repo``."""
    for scheme in _IMAGE_SCHEMES:
        reference = reference.removeprefix(scheme)
    reference = unquote(reference.partition("?")[0]).partition("@")[0]
    head, slash, last = reference.rpartition("/")
    return f"{head}{slash}{last.partition(':')[0]}"


def _image(dep: Mapping[str, Any]) -> ImageDependency | None:
    uri = dep.get("uri")
    if not isinstance(uri, str) or not uri.startswith(_IMAGE_SCHEMES):
        return None
    digest = dep.get("digest")
    sha256 = digest.get("sha256") if isinstance(digest, Mapping) else None
    return ImageDependency(image_name(uri), sha256 if isinstance(sha256, str) else None)


def subject_registry(name: str) -> str | None:
    """The registry host of an image subject name (``registry:5000/app`` → ``registry:5000``);
    None when the name has no registry component."""
    for scheme in _IMAGE_SCHEMES:
        name = name.removeprefix(scheme)
    head, slash, _ = name.partition("/")
    if slash and ("." in head or ":" in head or head == "localhost"):
        return head
    return None


# --- rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredicateTypeAllowed:
    types: tuple[str, ...]
    name: str = "predicate-type"

    def check(self, statement: Statement) -> None:
        predicate_type = statement.get("predicateType")
        if predicate_type not in self.types:
            raise _fail(
                self.name,
                f"predicateType {predicate_type!r} is not allowed; allowed: "
                + ", ".join(self.types),
            )


@dataclass(frozen=True)
class BuilderAllowed:
    patterns: tuple[str, ...]
    name: str = "slsa-builder-id"

    def check(self, statement: Statement) -> None:
        facts = SlsaFacts.read(self.name, statement)
        if facts.builder_id is None:
            raise _missing(self.name, "predicate.runDetails.builder.id is missing")
        if not _matches(facts.builder_id, self.patterns):
            raise _fail(
                self.name,
                f"builder {facts.builder_id!r} is not one of: " + ", ".join(self.patterns),
            )


@dataclass(frozen=True)
class SourceRepositoryAllowed:
    patterns: tuple[str, ...]
    name: str = "slsa-source-repository"

    def check(self, statement: Statement) -> None:
        facts = SlsaFacts.read(self.name, statement)
        if facts.source_repository is None:
            raise _missing(
                self.name,
                "no source repository in buildDefinition.externalParameters "
                "(source.repository or workflow.repository) or a git+ resolved dependency",
            )
        patterns = tuple(normalize_repository(p) for p in self.patterns)
        if not _matches(facts.source_repository, patterns):
            raise _fail(
                self.name,
                f"source repository {facts.source_repository!r} is not one of: "
                + ", ".join(patterns),
            )


@dataclass(frozen=True)
class SourceRefAllowed:
    patterns: tuple[str, ...]
    name: str = "slsa-source-ref"

    def check(self, statement: Statement) -> None:
        facts = SlsaFacts.read(self.name, statement)
        if facts.source_ref is None:
            raise _missing(self.name, "the provenance names no source ref")
        if not _matches(facts.source_ref, self.patterns):
            raise _fail(
                self.name,
                f"source ref {facts.source_ref!r} is not one of: " + ", ".join(self.patterns),
            )


@dataclass(frozen=True)
class BaseImagesAllowed:
    """Every image dependency must be pinned by sha256 and match a name pattern
    (``registry/repo*``) or be pinned to an allowed digest (``sha256:<hex>``)."""

    patterns: tuple[str, ...]
    name: str = "slsa-base-images"

    def check(self, statement: Statement) -> None:
        facts = SlsaFacts.read(self.name, statement)
        for image in facts.images:
            if image.sha256 is None:
                raise _fail(self.name, f"base image {image.name} is not pinned by a sha256 digest")
            if f"sha256:{image.sha256}" in self.patterns or _matches(image.name, self.patterns):
                continue
            raise _fail(
                self.name,
                f"base image {image.name}@sha256:{image.sha256} is not allowed; allowed: "
                + ", ".join(self.patterns),
            )


@dataclass(frozen=True)
class SubjectRegistriesAllowed:
    registries: tuple[str, ...]
    name: str = "subject-registries"

    def check(self, statement: Statement) -> None:
        for subject in statement.get("subject", []):
            self.check_registry(subject.get("name", "") if isinstance(subject, Mapping) else "")

    def check_registry(self, image: str) -> None:
        """Raises ``FailedPrecondition`` unless the image name's registry is allowed."""
        registry = subject_registry(image)
        if registry is None or registry not in self.registries:
            raise _fail(
                self.name,
                f"{image!r} is not in an allowed registry; allowed: " + ", ".join(self.registries),
            )


@dataclass(frozen=True)
class ResolvedDependenciesRequired:
    name: str = "slsa-resolved-dependencies"

    def check(self, statement: Statement) -> None:
        facts = SlsaFacts.read(self.name, statement)
        if not facts.resolved_dependencies:
            raise _fail(self.name, "buildDefinition.resolvedDependencies is empty")
        for index, dep in enumerate(facts.resolved_dependencies):
            if not isinstance(dep.get("uri") or dep.get("name"), str):
                raise _fail(self.name, f"resolvedDependencies[{index}] has no uri or name")


@dataclass(frozen=True)
class MaxAge:
    """The build finished (or started) at most ``max_seconds`` before ``now``."""

    max_seconds: int
    now: float
    name: str = "max-age"

    def check(self, statement: Statement) -> None:
        facts = SlsaFacts.read(self.name, statement)
        if facts.finished_on is None:
            raise _missing(self.name, "runDetails.metadata has no finishedOn or startedOn")
        try:
            when = datetime.fromisoformat(facts.finished_on).timestamp()
        except ValueError:
            raise _missing(
                self.name, f"timestamp {facts.finished_on!r} is not RFC 3339"
            ) from None
        age = self.now - when
        if age > self.max_seconds:
            raise _fail(
                self.name,
                f"the build is {int(age)} s old; at most {self.max_seconds} s is accepted",
            )


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "passed": self.passed, "message": self.message}


def evaluate(rules: Sequence[StatementRule], statement: Statement) -> list[RuleResult]:
    """Run every rule; never raises for a failing rule, reports it instead."""
    results = []
    for rule in rules:
        try:
            rule.check(statement)
        except KmsError as error:
            results.append(RuleResult(rule.name, False, error.diagnostics()))
        else:
            results.append(RuleResult(rule.name, True, "ok"))
    return results


# --- documents ----------------------------------------------------------------------------

_RULE_FIELDS = frozenset({
    "builder_ids", "source_repositories", "source_refs", "base_images", "subject_registries",
    "require_resolved_dependencies",
})


def _patterns(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise InvalidArgument(f"{where}.{key} must be a list of non-empty strings")
    return tuple(value)


def _rules_from(data: Mapping[str, Any], where: str) -> tuple[StatementRule, ...]:
    rules: list[StatementRule] = []
    if builders := _patterns(data, "builder_ids", where):
        rules.append(BuilderAllowed(builders))
    if repositories := _patterns(data, "source_repositories", where):
        rules.append(SourceRepositoryAllowed(repositories))
    if refs := _patterns(data, "source_refs", where):
        rules.append(SourceRefAllowed(refs))
    if images := _patterns(data, "base_images", where):
        rules.append(BaseImagesAllowed(images))
    require = data.get("require_resolved_dependencies", False)
    if not isinstance(require, bool):
        raise InvalidArgument(f"{where}.require_resolved_dependencies must be true or false")
    if require:
        rules.append(ResolvedDependenciesRequired())
    return tuple(rules)


@dataclass(frozen=True)
class StatementPolicy:
    """What one access-policy binding allows to be signed as a statement."""

    predicate_types: tuple[str, ...]
    slsa_rules: tuple[StatementRule, ...] = ()
    registries: SubjectRegistriesAllowed | None = None
    document: Mapping[str, Any] = field(default_factory=dict)

    def rules_for(self, statement: Statement) -> list[StatementRule]:
        """The rules that apply: the predicate type, subject registries, and the SLSA rules
        when the statement is SLSA Provenance v1."""
        rules: list[StatementRule] = [PredicateTypeAllowed(self.predicate_types)]
        if self.registries is not None:
            rules.append(self.registries)
        if statement.get("predicateType") == SLSA_PROVENANCE_V1:
            rules.extend(self.slsa_rules)
        return rules

    def check(self, statement: Statement) -> None:
        """Raises the first failing rule's error."""
        for rule in self.rules_for(statement):
            rule.check(statement)

    def check_image(self, image_name: str) -> None:
        """Raises ``FailedPrecondition`` if the image's registry is not allowed."""
        if self.registries is not None:
            self.registries.check_registry(image_name)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.document)

    @classmethod
    def from_dict(cls, data: Any, where: str = "statements") -> StatementPolicy:
        """Raises ``InvalidArgument`` naming the offending field."""
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{where} must be a mapping")
        unknown = set(data) - _RULE_FIELDS - {"predicate_types"}
        if unknown:
            raise InvalidArgument(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        types = _patterns(data, "predicate_types", where)
        if not types:
            raise InvalidArgument(f"{where}.predicate_types must list at least one predicate type")
        registries = _patterns(data, "subject_registries", where)
        return cls(
            predicate_types=types,
            slsa_rules=_rules_from(data, where),
            registries=SubjectRegistriesAllowed(registries) if registries else None,
            document=dict(data),
        )


VERIFICATION_POLICY_VERSION = 1
_VERIFICATION_FIELDS = _RULE_FIELDS | {
    "version", "trusted_keys", "predicate_type", "max_age_seconds", "description",
}


@dataclass(frozen=True)
class VerificationPolicy:
    """What a verifier (CLI, admission webhook) requires of an image's signatures and
    provenance. See docs/verification-policy.md."""

    trusted_keys: tuple[str, ...]
    predicate_type: str
    max_age_seconds: int | None
    document: Mapping[str, Any]

    def is_trusted_key(self, key_name: str) -> bool:
        return _matches(key_name, self.trusted_keys)

    def statement_rules(self, now: float) -> list[StatementRule]:
        """The statement rules, in the order they are reported."""
        rules: list[StatementRule] = [PredicateTypeAllowed((self.predicate_type,))]
        if registries := _patterns(self.document, "subject_registries", "policy"):
            rules.append(SubjectRegistriesAllowed(registries))
        rules.extend(_rules_from(self.document, "policy"))
        if self.max_age_seconds is not None:
            rules.append(MaxAge(self.max_age_seconds, now))
        return rules

    def registry_rule(self) -> SubjectRegistriesAllowed | None:
        registries = _patterns(self.document, "subject_registries", "policy")
        return SubjectRegistriesAllowed(registries) if registries else None

    @classmethod
    def from_dict(cls, data: Any) -> VerificationPolicy:
        """Validate and build; raises ``InvalidArgument`` naming the offending field."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("the verification policy must be a mapping")
        if data.get("version") != VERIFICATION_POLICY_VERSION:
            raise InvalidArgument(
                f"verification policy version must be {VERIFICATION_POLICY_VERSION}, "
                f"got {data.get('version')!r}"
            )
        unknown = set(data) - _VERIFICATION_FIELDS
        if unknown:
            raise InvalidArgument(
                f"verification policy has unknown fields: {', '.join(sorted(unknown))}"
            )
        trusted = _patterns(data, "trusted_keys", "policy")
        if not trusted:
            raise InvalidArgument("policy.trusted_keys must name at least one key")
        predicate_type = data.get("predicate_type", SLSA_PROVENANCE_V1)
        if not isinstance(predicate_type, str) or not predicate_type:
            raise InvalidArgument("policy.predicate_type must be a non-empty string")
        max_age = data.get("max_age_seconds")
        if max_age is not None and (
            not isinstance(max_age, int) or isinstance(max_age, bool) or max_age <= 0
        ):
            raise InvalidArgument("policy.max_age_seconds must be a positive integer")
        _rules_from(data, "policy")  # validates the rule fields
        _patterns(data, "subject_registries", "policy")
        return cls(trusted, predicate_type, max_age, dict(data))
