"""RFC 9162 Merkle trees: known answers, a reference implementation, and broken proofs."""

from __future__ import annotations

import hashlib
import random

import pytest

from kms.audit.errors import AuditVerificationError
from kms.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# The certificate-transparency reference vectors (RFC 6962 test data, as used by CT's C++ and
# Go implementations): leaf inputs and the root of the first n of them.
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {  # (leaf index, tree size) -> audit path
    (0, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (5, 8): ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}
CT_CONSISTENCY = {  # (old size, new size) -> proof
    (1, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (6, 8): ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
    (2, 5): ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
}


# A straightforward transcription of RFC 9162 §2.1's recursive definitions, to compare with.
def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(data: list[bytes]) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = _k(len(data))
    return hashlib.sha256(b"\x01" + ref_mth(data[:k]) + ref_mth(data[k:])).digest()


def ref_path(m: int, data: list[bytes]) -> list[bytes]:
    if len(data) == 1:
        return []
    k = _k(len(data))
    if m < k:
        return [*ref_path(m, data[:k]), ref_mth(data[k:])]
    return [*ref_path(m - k, data[k:]), ref_mth(data[:k])]


def ref_subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    if m == len(data):
        return [] if complete else [ref_mth(data)]
    k = _k(len(data))
    if m <= k:
        return [*ref_subproof(m, data[:k], complete), ref_mth(data[k:])]
    return [*ref_subproof(m - k, data[k:], False), ref_mth(data[:k])]


def random_data(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]


def test_empty_tree_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == hashlib.sha256(b"").hexdigest() == CT_ROOTS[0]
    assert root_hash([]) == EMPTY_ROOT
    assert CompactRange().root() == EMPTY_ROOT


@pytest.mark.parametrize("size", range(len(CT_ROOTS)))
def test_known_roots(size: int) -> None:
    leaves = [leaf_hash(d) for d in CT_LEAVES[:size]]
    assert root_hash(leaves).hex() == CT_ROOTS[size]


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_known_inclusion_proofs(index: int, size: int) -> None:
    leaves = [leaf_hash(d) for d in CT_LEAVES[:size]]
    proof = inclusion_proof(leaves, index)
    assert [p.hex() for p in proof] == CT_INCLUSION[(index, size)]
    verify_inclusion(leaves[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("old", "new"), sorted(CT_CONSISTENCY))
def test_known_consistency_proofs(old: int, new: int) -> None:
    leaves = [leaf_hash(d) for d in CT_LEAVES[:new]]
    proof = consistency_proof(leaves, old)
    assert [p.hex() for p in proof] == CT_CONSISTENCY[(old, new)]
    verify_consistency(old, new, bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new]),
                       proof)


def test_compact_range_matches_reference_at_every_size() -> None:
    rng = random.Random(6962)
    data = random_data(rng, 300)
    compact = CompactRange()
    for n in range(len(data) + 1):
        assert compact.size == n
        assert compact.root() == ref_mth(data[:n]), n
        if n < len(data):
            compact.append(leaf_hash(data[n]))


def test_compact_range_memory_is_logarithmic() -> None:
    compact = CompactRange()
    for i in range(1023):
        compact.append(leaf_hash(i.to_bytes(4, "big")))
    # 1023 = 0b1111111111: ten perfect subtrees, no more.
    assert len(compact._subtrees) == 10
    compact.append(leaf_hash(b"x"))
    assert len(compact._subtrees) == 1


def test_proofs_match_reference_on_random_trees() -> None:
    rng = random.Random(9162)
    for n in [*range(1, 34), 100, 257]:
        data = random_data(rng, n)
        leaves = [leaf_hash(d) for d in data]
        root = ref_mth(data)
        for m in range(n):
            proof = inclusion_proof(leaves, m)
            assert proof == ref_path(m, data), (m, n)
            verify_inclusion(leaves[m], m, n, proof, root)
        for m in range(n + 1):
            proof = consistency_proof(leaves, m)
            expected = [] if m in (0, n) else ref_subproof(m, data, True)
            assert proof == expected, (m, n)
            verify_consistency(m, n, ref_mth(data[:m]), root, proof)


def test_tampered_inclusion_proofs_fail() -> None:
    rng = random.Random(1)
    data = random_data(rng, 13)
    leaves = [leaf_hash(d) for d in data]
    root = root_hash(leaves)
    proof = inclusion_proof(leaves, 6)
    for position in range(len(proof)):
        bad = list(proof)
        bad[position] = bytes([bad[position][0] ^ 1]) + bad[position][1:]
        with pytest.raises(AuditVerificationError, match="entry 6"):
            verify_inclusion(leaves[6], 6, 13, bad, root)
    cases = [
        (leaves[5], 6, 13, proof),  # another leaf
        (leaves[6], 7, 13, proof),  # another index
        # Another size whose tree has a different shape. (Sizes with the same shape, 13 and 14
        # here, cannot be told apart by hashes: the signed checkpoint authenticates the size.)
        (leaves[6], 6, 8, proof),
        (leaves[6], 6, 13, proof[:-1]),  # short proof
        (leaves[6], 6, 13, [*proof, proof[0]]),  # long proof
        (leaves[6], 13, 13, proof),  # index outside the tree
    ]
    for leaf, index, size, path in cases:
        with pytest.raises(AuditVerificationError):
            verify_inclusion(leaf, index, size, path, root)


def test_tampered_consistency_proofs_fail() -> None:
    rng = random.Random(2)
    data = random_data(rng, 21)
    leaves = [leaf_hash(d) for d in data]
    old_root, new_root = root_hash(leaves[:7]), root_hash(leaves)
    proof = consistency_proof(leaves, 7)
    verify_consistency(7, 21, old_root, new_root, proof)
    for position in range(len(proof)):
        bad = list(proof)
        bad[position] = bytes(32)
        with pytest.raises(AuditVerificationError, match="from tree size 7 to 21"):
            verify_consistency(7, 21, old_root, new_root, bad)
    forked = [*leaves[:3], leaf_hash(b"rewritten"), *leaves[4:]]
    cases = [
        (7, 21, old_root, root_hash(forked), proof),  # history rewritten after size 7
        (7, 21, root_hash(forked[:7]), new_root, proof),  # old root from another history
        (8, 21, old_root, new_root, proof),  # wrong old size
        (7, 21, old_root, new_root, []),  # empty proof
        (21, 7, new_root, old_root, proof),  # shrinking
        (7, 7, old_root, new_root, []),  # equal sizes, different roots
        (0, 21, old_root, new_root, []),  # the empty tree has a fixed root
    ]
    for old, new, a, b, path in cases:
        with pytest.raises(AuditVerificationError):
            verify_consistency(old, new, a, b, path)
