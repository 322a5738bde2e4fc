"""``signet``: sign, manage keys and policy, run a signer, run a development cluster."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import click
import yaml

from kms.domain.keys import Algorithm, Digest, Replication
from kms.domain.policy import AccessPolicy
from signer.cli.common import (
    EXIT_INVALID,
    Context,
    cluster_options,
    fail,
    handle_errors,
)
from signer.cli.dev import dev


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="signet")
def cli() -> None:
    """Signet: HSM-backed signing for software supply chains.

    Exit codes: 0 ok, 1 failure, 2 usage, 3 invalid input, 4 not found,
    5 unauthenticated or permission denied, 6 failed precondition or conflict,
    7 unavailable (retry later or in another region).
    """


cli.add_command(dev)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="Signer config file (YAML or JSON); see docs/operator.md.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@handle_errors
def serve(config_path: Path, log_level: str) -> None:
    """Run a signer until SIGTERM or SIGINT."""
    from signer.config import ServerConfig
    from signer.server import serve as run

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.load(config_path)
    asyncio.run(run(config))


@cli.group()
def key() -> None:
    """Create and inspect keys (administrator identity)."""


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


@cli.command()
@click.option("--key", "-k", "key_name", required=True, help="Key name.")
@click.option("--digest", "-d", "digest_text", required=True, help="Digest as sha256:HEX.")
@click.option("--version", "key_version", type=click.IntRange(min=1), default=None,
              help="Sign with this version instead of the primary one.")
@click.option("--request-id", default=None, help="Audit id for this request (default: random).")
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


