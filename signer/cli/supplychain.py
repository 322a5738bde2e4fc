"""Supply-chain commands: create provenance, sign statements and images, verify them, and run
the admission webhook."""

from __future__ import annotations

import base64
import functools
import json
import platform
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from kms.domain.provenance import SLSA_PROVENANCE_V1, VerificationPolicy
from kms.errors import InvalidArgument
from signer.cli.common import (
    EXIT_FAILURE,
    EXIT_INVALID,
    Context,
    cluster_options,
    fail,
    handle_errors,
)
from signer.payloads.intoto import STATEMENT_TYPE, Statement
from signer.payloads.simplesigning import ImageReference
from signer.registry import CosignRegistry
from signer.signature_store import SignatureStore, StoredSignature
from signer.supplychain_client import SupplyChainClient
from signer.verification import (
    BundleKeyResolver,
    ClusterKeyResolver,
    Decision,
    FileKeyResolver,
    KeyResolver,
    verify_attestation,
    verify_image_signature,
)

BUILD_TYPE = "https://signet.dev/provenance/pipeline/v1"
F = TypeVar("F", bound=Callable[..., Any])


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for tool in ("pip", "signet"):
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _requirement_lines(text: str) -> list[dict[str, Any]]:
    """``name==version [--hash=sha256:HEX]`` lines (pip freeze, requirements files)."""
    deps = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("-") or "==" not in line:
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        dep: dict[str, Any] = {"uri": f"pkg:pypi/{name.lower()}@{version}", "name": name}
        hashes = [o.split("sha256:", 1)[1] for o in options if o.startswith("--hash=sha256:")]
        if hashes:
            dep["digest"] = {"sha256": hashes[0]}
        deps.append(dep)
    return deps


def _lock_file_dependencies(path: Path) -> list[dict[str, Any]]:
    """Resolved dependencies from a TOML lock file with ``[[package]]`` tables (uv.lock,
    poetry.lock) or a requirements-style file."""
    text = path.read_text()
    try:
        packages = tomllib.loads(text).get("package")
    except tomllib.TOMLDecodeError:
        packages = None
    if not isinstance(packages, list):
        return _requirement_lines(text)
    deps = []
    for package in packages:
        if isinstance(package, dict) and "name" in package and "version" in package:
            dep: dict[str, Any] = {"uri": f"pkg:pypi/{package['name']}@{package['version']}",
                                   "name": str(package["name"])}
            sdist = package.get("sdist")
            if isinstance(sdist, dict) and str(sdist.get("hash", "")).startswith("sha256:"):
                dep["digest"] = {"sha256": sdist["hash"].split(":", 1)[1]}
            deps.append(dep)
    return deps


def _subject(text: str) -> dict[str, Any]:
    name, at, digest = text.rpartition("@")
    if not at or not name or not digest.startswith("sha256:"):
        raise InvalidArgument(f"subject {text!r} must look like NAME@sha256:<hex>")
    return {"name": name, "digest": {"sha256": digest.removeprefix("sha256:")}}


def build_provenance(
    *, subjects: list[str], builder_id: str, source_repo: str, commit: str, ref: str | None,
    dependencies: list[dict[str, Any]], base_image: str | None, started_on: str,
    finished_on: str, tools: dict[str, str],
) -> Statement:
    """A SLSA Provenance v1 statement; raises ``InvalidArgument`` for a bad subject or image."""
    resolved: list[dict[str, Any]] = [{
        "uri": f"git+{source_repo}" + (f"@{ref}" if ref else ""),
        "digest": {"gitCommit": commit},
    }]
    if base_image is not None:
        image = ImageReference.parse(base_image, require_digest=True)
        resolved.append({"uri": f"oci://{image.name}", "digest": {"sha256": image.digest_hex},
                         "annotations": {"role": "base-image"}})
    resolved.extend(dependencies)
    source: dict[str, Any] = {"repository": source_repo, "commit": commit}
    if ref:
        source["ref"] = ref
    return Statement.from_dict({
        "_type": STATEMENT_TYPE,
        "subject": [_subject(s) for s in subjects],
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"source": source},
                "internalParameters": {"tools": tools},
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": builder_id},
                "metadata": {"invocationId": str(uuid.uuid4()), "startedOn": started_on,
                             "finishedOn": finished_on},
            },
        },
    })


@click.group()
def provenance() -> None:
    """Create SLSA provenance statements for build outputs."""


@provenance.command("create")
@click.option("--subject", "subjects", multiple=True, required=True,
              help="Build output as NAME@sha256:HEX (repeatable).")
@click.option("--builder-id", required=True, help="URI naming the builder (SLSA builder.id).")
@click.option("--source-repo", default=None, help="Default: git config remote.origin.url.")
@click.option("--commit", default=None, help="Default: git rev-parse HEAD.")
@click.option("--ref", default=None, help="Default: git symbolic-ref HEAD (e.g. refs/heads/main).")
@click.option("--lock-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="requirements/uv.lock/poetry.lock with the resolved dependencies.")
@click.option("--pip-freeze", is_flag=True, help="Record the dependencies `pip freeze` reports.")
@click.option("--base-image", default=None, help="Base image as REF@sha256:HEX.")
@click.option("--started-on", default=None, help="RFC 3339 build start (default: now).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@handle_errors
def provenance_create(*, subjects: tuple[str, ...], builder_id: str, source_repo: str | None,
                      commit: str | None, ref: str | None, lock_file: Path | None,
                      pip_freeze: bool, base_image: str | None, started_on: str | None,
                      out: Path) -> None:
    """Write a SLSA Provenance v1 in-toto statement for the given subjects."""
    if lock_file is not None and pip_freeze:
        fail("use --lock-file or --pip-freeze, not both", EXIT_INVALID)
    source_repo = source_repo or _git("config", "--get", "remote.origin.url")
    commit = commit or _git("rev-parse", "HEAD")
    ref = ref or _git("symbolic-ref", "-q", "HEAD")
    if source_repo is None or commit is None:
        fail("no git repository here to read the source from; pass --source-repo and --commit",
             EXIT_INVALID)
    dependencies: list[dict[str, Any]] = []
    if lock_file is not None:
        dependencies = _lock_file_dependencies(lock_file)
    elif pip_freeze:
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                                text=True, check=False)
        if frozen.returncode != 0:
            fail(f"pip freeze failed: {frozen.stderr.strip()}")
        dependencies = _requirement_lines(frozen.stdout)
    now = _now_rfc3339()
    statement = build_provenance(
        subjects=list(subjects), builder_id=builder_id, source_repo=source_repo, commit=commit,
        ref=ref, dependencies=dependencies, base_image=base_image,
        started_on=started_on or now, finished_on=now, tools=_tool_versions())
    out.write_text(json.dumps(statement.to_dict(), indent=2, sort_keys=True) + "\n")
    click.echo(f"wrote {out}: {len(statement.subjects)} subject(s), "
               f"{len(dependencies)} dependencies")


@click.command("sign-statement")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--key", "-k", "key_name", required=True)
@click.option("--version", "key_version", type=click.IntRange(min=1), default=None)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the DSSE envelope here (default: stdout).")
@click.option("--store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Also file the envelope under each subject in this signature store.")
@click.option("--attach", is_flag=True,
              help="Also attach the envelope to each subject's registry at cosign's "
                   "sha256-<hex>.att tag (subject names must be registry/repository).")
@cluster_options
@handle_errors
def sign_statement(*, ctx: Context, file: Path, key_name: str, key_version: int | None,
                   out: Path | None, store: Path | None, attach: bool) -> None:
    """Sign an in-toto statement; prints or writes the DSSE envelope."""
    statement = Statement.from_json(file.read_bytes())  # fail early, before the RPC
    targets = [ImageReference.parse(f"{s.name}@sha256:{s.sha256}") for s in statement.subjects
               ] if attach else []
    with ctx.client("pipeline") as client:
        signed = SupplyChainClient(client).sign_statement(
            key_name, file.read_bytes(), version=key_version)
    if store is not None:
        for subject in statement.subjects:
            SignatureStore(store).put_attestation(subject.sha256, signed.envelope_json)
    for target in targets:
        written = CosignRegistry().attach_attestation(target, signed.envelope_json)
        click.echo(f"attached the attestation at {written}", err=True)
    if out is not None:
        out.write_bytes(signed.envelope_json)
    summary = {"key": signed.key, "key_version": signed.key_version, "key_id": signed.key_id,
               "revision": signed.revision}
    if out is None:
        click.echo(signed.envelope_json.decode())
    else:
        ctx.emit({**summary, "envelope": str(out)},
                 f"signed with {signed.key} version {signed.key_version}; wrote {out}")


@click.command("sign-image")
@click.argument("image")
@click.option("--key", "-k", "key_name", required=True)
@click.option("--version", "key_version", type=click.IntRange(min=1), default=None)
@click.option("--annotation", "-a", "annotations", multiple=True,
              help="KEY=VALUE for the payload's optional section (repeatable).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write {payload, signature, key...} as JSON here.")
@click.option("--store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Also file the signature in this signature store.")
@click.option("--attach", is_flag=True,
              help="Also attach the signature to the image's registry at cosign's "
                   "sha256-<hex>.sig tag.")
@cluster_options
@handle_errors
def sign_image(*, ctx: Context, image: str, key_name: str, key_version: int | None,
               annotations: tuple[str, ...], out: Path | None, store: Path | None,
               attach: bool) -> None:
    """Sign a digest-pinned image (REF@sha256:HEX) with a cosign simple-signing payload."""
    reference = ImageReference.parse(image, require_digest=True)
    pairs = {}
    for item in annotations:
        name, eq, value = item.partition("=")
        if not eq or not name:
            fail(f"annotation {item!r} must be KEY=VALUE", EXIT_INVALID)
        pairs[name] = value
    with ctx.client("pipeline") as client:
        signed = SupplyChainClient(client).sign_image(
            key_name, str(reference), annotations=pairs, version=key_version)
    record = StoredSignature(str(reference), signed.payload, signed.signature, signed.key,
                             signed.key_version, signed.key_id)
    if store is not None:
        SignatureStore(store).put_signature(reference.digest_hex, record)
    if attach:
        written = CosignRegistry().attach_signature(reference, record)
        click.echo(f"attached the signature at {written}", err=True)
    if out is not None:
        out.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    ctx.emit(record.to_dict(), base64.b64encode(signed.signature).decode())


def _load_policy(path: Path) -> VerificationPolicy:
    try:
        return VerificationPolicy.from_dict(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as error:
        raise InvalidArgument(f"{path} is not valid YAML or JSON: {error}") from None


def _resolver(ctx: Context, keys: KeySource, policy: VerificationPolicy) -> KeyResolver:
    keys_from = keys.keys_from
    if keys_from is None:
        pinned = keys.trust_root is not None or "tuf_root" in ctx.cluster().extra
        keys_from = "bundle" if pinned else "cluster"
    if keys_from == "bundle":
        from signer.cli.trust import trust_client

        client, _ = trust_client(ctx, keys.trust_root, keys.trust_state, online=True)
        return BundleKeyResolver(client, refresh_seconds=keys.refresh_seconds)
    if keys_from == "cluster":
        return ClusterKeyResolver(ctx.client("pipeline"), policy.trusted_keys)
    return FileKeyResolver(Path(keys_from))


def _report(ctx: Context, decisions: list[Decision]) -> None:
    ctx.emit([d.to_dict() for d in decisions],
             "\n".join(line for d in decisions for line in d.lines()))
    if not all(d.allowed for d in decisions):
        raise SystemExit(EXIT_FAILURE)


_KEYS_FROM_HELP = ("'bundle' (the verified trust bundle; the default when cluster.json names a "
                   "tuf_root or --trust-root is given), 'cluster' (ask the signer; trusted_keys "
                   "must be exact names) or a JSON file of keys, e.g. the output of "
                   "'signet key show NAME -o json'.")


@dataclass(frozen=True)
class KeySource:
    """Where verification keys come from (``--keys-from`` and the trust-bundle options)."""

    keys_from: str | None
    trust_root: Path | None
    trust_state: Path | None
    refresh_seconds: float = 5.0


def key_source_options(command: F) -> F:
    """Add --keys-from, --trust-root, --trust-state and --bundle-refresh; pass ``keys``."""

    @click.option("--keys-from", default=None, help=_KEYS_FROM_HELP)
    @click.option("--trust-root", type=click.Path(path_type=Path, dir_okay=False), default=None,
                  help="Pinned 1.root.json for --keys-from bundle (default: tuf_root in "
                       "cluster.json).")
    @click.option("--trust-state", type=click.Path(path_type=Path, file_okay=False),
                  default=None, help="Where the trusted bundle is kept (default: "
                                     "trust/<region> next to cluster.json).")
    @click.option("--bundle-refresh", type=click.FloatRange(min=0), default=5.0,
                  show_default=True, help="Refetch the trust bundle once it is this many "
                                          "seconds old (revocations show up within it).")
    @functools.wraps(command)
    def wrapper(keys_from: str | None, trust_root: Path | None, trust_state: Path | None,
                bundle_refresh: float, **kwargs: Any) -> Any:
        return command(keys=KeySource(keys_from, trust_root, trust_state, bundle_refresh),
                       **kwargs)

    return wrapper  # type: ignore[return-value]


@click.command("verify-attestation")
@click.argument("envelope", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--policy", "policy_path", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--image", default=None, help="REF@sha256:HEX that must be a subject.")
@key_source_options
@cluster_options
@handle_errors
def verify_attestation_command(*, ctx: Context, envelope: Path, policy_path: Path,
                               image: str | None, keys: KeySource) -> None:
    """Verify a DSSE provenance envelope against a verification policy. Prints every rule
    checked; exits 1 when any fails."""
    policy = _load_policy(policy_path)
    reference = ImageReference.parse(image, require_digest=True) if image else None
    decision = verify_attestation(envelope.read_bytes(), _resolver(ctx, keys, policy),
                                  policy, now=time.time(), image=reference)
    _report(ctx, [decision])


def _read_signature(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        # cosign writes signatures base64-encoded; raw DER is accepted too.
        return base64.b64decode(data.strip(), validate=True)
    except ValueError:
        return data


@click.command("verify-image")
@click.argument("image")
@click.option("--signature", "signature_path", default=None,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Signature file (base64 or raw DER).")
@click.option("--payload", "payload_path", default=None,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The simple-signing payload that was signed.")
@click.option("--store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Read the signature and attestations from this signature store instead "
                   "of the image's registry.")
@click.option("--policy", "policy_path", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False))
@key_source_options
@cluster_options
@handle_errors
def verify_image(*, ctx: Context, image: str, signature_path: Path | None,
                 payload_path: Path | None, store: Path | None, policy_path: Path,
                 keys: KeySource) -> None:
    """Verify an image's signature and provenance against a policy: found in the image's
    registry at cosign's .sig/.att tags (default), in a signature store (--store), or only the
    signature given as files (--signature and --payload). Prints every rule checked; exits 1
    when any fails."""
    if (signature_path is None) != (payload_path is None):
        fail("give --signature and --payload together", EXIT_INVALID)
    if signature_path is not None and store is not None:
        fail("give --signature/--payload or --store, not both", EXIT_INVALID)
    policy = _load_policy(policy_path)
    resolver = _resolver(ctx, keys, policy)
    reference = ImageReference.parse(image)
    if signature_path is None or payload_path is None:
        from signer.admission import AdmissionController

        source = SignatureStore(store) if store is not None else CosignRegistry()
        controller = AdmissionController(source, resolver, policy, time.time)
        _report(ctx, [controller.check_image(image)])
        return
    decision = verify_image_signature(reference, payload_path.read_bytes(),
                                      _read_signature(signature_path), resolver, policy)
    _report(ctx, [decision])


@click.group()
def admission() -> None:
    """The Kubernetes validating admission webhook."""


@admission.command("serve")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT")
@click.option("--tls-cert", required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--tls-key", required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--policy", "policy_path", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Signature store with the images' signatures and attestations "
                   "(default: each image's registry, at cosign's .sig/.att tags).")
@key_source_options
@click.option("--decision-log", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Append every decision as a JSON line (the signer dashboard's "
                   "dashboard.admission_log).")
@cluster_options
@handle_errors
def admission_serve(*, ctx: Context, listen: str, tls_cert: Path, tls_key: Path,
                    policy_path: Path, store: Path | None, keys: KeySource,
                    decision_log: Path | None) -> None:
    """Serve POST /validate (AdmissionReview v1 for Pods) over HTTPS until SIGTERM/SIGINT."""
    import logging

    from signer.admission import AdmissionController, AdmissionServer, DecisionLog

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        fail(f"--listen {listen!r} must be HOST:PORT", EXIT_INVALID)
    policy = _load_policy(policy_path)
    source = SignatureStore(store) if store is not None else CosignRegistry()
    controller = AdmissionController(
        source, _resolver(ctx, keys, policy), policy, time.time,
        None if decision_log is None else DecisionLog(decision_log))
    server = AdmissionServer((host.strip("[]"), int(port)), controller, tls_cert, tls_key)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    server.start()
    click.echo(f"admission webhook listening on https://{host}:{server.port}/validate",
               err=True)
    stopping.wait()
    server.stop()


COMMANDS = (provenance, sign_statement, sign_image, verify_attestation_command, verify_image,
            admission)
