"""Offline verification: every kind of tampering is caught and named; proofs; the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from kms.audit.checkpoint import Checkpoint, SoftwareCheckpointSigner, sign_checkpoint
from kms.audit.errors import AuditVerificationError
from kms.audit.log import CHECKPOINTS_FILE, ENTRIES_FILE, AuditLog
from kms.audit.merkle import leaf_hash, root_hash
from kms.audit.verify import (
    ConsistencyProof,
    InclusionProof,
    load_checkpoints,
    load_leaf_hashes,
    prove_consistency,
    prove_inclusion,
    read_entry,
    verify_consistency_proof,
    verify_inclusion_proof,
    verify_log,
)
from kms.ports import SystemClock
from signer.cli.main import cli

LOG_ID = "eu-west/signer-1"
SIGNER = SoftwareCheckpointSigner.generate()
ATTACKER = SoftwareCheckpointSigner.generate()
ENTRIES = 20  # checkpoints at tree sizes 5, 10, 15, 20


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("audit")

    async def write() -> None:
        log = await AuditLog.open(directory, LOG_ID, signer=SIGNER, clock=SystemClock(),
                                  checkpoint_every_entries=5)
        try:
            for n in range(ENTRIES):
                await log.record_signature(
                    identity="spiffe://ci/pipeline", key="release", version=1,
                    key_id="ab" * 32, digest=f"sha256:{n:064x}", request_id=f"req-{n}",
                    revision=100 + n, region="eu-west",
                )
        finally:
            await log.close()

    asyncio.run(write())
    return directory


@pytest.fixture
def log_copy(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(pristine, copy)
    return copy


# -- helpers that tamper with a copy ---------------------------------------------------------

def lines_of(directory: Path, name: str) -> list[bytes]:
    return (directory / name).read_bytes().splitlines()


def write_lines(directory: Path, name: str, lines: list[bytes]) -> None:
    (directory / name).write_bytes(b"".join(line + b"\n" for line in lines))


def canonical(document: dict[str, object]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def edit_entry(directory: Path, index: int, **changes: object) -> None:
    lines = lines_of(directory, ENTRIES_FILE)
    lines[index] = canonical({**json.loads(lines[index]), **changes})
    write_lines(directory, ENTRIES_FILE, lines)


def edit_checkpoint(directory: Path, number: int, **changes: object) -> None:
    lines = lines_of(directory, CHECKPOINTS_FILE)
    lines[number - 1] = canonical({**json.loads(lines[number - 1]), **changes})
    write_lines(directory, CHECKPOINTS_FILE, lines)


def resign_checkpoints(directory: Path, signer: SoftwareCheckpointSigner, first: int) -> None:
    """Recompute and re-sign checkpoints ``first``.. over the (edited) entries."""
    leaves = load_leaf_hashes(directory)
    lines = lines_of(directory, CHECKPOINTS_FILE)
    for position in range(first - 1, len(lines)):
        old = Checkpoint.from_line(lines[position])
        new = asyncio.run(sign_checkpoint(signer, old.log_id, old.tree_size,
                                          root_hash(leaves[: old.tree_size]), old.time))
        lines[position] = new.to_line()
    write_lines(directory, CHECKPOINTS_FILE, lines)


def delete_entry(d: Path) -> None:
    lines = lines_of(d, ENTRIES_FILE)
    del lines[7]
    write_lines(d, ENTRIES_FILE, lines)


def swap_entries(d: Path) -> None:
    lines = lines_of(d, ENTRIES_FILE)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(d, ENTRIES_FILE, lines)


def truncate_entries(d: Path) -> None:
    write_lines(d, ENTRIES_FILE, lines_of(d, ENTRIES_FILE)[:17])


def append_duplicate(d: Path) -> None:
    lines = lines_of(d, ENTRIES_FILE)
    write_lines(d, ENTRIES_FILE, [*lines, lines[-1]])


def insert_forged(d: Path) -> None:
    lines = lines_of(d, ENTRIES_FILE)
    forged = canonical({**json.loads(lines[4]), "request_id": "forged"})
    write_lines(d, ENTRIES_FILE, [*lines[:5], forged, *lines[5:]])


def non_canonical(d: Path) -> None:
    lines = lines_of(d, ENTRIES_FILE)
    lines[11] = json.dumps(json.loads(lines[11]), sort_keys=True).encode()  # with spaces
    write_lines(d, ENTRIES_FILE, lines)


def torn_tail(d: Path) -> None:
    with (d / ENTRIES_FILE).open("ab") as handle:
        handle.write(b'{"index":20,')


def swap_signature(d: Path) -> None:
    first = json.loads(lines_of(d, CHECKPOINTS_FILE)[0])
    edit_checkpoint(d, 2, signature=first["signature"])


def reorder_checkpoints(d: Path) -> None:
    lines = lines_of(d, CHECKPOINTS_FILE)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(d, CHECKPOINTS_FILE, lines)


def rewrite_and_resign_later(d: Path) -> None:
    # Someone with the real key rewrites entry 7 and re-signs the checkpoints from 3 on.
    edit_entry(d, 7, digest="sha256:" + "ee" * 32)
    resign_checkpoints(d, SIGNER, first=3)


def rewrite_and_resign_all(d: Path) -> None:
    edit_entry(d, 7, digest="sha256:" + "ee" * 32)
    resign_checkpoints(d, ATTACKER, first=1)


TAMPERING: list[tuple[str, Callable[[Path], None], str]] = [
    ("edit entry field", lambda d: edit_entry(d, 7, identity="spiffe://ci/attacker"),
     r"checkpoint 2 \(checkpoints.jsonl line 2, tree size 10\): .* index 5..9 was edited"),
    ("delete one line", delete_entry,
     r"entries.jsonl line 8 \(entry 8\): index 8 where 7 was expected"),
    ("swap two lines", swap_entries,
     r"entries.jsonl line 3 \(entry 3\): index 3 where 2 was expected"),
    ("truncate last lines", truncate_entries,
     r"checkpoint 4 .*tree size 20\): covers 20 entries but only 17 .*truncated"),
    ("append duplicate line", append_duplicate,
     r"entries.jsonl line 21 \(entry 19\): index 19 where 20 was expected"),
    ("insert forged line", insert_forged,
     r"entries.jsonl line 6 \(entry 4\): index 4 where 5 was expected"),
    ("non-canonical line", non_canonical, r"entries.jsonl line 12: not canonical JSON"),
    ("torn last line", torn_tail, r"entries.jsonl line 21: the last line is unterminated"),
    ("edit checkpoint root", lambda d: edit_checkpoint(d, 2, root_hash="00" * 32),
     r"checkpoints.jsonl line 2 \(checkpoint at tree size 10\): the signature does not verify"),
    ("swap checkpoint signature", swap_signature,
     r"checkpoints.jsonl line 2 \(checkpoint at tree size 10\): the signature does not verify"),
    ("checkpoint size grows", lambda d: edit_checkpoint(d, 1, tree_size=6),
     r"checkpoints.jsonl line 1 \(checkpoint at tree size 6\): the signature does not verify"),
    ("reorder checkpoints", reorder_checkpoints,
     r"checkpoints.jsonl line 3 \(checkpoint at tree size 10\): goes backwards"),
    ("rewritten after signing", rewrite_and_resign_later,
     r"checkpoint 2 .*: is not consistent with checkpoint 3 .*rewritten after"),
    ("re-signed by another key", rewrite_and_resign_all,
     r"checkpoints.jsonl line 1 \(checkpoint at tree size 5\): signed by key .*not the trusted"),
]


def test_intact_log_verifies(pristine: Path) -> None:
    report = verify_log(pristine, trusted_public_key_pem=SIGNER.public_key_pem,
                        require_signed=True)
    assert report.log_id == LOG_ID
    assert (report.entries, report.checkpoints, report.unsigned_entries) == (ENTRIES, 4, 0)
    assert report.root_hash == root_hash(load_leaf_hashes(pristine)).hex()
    assert report.last_checkpoint is not None
    assert report.last_checkpoint.root_hash == report.root_hash


@pytest.mark.parametrize(("tamper", "message"), [(t, m) for _, t, m in TAMPERING],
                         ids=[name for name, _, _ in TAMPERING])
def test_tampering_is_caught_and_located(
    log_copy: Path, tamper: Callable[[Path], None], message: str
) -> None:
    tamper(log_copy)
    with pytest.raises(AuditVerificationError, match=message):
        verify_log(log_copy, trusted_public_key_pem=SIGNER.public_key_pem)


def test_wrong_trusted_key_is_refused(pristine: Path) -> None:
    with pytest.raises(AuditVerificationError,
                       match=r"checkpoints.jsonl line 1 .*not the trusted key"):
        verify_log(pristine, trusted_public_key_pem=ATTACKER.public_key_pem)


def test_without_trusted_key_only_accidents_are_caught(log_copy: Path) -> None:
    # Documented limit: a consistent rewrite under another key passes without --public-key,
    # and is caught with it (see the table above).
    rewrite_and_resign_all(log_copy)
    assert verify_log(log_copy).entries == ENTRIES


def test_truncating_entries_and_checkpoints_together_needs_an_anchor(
    log_copy: Path, pristine: Path
) -> None:
    anchored = load_checkpoints(pristine)[-1]  # what etcd holds
    write_lines(log_copy, ENTRIES_FILE, lines_of(log_copy, ENTRIES_FILE)[:15])
    write_lines(log_copy, CHECKPOINTS_FILE, lines_of(log_copy, CHECKPOINTS_FILE)[:3])
    verify_log(log_copy, trusted_public_key_pem=SIGNER.public_key_pem)  # looks whole
    with pytest.raises(AuditVerificationError, match=r"trusted checkpoint 1 .*truncated"):
        verify_log(log_copy, trusted_public_key_pem=SIGNER.public_key_pem,
                   trusted_checkpoints=[anchored])


def test_unsigned_tail_is_reported_and_refused_on_request(log_copy: Path) -> None:
    lines = lines_of(log_copy, ENTRIES_FILE)
    extra = canonical({**json.loads(lines[-1]), "index": ENTRIES})
    write_lines(log_copy, ENTRIES_FILE, [*lines, extra])
    assert verify_log(log_copy).unsigned_entries == 1
    with pytest.raises(AuditVerificationError, match=r"entries 20\.\.20 are not covered"):
        verify_log(log_copy, require_signed=True)


def test_inclusion_proofs(pristine: Path) -> None:
    leaves = load_leaf_hashes(pristine)
    checkpoints = load_checkpoints(pristine, SIGNER.public_key_pem)
    for checkpoint in checkpoints:
        for index in range(checkpoint.tree_size):
            proof = prove_inclusion(leaves, index, checkpoint)
            verify_inclusion_proof(proof, read_entry(pristine, index), checkpoint)
    last = checkpoints[-1]
    proof = prove_inclusion(leaves, 7, last)
    line = read_entry(pristine, 7)
    edited = line.replace(b"req-7", b"req-X")
    with pytest.raises(AuditVerificationError, match="inclusion proof for entry 7"):
        verify_inclusion_proof(proof, edited, last)
    with pytest.raises(AuditVerificationError, match="carries index 8"):
        verify_inclusion_proof(proof, read_entry(pristine, 8), last)
    bent = InclusionProof(7, proof.tree_size, (bytes(32), *proof.path[1:]))
    with pytest.raises(AuditVerificationError, match="entry 7"):
        verify_inclusion_proof(bent, line, last)
    with pytest.raises(AuditVerificationError, match="tree size 20, the checkpoint has 10"):
        verify_inclusion_proof(proof, line, checkpoints[1])
    with pytest.raises(AuditVerificationError, match="not covered"):
        prove_inclusion(leaves, 12, checkpoints[1])


def test_consistency_proofs(pristine: Path) -> None:
    leaves = load_leaf_hashes(pristine)
    checkpoints = load_checkpoints(pristine, SIGNER.public_key_pem)
    for old in checkpoints:
        for new in checkpoints:
            if old.tree_size <= new.tree_size:
                verify_consistency_proof(prove_consistency(leaves, old, new), old, new)
    first, last = checkpoints[0], checkpoints[-1]
    proof = prove_consistency(leaves, first, last)
    bent = ConsistencyProof(proof.old_size, proof.new_size, (bytes(32), *proof.path[1:]))
    with pytest.raises(AuditVerificationError, match="consistency proof from tree size 5 to 20"):
        verify_consistency_proof(bent, first, last)
    # A checkpoint of a forked history (entry 2 differs) is not consistent with the real one.
    forked_leaves = [*leaves[:2], leaf_hash(b"forked"), *leaves[3:]]
    forked = asyncio.run(sign_checkpoint(SIGNER, LOG_ID, 20, root_hash(forked_leaves),
                                         last.time))
    with pytest.raises(AuditVerificationError, match="new root"):
        verify_consistency_proof(proof, first, forked)
    with pytest.raises(AuditVerificationError, match="does not fit"):
        verify_consistency_proof(proof, checkpoints[1], last)


def test_checkpoint_signature_covers_the_documented_message(pristine: Path) -> None:
    checkpoint = load_checkpoints(pristine)[0]
    root_b64 = base64.b64encode(checkpoint.root).decode()
    assert checkpoint.message() == (
        f"signet-audit-checkpoint/v1\n{LOG_ID}\n5\n{root_b64}\n{checkpoint.time}\n"
    ).encode()


# -- the CLI ---------------------------------------------------------------------------------

def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["audit", "verify", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_valid_log(pristine: Path, tmp_path: Path) -> None:
    key = tmp_path / "audit.pem"
    key.write_text(SIGNER.public_key_pem)
    code, out, _ = run_cli(str(pristine), "--public-key", str(key))
    assert code == 0
    assert f"audit log {LOG_ID} is valid" in out
    code, out, _ = run_cli(str(pristine), "--public-key", str(key), "--entry", "7",
                           "--output", "json")
    assert code == 0
    document = json.loads(out)
    assert document["entries"] == ENTRIES
    assert document["inclusion"]["index"] == 7
    assert document["inclusion"]["entry"]["request_id"] == "req-7"


def test_cli_anchor_checkpoint(pristine: Path, tmp_path: Path) -> None:
    anchored = tmp_path / "anchor.json"
    anchored.write_bytes(load_checkpoints(pristine)[-1].to_line())
    code, _, _ = run_cli(str(pristine), "--checkpoint", str(anchored))
    assert code == 0


def test_cli_tampered_log_exits_8_naming_the_place(log_copy: Path, tmp_path: Path) -> None:
    key = tmp_path / "audit.pem"
    key.write_text(SIGNER.public_key_pem)
    delete_entry(log_copy)
    code, out, err = run_cli(str(log_copy), "--public-key", str(key))
    assert code == 8
    assert out == ""
    assert err.strip().splitlines() == [
        "signet: error: audit log invalid: entries.jsonl line 8 (entry 8): index 8 where 7 "
        "was expected: an entry was removed, inserted or moved"
    ]


def test_cli_wrong_key_and_uncovered_entry_exit_8(pristine: Path, tmp_path: Path) -> None:
    key = tmp_path / "other.pem"
    key.write_text(ATTACKER.public_key_pem)
    code, _, err = run_cli(str(pristine), "--public-key", str(key))
    assert code == 8
    assert "not the trusted key" in err
    code, _, err = run_cli(str(pristine), "--entry", "20")
    assert code == 8
    assert "entry 20: does not exist" in err
