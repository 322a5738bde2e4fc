"""``signet audit``: check a copy of a signer's audit log offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from kms.audit.checkpoint import Checkpoint
from kms.audit.errors import AuditVerificationError
from kms.audit.verify import (
    AuditReport,
    load_leaf_hashes,
    prove_inclusion,
    read_entry,
    verify_inclusion_proof,
    verify_log,
)
from signer.cli.common import EXIT_INVALID, fail

# Documented in docs/cli.md next to the codes in signer.cli.common.
EXIT_AUDIT_INVALID = 8


@click.group()
def audit() -> None:
    """Check audit logs offline."""


@audit.command("verify")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--public-key", "public_key_path", default=None,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="PEM of the checkpoint key you trust; every checkpoint must be signed by it.")
@click.option("--checkpoint", "checkpoint_paths", multiple=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A checkpoint JSON held elsewhere (e.g. the one anchored in etcd) that the "
                   "log must contain. Repeatable.")
@click.option("--require-signed", is_flag=True,
              help="Fail if entries follow the last checkpoint (use for a closed log).")
@click.option("--entry", "entry_index", type=click.IntRange(min=0), default=None,
              help="Also prove that entry N is included in the latest checkpoint.")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def verify(*, directory: Path, public_key_path: Path | None, checkpoint_paths: tuple[Path, ...],
           require_signed: bool, entry_index: int | None, output: str) -> None:
    """Verify the audit log copied to DIRECTORY: every entry, every checkpoint signature, and
    every checkpoint root. Exits 8 and names the place when anything does not hold."""
    public_key = public_key_path.read_bytes() if public_key_path is not None else None
    trusted = [_load_checkpoint(path) for path in checkpoint_paths]
    try:
        report = verify_log(directory, trusted_public_key_pem=public_key,
                            trusted_checkpoints=trusted, require_signed=require_signed)
        result: dict[str, Any] = report.to_dict()
        if entry_index is not None:
            result["inclusion"] = _prove_entry(directory, report, entry_index)
    except AuditVerificationError as error:
        fail(f"audit log invalid: {error.diagnostics()}", EXIT_AUDIT_INVALID)
    if output == "json":
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    signer = "a trusted key" if report.trusted_key else "the key each checkpoint names " \
        "(untrusted: pass --public-key)"
    lines = [
        f"audit log {report.log_id or '(no checkpoints yet)'} is valid",
        f"entries:     {report.entries} ({report.unsigned_entries} after the last checkpoint)",
        f"checkpoints: {report.checkpoints}, signed by {signer}",
        f"root:        {report.root_hash}",
    ]
    if "inclusion" in result:
        lines.append(f"entry {entry_index} is included in the checkpoint at tree size "
                     f"{result['inclusion']['tree_size']}")
    click.echo("\n".join(lines))


def _prove_entry(directory: Path, report: AuditReport, index: int) -> dict[str, Any]:
    """Prove and check that entry ``index`` is in the latest checkpoint; raises
    ``AuditVerificationError``."""
    last = report.last_checkpoint
    if last is None or index >= last.tree_size:
        problem = "is not covered by any checkpoint yet" if index < report.entries else (
            "does not exist")
        raise AuditVerificationError(f"entry {index}", problem)
    proof = prove_inclusion(load_leaf_hashes(directory), index, last)
    line = read_entry(directory, index)
    verify_inclusion_proof(proof, line, last)
    return {**proof.to_dict(), "root_hash": last.root_hash, "entry": json.loads(line)}


def _load_checkpoint(path: Path) -> Checkpoint:
    try:
        document = json.loads(path.read_bytes())
        if not isinstance(document, dict):
            raise TypeError("not a JSON object")  # noqa: TRY301 -- one message for all cases
        return Checkpoint.from_dict(document)
    except (TypeError, ValueError) as error:
        fail(f"{path} is not a checkpoint: {error}", EXIT_INVALID)
