"""Offline verification of a copy of an audit log directory.

``verify_log`` re-reads ``entries.jsonl`` and ``checkpoints.jsonl``, recomputes the Merkle tree
and checks every checkpoint against it. It returns an ``AuditReport`` when everything holds and
otherwise raises ``AuditVerificationError`` naming the first place that is wrong. The proof
functions produce and check RFC 9162 inclusion proofs (entry N is in checkpoint C) and
consistency proofs (checkpoint A is a prefix of checkpoint B), e.g. against a checkpoint held
elsewhere (the one anchored in etcd).

Consistency between the checkpoints *inside* one directory follows from recomputing each of
their roots from the same entries; when an earlier checkpoint does not match but a later one
does, the report names the pair as inconsistent (history rewritten after it was signed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.audit.checkpoint import Checkpoint, canonical_json
from kms.audit.errors import AuditVerificationError
from kms.audit.log import CHECKPOINTS_FILE, ENTRIES_FILE
from kms.audit.merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)


@dataclass(frozen=True)
class AuditReport:
    """What a successful verification established."""

    log_id: str | None
    entries: int
    checkpoints: int
    root_hash: str  # hex root over all entries, signed or not
    last_checkpoint: Checkpoint | None
    trusted_key: bool  # checkpoints were checked against a key the caller trusts

    @property
    def unsigned_entries(self) -> int:
        """Entries after the last checkpoint: well formed, but no signature covers them yet."""
        covered = self.last_checkpoint.tree_size if self.last_checkpoint else 0
        return self.entries - covered

    def to_dict(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "root_hash": self.root_hash,
            "signed_tree_size": self.last_checkpoint.tree_size if self.last_checkpoint else 0,
            "signed_root_hash": self.last_checkpoint.root_hash if self.last_checkpoint else None,
            "unsigned_entries": self.unsigned_entries,
            "trusted_key": self.trusted_key,
        }


@dataclass(frozen=True)
class InclusionProof:
    """Entry ``index`` is leaf ``index`` of the tree of ``tree_size`` (RFC 9162 audit path)."""

    index: int
    tree_size: int
    path: tuple[bytes, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "tree_size": self.tree_size,
                "path": [node.hex() for node in self.path]}


@dataclass(frozen=True)
class ConsistencyProof:
    """The tree of ``old_size`` is a prefix of the tree of ``new_size`` (RFC 9162)."""

    old_size: int
    new_size: int
    path: tuple[bytes, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"old_size": self.old_size, "new_size": self.new_size,
                "path": [node.hex() for node in self.path]}


@dataclass
class _Expected:
    """A checkpoint the entries must match, and how to name it in a message."""

    checkpoint: Checkpoint
    label: str
    previous_size: int = 0
    matched: bool | None = None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without newline); raises on an unterminated last line."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditVerificationError(
                    f"{path.name} line {number}", "the last line is unterminated (a torn write)"
                )
            yield number, raw[:-1]


def load_checkpoints(
    directory: str | Path, trusted_public_key_pem: str | bytes | None = None
) -> list[Checkpoint]:
    """Parse and signature-check every checkpoint in ``directory``, and check that they belong
    to one log and move forward. Raises ``AuditVerificationError``."""
    path = Path(directory) / CHECKPOINTS_FILE
    checkpoints: list[Checkpoint] = []
    for number, line in _lines(path):
        where = f"{CHECKPOINTS_FILE} line {number}"
        try:
            checkpoint = Checkpoint.from_line(line)
        except (TypeError, ValueError) as error:
            raise AuditVerificationError(where, f"not a valid checkpoint: {error}") from None
        where = f"{where} (checkpoint at tree size {checkpoint.tree_size})"
        try:
            checkpoint.verify(trusted_public_key_pem)
        except AuditVerificationError as error:
            raise AuditVerificationError(where, error.problem) from None
        if checkpoints:
            previous = checkpoints[-1]
            if checkpoint.log_id != previous.log_id:
                raise AuditVerificationError(
                    where,
                    f"belongs to log {checkpoint.log_id!r}, the others to {previous.log_id!r}",
                )
            if checkpoint.tree_size < previous.tree_size or checkpoint.time < previous.time:
                raise AuditVerificationError(
                    where, f"goes backwards: the previous checkpoint had tree size "
                    f"{previous.tree_size} at {previous.time}, this one {checkpoint.tree_size} at "
                    f"{checkpoint.time}"
                )
            if checkpoint.tree_size == previous.tree_size and checkpoint.root != previous.root:
                raise AuditVerificationError(
                    where, "has the same tree size as the previous checkpoint but another root: "
                    "the log was forked"
                )
        checkpoints.append(checkpoint)
    return checkpoints


def _check_entry(line: bytes, number: int) -> None:
    where = f"{ENTRIES_FILE} line {number}"
    try:
        document = json.loads(line)
    except ValueError as error:
        raise AuditVerificationError(where, f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise AuditVerificationError(where, "not a JSON object")
    try:
        canonical = canonical_json(document)
    except ValueError as error:
        raise AuditVerificationError(where, f"not canonical JSON ({error})") from None
    if canonical != line:
        raise AuditVerificationError(
            where, "not canonical JSON (sorted keys, no spaces, UTF-8): it was rewritten"
        )
    index = document.get("index")
    if index != number - 1:
        raise AuditVerificationError(
            f"{where} (entry {index})",
            f"index {index!r} where {number - 1} was expected: an entry was removed, inserted or "
            "moved",
        )
    if not isinstance(document.get("kind"), str) or not isinstance(document.get("time"), str):
        raise AuditVerificationError(f"{where} (entry {index})", "kind and time must be strings")


def verify_log(
    directory: str | Path,
    *,
    trusted_public_key_pem: str | bytes | None = None,
    trusted_checkpoints: Sequence[Checkpoint] = (),
    require_signed: bool = False,
) -> AuditReport:
    """Verify a copy of a log directory end to end: every line well formed and canonical,
    indexes dense from 0, every checkpoint correctly signed (by ``trusted_public_key_pem``
    when given), moving forward, and matching the root recomputed from the entries it covers.
    ``trusted_checkpoints`` (e.g. the one anchored in etcd; signatures checked the same way)
    must match too, which catches a copy cut back together with its checkpoints file.
    Entries after the last checkpoint are well formed but unsigned (a live log writes them
    before its next checkpoint); ``require_signed`` refuses them, for a log that was closed.
    Returns an ``AuditReport``; raises ``AuditVerificationError`` naming the first problem."""
    directory = Path(directory)
    if not (directory / ENTRIES_FILE).is_file():
        raise AuditVerificationError(str(directory), f"no {ENTRIES_FILE} in this directory")
    checkpoints = load_checkpoints(directory, trusted_public_key_pem)
    expected = _expectations(checkpoints, trusted_checkpoints, trusted_public_key_pem)
    by_size: dict[int, list[_Expected]] = {}
    for item in expected:
        by_size.setdefault(item.checkpoint.tree_size, []).append(item)

    tree = CompactRange()
    mismatch: _Expected | None = None
    for item in by_size.get(0, []):
        mismatch = _compare(tree, item, mismatch)
    try:
        for number, line in _lines(directory / ENTRIES_FILE):
            _check_entry(line, number)
            tree.append(leaf_hash(line))
            for item in by_size.get(tree.size, []):
                mismatch = _compare(tree, item, mismatch)
    except AuditVerificationError:
        if mismatch is not None:
            _raise_mismatch(mismatch, expected)
        raise
    if mismatch is not None:
        _raise_mismatch(mismatch, expected)
    for item in expected:
        if item.checkpoint.tree_size > tree.size:
            raise AuditVerificationError(
                item.label,
                f"covers {item.checkpoint.tree_size} entries but only {tree.size} are present: "
                f"entries {tree.size}..{item.checkpoint.tree_size - 1} were cut off (truncated)",
            )
    last = checkpoints[-1] if checkpoints else None
    signed = max((item.checkpoint.tree_size for item in expected), default=0)
    if require_signed and signed < tree.size:
        raise AuditVerificationError(
            f"{ENTRIES_FILE} lines {signed + 1}..{tree.size}",
            f"entries {signed}..{tree.size - 1} are not covered by any checkpoint (appended "
            "after the last one was signed)",
        )
    return AuditReport(
        log_id=last.log_id if last else None,
        entries=tree.size,
        checkpoints=len(checkpoints),
        root_hash=tree.root().hex(),
        last_checkpoint=last,
        trusted_key=trusted_public_key_pem is not None,
    )


def _expectations(
    checkpoints: Sequence[Checkpoint],
    trusted_checkpoints: Sequence[Checkpoint],
    trusted_public_key_pem: str | bytes | None,
) -> list[_Expected]:
    """Every checkpoint the entries must match, with the name to use for it in messages."""
    expected: list[_Expected] = []
    previous_size = 0
    for number, checkpoint in enumerate(checkpoints, start=1):
        label = (f"checkpoint {number} ({CHECKPOINTS_FILE} line {number}, tree size "
                 f"{checkpoint.tree_size})")
        expected.append(_Expected(checkpoint, label, previous_size))
        previous_size = checkpoint.tree_size
    for number, checkpoint in enumerate(trusted_checkpoints, start=1):
        where = f"trusted checkpoint {number} (tree size {checkpoint.tree_size})"
        try:
            checkpoint.verify(trusted_public_key_pem)
        except AuditVerificationError as error:
            raise AuditVerificationError(where, error.problem) from None
        if checkpoints and checkpoint.log_id != checkpoints[0].log_id:
            raise AuditVerificationError(where, f"is for log {checkpoint.log_id!r}")
        expected.append(_Expected(checkpoint, where))
    return expected


def _compare(tree: CompactRange, item: _Expected, mismatch: _Expected | None) -> _Expected | None:
    item.matched = tree.root() == item.checkpoint.root
    if not item.matched and mismatch is None:
        return item
    return mismatch


def _raise_mismatch(mismatch: _Expected, expected: Sequence[_Expected]) -> None:
    size = mismatch.checkpoint.tree_size
    later = [e for e in expected if e.matched and e.checkpoint.tree_size > size]
    if later:
        raise AuditVerificationError(
            mismatch.label,
            f"is not consistent with {later[0].label}, which matches the entries: the first "
            f"{size} entries were rewritten after this checkpoint was signed",
        )
    raise AuditVerificationError(
        mismatch.label,
        f"root hash {mismatch.checkpoint.root_hash[:16]}… does not match the entries: an entry "
        f"with index {mismatch.previous_size}..{size - 1} was edited, removed, inserted or "
        "reordered after it was signed",
    )


def load_leaf_hashes(directory: str | Path) -> list[bytes]:
    """The leaf hash of every entry line, in order (for proofs). Raises
    ``AuditVerificationError`` on an unterminated last line."""
    return [leaf_hash(line) for _, line in _lines(Path(directory) / ENTRIES_FILE)]


def read_entry(directory: str | Path, index: int) -> bytes:
    """The stored line of entry ``index`` (without newline). Raises ``AuditVerificationError``
    when there is no such line."""
    for number, line in _lines(Path(directory) / ENTRIES_FILE):
        if number - 1 == index:
            return line
    raise AuditVerificationError(f"entry {index}", "no such entry in this copy of the log")


def prove_inclusion(leaves: Sequence[bytes], index: int, checkpoint: Checkpoint) -> InclusionProof:
    """The inclusion proof of entry ``index`` in ``checkpoint``'s tree, built from ``leaves``
    (``load_leaf_hashes``). Raises ``AuditVerificationError`` when the checkpoint does not
    cover the entry or the leaves do not match the checkpoint."""
    if not 0 <= index < checkpoint.tree_size:
        raise AuditVerificationError(
            f"entry {index}", f"not covered by the checkpoint at tree size {checkpoint.tree_size}"
        )
    if checkpoint.tree_size > len(leaves):
        raise AuditVerificationError(
            f"checkpoint at tree size {checkpoint.tree_size}", f"only {len(leaves)} entries exist"
        )
    prefix = leaves[: checkpoint.tree_size]
    proof = InclusionProof(index, checkpoint.tree_size, tuple(inclusion_proof(prefix, index)))
    verify_inclusion(prefix[index], index, proof.tree_size, proof.path, checkpoint.root)
    return proof


def verify_inclusion_proof(
    proof: InclusionProof, entry_line: bytes, checkpoint: Checkpoint
) -> None:
    """Check that ``entry_line`` (the stored line, without newline) is entry ``proof.index``
    of ``checkpoint``'s tree. Check the checkpoint's signature first (``Checkpoint.verify``).
    Returns nothing; raises ``AuditVerificationError``."""
    where = f"entry {proof.index}"
    if proof.tree_size != checkpoint.tree_size:
        raise AuditVerificationError(
            where, f"the proof is for tree size {proof.tree_size}, the checkpoint has "
            f"{checkpoint.tree_size}"
        )
    try:
        index = json.loads(entry_line).get("index")
    except (ValueError, AttributeError):
        index = None
    if index != proof.index:
        raise AuditVerificationError(where, f"the entry line carries index {index!r}")
    leaf = leaf_hash(entry_line)
    verify_inclusion(leaf, proof.index, proof.tree_size, proof.path, checkpoint.root)


def prove_consistency(
    leaves: Sequence[bytes], old: Checkpoint, new: Checkpoint
) -> ConsistencyProof:
    """The consistency proof from checkpoint ``old`` to ``new``, built from ``leaves``. Raises
    ``AuditVerificationError`` when the leaves do not cover ``new`` or the proof fails."""
    if new.tree_size > len(leaves) or old.tree_size > new.tree_size:
        raise AuditVerificationError(
            f"checkpoints at tree sizes {old.tree_size} and {new.tree_size}",
            f"cannot be proven from {len(leaves)} entries",
        )
    path = consistency_proof(leaves[: new.tree_size], old.tree_size)
    proof = ConsistencyProof(old.tree_size, new.tree_size, tuple(path))
    verify_consistency_proof(proof, old, new)
    return proof


def verify_consistency_proof(proof: ConsistencyProof, old: Checkpoint, new: Checkpoint) -> None:
    """Check that checkpoint ``old``'s tree is a prefix of checkpoint ``new``'s. Check both
    signatures first. Returns nothing; raises ``AuditVerificationError``."""
    if (proof.old_size, proof.new_size) != (old.tree_size, new.tree_size):
        raise AuditVerificationError(
            f"consistency proof from tree size {proof.old_size} to {proof.new_size}",
            f"does not fit checkpoints at tree sizes {old.tree_size} and {new.tree_size}",
        )
    if old.log_id != new.log_id:
        raise AuditVerificationError("consistency proof", "the checkpoints are of different logs")
    verify_consistency(old.tree_size, new.tree_size, old.root, new.root, proof.path)
