"""The checked-in stubs must be exactly what `make proto` generates from proto/."""

from pathlib import Path

from signer.proto_gen import OUTPUT_DIR, generate


def test_generated_stubs_match_the_proto_files(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert written, "no .proto files were found"
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    checked_in = {p.relative_to(OUTPUT_DIR): p.read_text() for p in OUTPUT_DIR.rglob("*.py*")
                  if "__pycache__" not in p.parts}
    assert sorted(fresh) == sorted(checked_in), "stub files differ; run `make proto`"
    stale = [str(name) for name, text in fresh.items() if checked_in[name] != text]
    assert not stale, f"stubs are stale, run `make proto`: {stale}"
