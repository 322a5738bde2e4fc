"""``signet bundle fetch``, ``signet verify`` and ``signet tuf …``: trust distribution.

Exit codes beyond docs/cli.md's common ones: 9 when a trust bundle or a signature is refused
(bad chain, rollback, replay, wrong region, expired, revoked, unknown key, invalid signature).
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import click
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Metadata, Root

from kms.domain.keys import Digest
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.tuf.repository import OnlineKey
from kms.tuf.signing import (
    generate_custodian_key,
    init_root,
    load_custodian_signer,
    load_public_key,
    rotate_root,
)
from kms.tuf.store import TufRepositoryStore
from signer.cli.common import EXIT_USAGE, Context, cluster_options, fail, handle_errors
from signer.cluster import ClusterFile
from signer.trust import GrpcTrustTransport, TrustClient, TrustedBundle, TrustError

EXIT_UNTRUSTED = 9
_DAY = 86_400.0


def _root_path(cluster: ClusterFile, root: Path | None) -> Path:
    if root is not None:
        return root
    pinned = cluster.extra.get("tuf_root")
    if not isinstance(pinned, str):
        fail(f"{cluster.path} names no TUF root (tuf_root); pass --root 1.root.json", EXIT_USAGE)
    path = Path(pinned)
    return path if path.is_absolute() else cluster.path.parent / path


def trust_client(ctx: Context, root: Path | None, state_dir: Path | None,
                 *, online: bool) -> tuple[TrustClient, GrpcTrustTransport | None]:
    """A ``TrustClient`` for the context's region: the pinned root (``root``, else cluster.json's
    ``tuf_root``), state in ``state_dir`` (else ``trust/<region>`` next to cluster.json), and a
    gRPC transport unless ``online`` is false (close it when done)."""
    cluster = ctx.cluster()
    region = ctx.region or cluster.home_region
    state = state_dir or cluster.path.parent / "trust" / region
    transport = GrpcTrustTransport.from_cluster(cluster, region, ctx.identity or "pipeline") \
        if online else None
    return TrustClient(_root_path(cluster, root), state, region, transport), transport


def _bundle_table(bundle: TrustedBundle) -> str:
    expires = bundle.timestamp_expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"region {bundle.region}: root v{bundle.root_version}, timestamp "
        f"v{bundle.timestamp_version} (expires {expires}), key state at etcd revision "
        f"{bundle.etcd_revision}, vouched for at {bundle.freshness_time}",
        f"{'KEY':<24} {'VER':>3}  {'STATE':<18} {'REVOKED':<7} {'ALGORITHM':<20} KEY ID",
    ]
    for v in bundle.versions:
        mark = "*" if v.primary else " "
        lines.append(f"{v.key:<24} {v.number:>3}{mark} {v.state:<18} "
                     f"{'yes' if v.revoked else 'no':<7} {v.algorithm:<20} {v.key_id}")
    for region, key in sorted(bundle.online_keys.items()):
        lines.append(f"online key of {region}: {key['key_id']}")
    return "\n".join(lines)


ROOT_OPTION = click.option("--root", "root", type=click.Path(path_type=Path, dir_okay=False),
                           default=None, help="Pinned 1.root.json (default: tuf_root in "
                                              "cluster.json).")
STATE_OPTION = click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
                            default=None, help="Where the trusted state is kept (default: "
                                               "trust/<region> next to cluster.json).")


@click.group()
def bundle() -> None:
    """Fetch and show the verified trust bundle."""


@bundle.command("fetch")
@ROOT_OPTION
@STATE_OPTION
@cluster_options
@handle_errors
def bundle_fetch(ctx: Context, root: Path | None, state_dir: Path | None) -> None:
    """Fetch the trust bundle with a fresh nonce, verify it from the pinned root and keep it.

    Exit 9 when the answer is refused; the previously trusted state is then unchanged.
    """
    client, transport = trust_client(ctx, root, state_dir, online=True)
    try:
        trusted = client.refresh()
    except TrustError as error:
        fail(error.diagnostics(), EXIT_UNTRUSTED)
    finally:
        if transport is not None:
            transport.close()
    ctx.emit(trusted.to_dict(), _bundle_table(trusted))


@click.command("verify")
@click.option("--digest", "-d", "digest_text", required=True, help="Digest as sha256:HEX.")
@click.option("--signature", "signature_file", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Signature file: raw bytes (DER for ECDSA) or base64.")
@click.option("--key", "-k", "key_name", default=None, help="Only accept this key.")
@click.option("--offline", is_flag=True, help="Use the trusted state on disk; do not fetch.")
@ROOT_OPTION
@STATE_OPTION
@cluster_options
@handle_errors
def verify(*, ctx: Context, digest_text: str, signature_file: Path, key_name: str | None,
           offline: bool, root: Path | None, state_dir: Path | None) -> None:
    """Verify a signature over a digest against the trusted bundle (fetched first unless
    --offline). Exit 0: valid; 9: invalid, unknown key, revoked, disabled or destroyed
    version, or the bundle was refused; 7: no signer could be reached."""
    digest = Digest.parse(digest_text)
    raw = signature_file.read_bytes()
    signature = raw
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
        if decoded and raw.strip().isascii():
            signature = decoded
    except ValueError:
        pass  # not base64: raw bytes
    client, transport = trust_client(ctx, root, state_dir, online=not offline)
    try:
        if not offline:
            client.refresh()
        verified = client.verify_signature(digest, signature, key_name)
    except TrustError as error:
        fail(error.diagnostics(), EXIT_UNTRUSTED)
    finally:
        if transport is not None:
            transport.close()
    ctx.emit({"valid": True, "key": verified.key, "version": verified.version,
              "key_id": verified.key_id, "state": verified.state,
              "algorithm": verified.algorithm, "digest": str(digest)},
             f"valid: signed by key {verified.key} version {verified.version} "
             f"({verified.state}, key id {verified.key_id[:16]}…)")


@click.group()
def tuf() -> None:
    """Custodian tooling for the TUF root (offline; see docs/adr/0007-trust-bundles.md)."""


@tuf.command("custodian-key")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--algorithm", type=click.Choice(["ed25519", "ecdsa-p256"]), default="ed25519",
              show_default=True)
@handle_errors
def tuf_custodian_key(path: Path, algorithm: str) -> None:
    """Generate a custodian key file (PEM, mode 0600) and PATH.pub."""
    key = generate_custodian_key(path, algorithm)
    click.echo(f"wrote {path} (keep it offline) and {path}.pub; key id {key.keyid}")


def _online_keys(paths: tuple[Path, ...], cluster_path: Path | None) -> list[SSlibKey]:
    if paths:
        return [load_public_key(p) for p in paths]
    if cluster_path is None:
        fail("give --online-key PEM files, or --cluster to read them from etcd", EXIT_USAGE)
    keys = asyncio.run(_registered_online_keys(ClusterFile.load(cluster_path)))
    if not keys:
        fail("no online key is registered in the cluster yet; start a signer first")
    return [k.tuf_key() for k in keys]


def _etcd_config(cluster: ClusterFile) -> EtcdConfig:
    who = cluster.identity("etcd")
    return EtcdConfig(endpoints=cluster.etcd_endpoints, ca_file=cluster.ca,
                      cert_file=who.cert, key_file=who.key)


async def _registered_online_keys(cluster: ClusterFile) -> list[OnlineKey]:
    store = EtcdKeyStateStore(_etcd_config(cluster))
    try:
        return await TufRepositoryStore(store, store.layout).online_keys()
    finally:
        await store.close()


async def _store_root(cluster: ClusterFile, version: int, data: bytes) -> None:
    store = EtcdKeyStateStore(_etcd_config(cluster))
    try:
        await TufRepositoryStore(store, store.layout).store_root(version, data)
    finally:
        await store.close()


@tuf.command("init-root")
@click.option("--custodian-key", "custodian_keys", multiple=True, required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Custodian private key file (repeat); each one signs.")
@click.option("--threshold", type=click.IntRange(min=1), required=True)
@click.option("--online-key", "online_keys", multiple=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A region's online public key, PEM (repeat). Default: read from --cluster.")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), default=None)
@click.option("--expires-days", type=click.IntRange(min=1), default=365, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True)
@click.option("--store", is_flag=True, help="Also store it in the cluster's etcd.")
@handle_errors
def tuf_init_root(*, custodian_keys: tuple[Path, ...], threshold: int,
                  online_keys: tuple[Path, ...], cluster_path: Path | None,
                  expires_days: int, out_dir: Path, store: bool) -> None:
    """Sign root version 1 and write OUT/1.root.json."""
    signers = [load_custodian_signer(p) for p in custodian_keys]
    keys = _online_keys(online_keys, cluster_path)
    root = init_root(signers, threshold, keys,
                     expires=time.time() + expires_days * _DAY)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = root.to_bytes()
    (out_dir / "1.root.json").write_bytes(data)
    if store:
        if cluster_path is None:
            fail("--store needs --cluster", EXIT_USAGE)
        asyncio.run(_store_root(ClusterFile.load(cluster_path), 1, data))
    click.echo(f"wrote {out_dir / '1.root.json'}: {len(signers)} custodians, threshold "
               f"{threshold}, {len(keys)} online keys")


@tuf.command("rotate-root")
@click.option("--root", "root_file", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The current N.root.json.")
@click.option("--old-key", "old_keys", multiple=True, required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Current custodian private key (repeat; at least the current threshold).")
@click.option("--new-key", "new_keys", multiple=True, required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="New custodian private key (repeat; every new custodian signs).")
@click.option("--threshold", type=click.IntRange(min=1), required=True)
@click.option("--online-key", "online_keys", multiple=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path), default=None)
@click.option("--expires-days", type=click.IntRange(min=1), default=365, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True)
@click.option("--store", is_flag=True, help="Also store it in the cluster's etcd.")
@handle_errors
def tuf_rotate_root(*, root_file: Path, old_keys: tuple[Path, ...], new_keys: tuple[Path, ...],
                    threshold: int, online_keys: tuple[Path, ...], cluster_path: Path | None,
                    expires_days: int, out_dir: Path, store: bool) -> None:
    """Sign root version N+1 with the old and new custodians and write OUT/N+1.root.json."""
    current = Metadata[Root].from_bytes(root_file.read_bytes())
    keys = _online_keys(online_keys, cluster_path)
    new = rotate_root(current, [load_custodian_signer(p) for p in old_keys],
                      [load_custodian_signer(p) for p in new_keys], threshold,
                      keys, expires=time.time() + expires_days * _DAY)
    version = new.signed.version
    out_dir.mkdir(parents=True, exist_ok=True)
    data = new.to_bytes()
    (out_dir / f"{version}.root.json").write_bytes(data)
    if store:
        if cluster_path is None:
            fail("--store needs --cluster", EXIT_USAGE)
        asyncio.run(_store_root(ClusterFile.load(cluster_path), version, data))
    click.echo(f"wrote {out_dir / f'{version}.root.json'}: {len(new_keys)} custodians, "
               f"threshold {threshold}")


COMMANDS = (bundle, verify, tuf)
