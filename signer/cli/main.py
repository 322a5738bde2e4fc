"""``signet``: sign, manage keys and policy, run a signer, run a development cluster."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import click
import yaml

from kms.domain.keys import Algorithm, Digest, Replication
from kms.domain.policy import AccessPolicy
from signer.cli.audit import audit
from signer.cli.ceremony import COMMANDS as CEREMONY_COMMANDS
from signer.cli.common import (
    EXIT_INVALID,
    Context,
    cluster_options,
    fail,
    handle_errors,
)
from signer.cli.dev import dev
from signer.cli.drill import drill
from signer.cli.supplychain import COMMANDS as SUPPLY_CHAIN_COMMANDS
from signer.cli.trust import COMMANDS as TRUST_COMMANDS
from signer.client import KeyInfo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="signet")
def cli() -> None:
    """Signet: HSM-backed signing for software supply chains.

    Exit codes: 0 ok, 1 failure, 2 usage, 3 invalid input, 4 not found,
    5 unauthenticated or permission denied, 6 failed precondition or conflict,
    7 unavailable (retry later or in another region).
    """


cli.add_command(dev)
cli.add_command(audit)
cli.add_command(drill)
for _command in SUPPLY_CHAIN_COMMANDS:
    cli.add_command(_command)
for _command in TRUST_COMMANDS:
    cli.add_command(_command)
for _command in CEREMONY_COMMANDS:
    cli.add_command(_command)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="Signer config file (YAML or JSON); see docs/operator-guide.md.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--workers", type=click.IntRange(min=1, max=256), default=None,
              help="Worker processes sharing the port (overrides 'workers:'; default: one "
                   "per core). See docs/adr/0008-worker-processes.md.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one object per line with trace and span ids.")
@handle_errors
def serve(config_path: Path, log_level: str, workers: int | None, log_format: str) -> None:
    """Run a signer until SIGTERM or SIGINT."""
    from signer.config import ServerConfig
    from signer.telemetry import configure_logging

    configure_logging(log_level, log_format)
    config = ServerConfig.load(config_path)
    count = config.worker_count(workers)
    if count > 1:
        # Fork the workers before anything initialises gRPC, asyncio or PKCS#11.
        from signer.workers import serve_workers

        raise SystemExit(serve_workers(config, count))
    from signer.server import serve as run

    asyncio.run(run(config))


@cli.group()
def key() -> None:
    """Create, rotate, revoke, destroy and inspect keys (administrator identity)."""


@key.command("create")
@click.argument("name")
@click.option("--algorithm", "-a", default="ecdsa-p256", show_default=True,
              help="ecdsa-p256, ed25519 or rsa-pss-3072.")
@click.option("--replication", default="regional", show_default=True,
              help="regional or multi-region (multi-region keys are HSM-wrappable).")
@click.option("--rotation-period", type=click.IntRange(min=1), default=None,
              help="Rotate automatically every this many seconds.")
@cluster_options
@handle_errors
def key_create(ctx: Context, name: str, algorithm: str, replication: str,
               rotation_period: int | None) -> None:
    """Generate a key pair inside the HSM and record it as version 1."""
    alg = Algorithm.parse(algorithm)
    rep = Replication.parse(replication)
    with ctx.client("admin") as client:
        info = client.create_key(name, alg, replication=rep,
                                 rotation_period_seconds=rotation_period)
    ctx.emit(info.to_dict(), f"created key {info.name} ({info.algorithm.value}), version 1, "
                             f"key id {info.versions[0].key_id}")


@key.command("list")
@cluster_options
@handle_errors
def key_list(ctx: Context) -> None:
    """List keys."""
    with ctx.client("admin") as client:
        keys = client.list_keys()
    lines = [f"{'NAME':<32} {'ALGORITHM':<22} {'PRIMARY':>7}  REPLICATION"]
    lines += [f"{k.name:<32} {k.algorithm.value:<22} {k.primary_version:>7}  {k.replication.value}"
              for k in keys]
    ctx.emit([k.to_dict() for k in keys], "\n".join(lines))


@key.command("show")
@click.argument("name")
@cluster_options
@handle_errors
def key_show(ctx: Context, name: str) -> None:
    """Show a key and its versions."""
    with ctx.client("admin") as client:
        info = client.get_key(name)
    lines = [
        f"key:              {info.name}",
        f"algorithm:        {info.algorithm.value}",
        f"replication:      {info.replication.value}",
        f"primary version:  {info.primary_version}",
        f"min sign version: {info.min_sign_version}",
        f"revision:         {info.revision}",
        "versions:",
    ]
    lines += [f"  {v.number:>3}  {v.state:<18} {v.key_id}" for v in info.versions]
    ctx.emit(info.to_dict(), "\n".join(lines))


def _versions_table(info: KeyInfo) -> str:
    lines = [f"{'VERSION':>7}  {'STATE':<18} {'REVOKED':<7}  {'CREATED':<20} KEY ID"]
    for v in info.versions:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created_at))
        note = ""
        if v.retire_at:
            note = f"  (retires {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(v.retire_at))})"
        if v.destroy_after:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.destroy_after))
            note = f"  (destroyed after {when})"
        primary = "*" if v.number == info.primary_version else " "
        lines.append(f"{v.number:>6}{primary}  {v.state:<18} {'yes' if v.revoked else 'no':<7}  "
                     f"{created:<20} {v.key_id}{note}")
    return "\n".join(lines)


@key.command("versions")
@click.argument("name")
@cluster_options
@handle_errors
def key_versions(ctx: Context, name: str) -> None:
    """List a key's versions and their states (* marks the primary)."""
    with ctx.client("admin") as client:
        info = client.get_key(name)
    ctx.emit([v.to_dict() for v in info.versions], _versions_table(info))


@key.command("rotate")
@click.argument("name")
@click.option("--retire-grace", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Seconds the previous primary stays ACTIVE before it is RETIRED.")
@cluster_options
@handle_errors
def key_rotate(ctx: Context, name: str, retire_grace: float) -> None:
    """Generate a new primary version in the HSM."""
    with ctx.client("admin") as client:
        info = client.rotate_key(name, retire_grace_seconds=retire_grace)
    ctx.emit(info.to_dict(), f"rotated {name}: version {info.primary_version} is primary\n"
                             + _versions_table(info))


VERSION_OPTION = click.option("--version", "-v", "version", type=click.IntRange(min=1),
                              required=True, help="Version number.")


def _version_command(name: str, method: str, summary: str, done: str) -> None:
    @key.command(name, help=summary)
    @click.argument("key_name", metavar="NAME")
    @VERSION_OPTION
    @cluster_options
    @handle_errors
    def command(ctx: Context, key_name: str, version: int) -> None:
        with ctx.client("admin") as client:
            info = getattr(client, method)(key_name, version)
        ctx.emit(info.to_dict(), f"{done} {key_name} version {version}\n"
                                 + _versions_table(info))


_version_command("disable", "disable_version",
                 "Pause an ACTIVE or RETIRED version (undo with enable).", "disabled")
_version_command("enable", "enable_version", "Undo disable.", "enabled")
_version_command("cancel-destroy", "cancel_destroy",
                 "Cancel a scheduled destruction; the version returns to its previous state.",
                 "cancelled destruction of")
_version_command("set-min-version", "set_min_sign_version",
                 "Refuse signing with versions below this one.", "minimum signing version of")


@key.command("revoke")
@click.argument("name")
@VERSION_OPTION
@cluster_options
@handle_errors
def key_revoke(ctx: Context, name: str, version: int) -> None:
    """Revoke a version (final). Returns once no signer anywhere can sign with it."""
    with ctx.client("admin") as client:
        result = client.revoke_version(name, version)
    ctx.emit(result.to_dict(),
             f"revoked {name} version {version} at revision {result.revision}; fenced in "
             f"{result.fence_seconds * 1000:.1f} ms ({len(result.signers_acknowledged)} signers "
             f"acknowledged, {len(result.signers_lapsed)} lapsed)")


@key.command("schedule-destroy")
@click.argument("name")
@VERSION_OPTION
@click.option("--waiting-period", type=click.FloatRange(min=0), default=None,
              help="Seconds before the key material is destroyed (default: the cluster's, "
                   "30 days unless configured).")
@cluster_options
@handle_errors
def key_schedule_destroy(ctx: Context, name: str, version: int,
                         waiting_period: float | None) -> None:
    """Schedule destruction of a version's key material (cancellable until then)."""
    with ctx.client("admin") as client:
        info = client.schedule_destroy(name, version, waiting_seconds=waiting_period)
    ctx.emit(info.to_dict(), f"scheduled destruction of {name} version {version}\n"
                             + _versions_table(info))


@cli.command()
@click.option("--key", "-k", "key_name", required=True, help="Key name.")
@click.option("--digest", "-d", "digest_text", required=True, help="Digest as sha256:HEX.")
@click.option("--version", "key_version", type=click.IntRange(min=1), default=None,
              help="Sign with this version instead of the primary one.")
@click.option("--request-id", default=None,
              help="Id for this request: in the audit log, and a rerun with the same id "
                   "gets the first signature back (default: a new random id).")
@click.option("--signature-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the raw signature bytes (DER for ECDSA) to this file.")
@cluster_options
@handle_errors
def sign(*, ctx: Context, key_name: str, digest_text: str, key_version: int | None,
         request_id: str | None, signature_out: Path | None) -> None:
    """Sign a digest (pipeline identity). Prints the signature as base64."""
    digest = Digest.parse(digest_text)
    with ctx.client("pipeline") as client:
        sig = client.sign_digest(key_name, digest, version=key_version, request_id=request_id)
    encoded = base64.b64encode(sig.signature).decode()
    if signature_out is not None:
        signature_out.write_bytes(sig.signature)
    ctx.emit(
        {
            "signature": encoded,
            "key": sig.key,
            "key_version": sig.version,
            "key_id": sig.key_id,
            "algorithm": sig.algorithm.value,
            "revision": sig.revision,
            "region": sig.region,
            "digest": str(digest),
        },
        encoded,
    )


@cli.command("public-key")
@click.argument("name")
@click.option("--version", "key_version", type=click.IntRange(min=1), default=None)
@cluster_options
@handle_errors
def public_key(ctx: Context, name: str, key_version: int | None) -> None:
    """Print a key version's public key as PEM."""
    with ctx.client("pipeline") as client:
        pub = client.public_key(name, key_version)
    ctx.emit(
        {"key": pub.key, "version": pub.version, "key_id": pub.key_id,
         "algorithm": pub.algorithm.value, "state": pub.state, "public_key_pem": pub.pem},
        pub.pem.rstrip("\n"),
    )


@cli.group()
def policy() -> None:
    """Apply and show the access policy (administrator identity)."""


@policy.command("apply")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--expected-revision", type=int, default=0,
              help="Only replace the policy if it is still at this revision (0: any).")
@cluster_options
@handle_errors
def policy_apply(ctx: Context, file: Path, expected_revision: int) -> None:
    """Validate a YAML or JSON policy file and store it."""
    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        fail(f"{file} is not valid YAML or JSON: {error}", EXIT_INVALID)
    parsed = AccessPolicy.from_dict(document)
    with ctx.client("admin") as client:
        revision = client.set_policy(parsed, expected_revision=expected_revision)
    ctx.emit({"revision": revision, "bindings": len(parsed.bindings)},
             f"applied policy with {len(parsed.bindings)} bindings at revision {revision}")


@policy.command("show")
@cluster_options
@handle_errors
def policy_show(ctx: Context) -> None:
    """Print the access policy."""
    with ctx.client("admin") as client:
        current, revision = client.get_policy()
    ctx.emit({"revision": revision, "policy": current.to_dict()},
             f"# revision {revision}\n" + yaml.safe_dump(current.to_dict(), sort_keys=False))


def main() -> None:
    cli(prog_name="signet")


if __name__ == "__main__":
    main()


