"""The audit log fails closed on a really full disk, recovers when space returns, and its
checkpoints signed by a real HSM key verify with ``signet audit verify``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kms.audit.checkpoint import HsmCheckpointSigner, SoftwareCheckpointSigner
from kms.audit.errors import AuditUnavailable
from kms.audit.log import ENTRIES_FILE, AuditLog
from kms.audit.verify import load_checkpoints, verify_log
from kms.domain.keys import Algorithm
from kms.hsm.pkcs11 import Pkcs11Hsm
from kms.ports import SystemClock
from signer.cli.main import cli

pytestmark = pytest.mark.integration

LOG_ID = "eu-west/signer-1"


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full, as wanted
    finally:
        os.close(fd)


def entry(n: int) -> dict[str, object]:
    return {"kind": "sign", "identity": "spiffe://ci/pipeline", "key": "release",
            "digest": f"sha256:{n:064x}", "request_id": f"req-{n}"}


def test_full_disk_fails_closed_and_recovers(tiny_filesystem: Path) -> None:
    directory = tiny_filesystem / "audit"
    signer = SoftwareCheckpointSigner.generate()
    filler = tiny_filesystem / "filler"

    async def scenario() -> int:
        log = await AuditLog.open(directory, LOG_ID, signer=signer, clock=SystemClock(),
                                  checkpoint_every_entries=50)
        succeeded = failed = 0
        try:
            # Fill the disk behind the log's back, leaving a little room.
            fill(filler)
            with filler.open("r+b") as handle:
                handle.truncate(max(0, filler.stat().st_size - 8192))
            for round_number in range(40):
                results = await asyncio.gather(
                    *(log.append(entry(round_number * 10 + i)) for i in range(10)),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, int):
                        succeeded += 1
                    else:
                        assert isinstance(result, AuditUnavailable), result
                        assert "No space left on device" in str(result)
                        failed += 1
                # Invariant: every acknowledged append is a line, and nothing else is.
                assert len((directory / ENTRIES_FILE).read_bytes().splitlines()) == succeeded
            assert failed > 0, "the disk never filled up"
            # Take the last free pages too: now every append that needs a new page fails.
            # (Small ones may still fit in the slack of the file's last tmpfs page.)
            fill(tiny_filesystem / "filler-2")
            for _ in range(3):
                with pytest.raises(AuditUnavailable, match="No space left on device"):
                    await log.append({**entry(-1), "padding": "x" * 5000})
            assert log.failure is not None
            assert len((directory / ENTRIES_FILE).read_bytes().splitlines()) == succeeded

            # Free space: the very next append works and continues the dense indexes.
            filler.unlink()
            (tiny_filesystem / "filler-2").unlink()
            index = await log.append(entry(10_000))
            assert index == succeeded
            succeeded += 1
            assert log.failure is None
            assert len((directory / ENTRIES_FILE).read_bytes().splitlines()) == succeeded
        finally:
            await log.close()
        return succeeded

    succeeded = asyncio.run(scenario())
    report = verify_log(directory, trusted_public_key_pem=signer.public_key_pem,
                        require_signed=True)
    assert report.entries == succeeded


async def _hsm_signer(hsm: Pkcs11Hsm) -> HsmCheckpointSigner:
    pair = await hsm.generate_key_pair(
        label="audit-checkpoints", algorithm=Algorithm.ECDSA_P256_SHA256, extractable=False
    )
    return HsmCheckpointSigner(hsm, pair.hsm_id, Algorithm.ECDSA_P256_SHA256,
                               pair.public_key_der)


def test_hsm_signed_checkpoints_verify_with_the_cli(hsm: Pkcs11Hsm, tmp_path: Path) -> None:
    directory = tmp_path / "audit"

    async def scenario() -> str:
        signer = await _hsm_signer(hsm)
        log = await AuditLog.open(directory, LOG_ID, signer=signer, clock=SystemClock(),
                                  checkpoint_every_entries=100)
        try:
            for start in range(0, 250, 50):  # rounds, so the cadence fires at 100 and 200
                await asyncio.gather(*(log.append(entry(n)) for n in range(start, start + 50)))
        finally:
            await log.close()
        return signer.public_key_pem

    pem = asyncio.run(scenario())
    key_file = tmp_path / "audit.pem"
    key_file.write_text(pem)
    assert [c.tree_size for c in load_checkpoints(directory, pem)] == [100, 200, 250]

    result = CliRunner().invoke(cli, ["audit", "verify", str(directory), "--public-key",
                                      str(key_file), "--entry", "123", "--require-signed"])
    assert result.exit_code == 0, result.stderr
    assert f"audit log {LOG_ID} is valid" in result.stdout
    assert "entry 123 is included" in result.stdout

    # Edit one entry on disk: the same command now fails with exit code 8 and says where.
    lines = (directory / ENTRIES_FILE).read_bytes().splitlines()
    lines[42] = lines[42].replace(b"req-", b"REQ-")
    (directory / ENTRIES_FILE).write_bytes(b"".join(line + b"\n" for line in lines))
    result = CliRunner().invoke(cli, ["audit", "verify", str(directory), "--public-key",
                                      str(key_file)])
    assert result.exit_code == 8
    assert "audit log invalid: checkpoint 1" in result.stderr
    assert "index 0..99" in result.stderr


def test_hsm_signer_refuses_non_p256_keys(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="ed", algorithm=Algorithm.ED25519,
                                           extractable=False)
        with pytest.raises(ValueError, match="ecdsa-p256-sha256"):
            HsmCheckpointSigner(hsm, pair.hsm_id, Algorithm.ED25519, pair.public_key_der)

    asyncio.run(scenario())
    assert os.environ.get("SOFTHSM2_CONF")  # the fixture's token store was used
