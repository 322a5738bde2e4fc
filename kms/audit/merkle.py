"""Merkle tree hashing, inclusion and consistency proofs exactly as RFC 9162 §2.1 (RFC 6962 §2.1).

Pure functions over bytes; no I/O. Leaves are hashed as ``SHA-256(0x00 ‖ data)`` and interior
nodes as ``SHA-256(0x01 ‖ left ‖ right)``; the empty tree's hash is ``SHA-256("")``. The tree over
``n`` leaves splits at the largest power of two smaller than ``n``.

``CompactRange`` keeps the O(log n) frontier of an append-only tree (one hash per set bit of its
size), which is all an appender needs to know the current root. Proof *generation* needs the leaf
hashes and is for the offline verifier; proof *verification* needs only the proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from kms.audit.errors import AuditVerificationError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 ‖ data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n`` ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """The right frontier of an append-only Merkle tree: the roots of the perfect subtrees
    that make up the first ``size`` leaves, largest (leftmost) first. O(log n) memory."""

    __slots__ = ("_size", "_subtrees")

    def __init__(self) -> None:
        self._size = 0
        self._subtrees: list[bytes] = []

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def copy(self) -> CompactRange:
        """An independent copy (to try appends that may be rolled back)."""
        other = CompactRange()
        other._size = self._size
        other._subtrees = list(self._subtrees)
        return other

    def append(self, leaf: bytes) -> None:
        """Append one leaf *hash* (see ``leaf_hash``)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf)}")
        node = leaf
        size = self._size
        # Every trailing 1 bit of the old size is a perfect subtree the new leaf completes.
        while size & 1:
            node = node_hash(self._subtrees.pop(), node)
            size >>= 1
        self._subtrees.append(node)
        self._size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        """MTH of the leaves so far (``EMPTY_ROOT`` for none)."""
        if not self._subtrees:
            return EMPTY_ROOT
        # RFC 9162 splits at the largest power of two, so the root folds the perfect
        # subtrees from the right.
        node = self._subtrees[-1]
        for left in reversed(self._subtrees[:-1]):
            node = node_hash(left, node)
        return node


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH over ``leaves`` (leaf hashes, not data)."""
    compact = CompactRange()
    compact.extend(leaves)
    return compact.root()


def _subtree_root(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    compact = CompactRange()
    for index in range(start, end):
        compact.append(leaves[index])
    return compact.root()


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(index, leaves): the audit path of leaf ``index`` in the tree of
    all ``leaves`` (leaf hashes). Raises ``ValueError`` if ``index`` is out of range."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of size {len(leaves)}")
    path: list[bytes] = []
    start, end, m = 0, len(leaves), index
    # Iterative form of the recursive PATH: walk down, collecting siblings, then reverse so
    # the path runs leaf-to-root.
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if m < k:
            path.append(_subtree_root(leaves, start + k, end))
            end = start + k
        else:
            path.append(_subtree_root(leaves, start, start + k))
            start, m = start + k, m - k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(old_size, leaves): proves the tree of the first ``old_size``
    leaves is a prefix of the tree of all ``leaves``. Empty when ``old_size`` is 0 or equals
    the size. Raises ``ValueError`` if ``old_size`` is larger than the tree."""
    if not 0 <= old_size <= len(leaves):
        raise ValueError(f"old size {old_size} is not within a tree of size {len(leaves)}")
    if old_size in (0, len(leaves)):
        return []
    proof: list[bytes] = []
    start, end, m, complete = 0, len(leaves), old_size, True
    while True:
        if m == end - start:
            if not complete:
                proof.append(_subtree_root(leaves, start, end))
            break
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            proof.append(_subtree_root(leaves, start + k, end))
            end = start + k
        else:
            proof.append(_subtree_root(leaves, start, start + k))
            start, m, complete = start + k, m - k, False
    proof.reverse()
    return proof


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` (a leaf hash) is leaf ``index`` of the tree of ``tree_size`` whose
    root is ``root``, by RFC 9162 §2.1.3.2. Returns nothing; raises ``AuditVerificationError``
    naming what did not match."""
    where = f"inclusion proof for entry {index} in tree size {tree_size}"
    if not 0 <= index < tree_size:
        raise AuditVerificationError(where, "the entry index is outside the tree")
    if any(len(node) != HASH_SIZE for node in proof):
        raise AuditVerificationError(where, f"every proof hash must be {HASH_SIZE} bytes")
    fn, sn, node = index, tree_size - 1, leaf
    for sibling in proof:
        if sn == 0:
            raise AuditVerificationError(where, "the proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise AuditVerificationError(where, "the proof is shorter than the tree is deep")
    if node != root:
        raise AuditVerificationError(
            where, f"the proof leads to root {node.hex()}, not the expected {root.hex()}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``old_size`` with ``old_root`` is a prefix of the tree of
    ``new_size`` with ``new_root``, by RFC 9162 §2.1.4.2. Returns nothing; raises
    ``AuditVerificationError`` naming what did not match."""
    where = f"consistency proof from tree size {old_size} to {new_size}"
    if not 0 <= old_size <= new_size:
        raise AuditVerificationError(where, "the old tree is larger than the new one")
    if any(len(node) != HASH_SIZE for node in proof):
        raise AuditVerificationError(where, f"every proof hash must be {HASH_SIZE} bytes")
    if old_size == 0:
        # Every tree extends the empty tree; only the empty root itself can be wrong.
        if old_root != EMPTY_ROOT or proof:
            raise AuditVerificationError(where, "the empty tree has no proof and root SHA-256('')")
        return
    if old_size == new_size:
        if proof or old_root != new_root:
            raise AuditVerificationError(
                where, "trees of equal size must have equal roots and an empty proof"
            )
        return
    if not proof:
        raise AuditVerificationError(where, "the proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    first, second = _consistency_roots(old_size, new_size, path, where)
    if first != old_root:
        raise AuditVerificationError(
            where, f"the proof leads to old root {first.hex()}, not {old_root.hex()}"
        )
    if second != new_root:
        raise AuditVerificationError(
            where, f"the proof leads to new root {second.hex()}, not {new_root.hex()}"
        )


def _consistency_roots(
    old_size: int, new_size: int, path: Sequence[bytes], where: str
) -> tuple[bytes, bytes]:
    """RFC 9162 §2.1.4.2 steps 3-7 up to the comparisons: the old and new roots ``path``
    leads to. Raises ``AuditVerificationError`` when its length does not fit the trees."""
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first = second = path[0]
    for node in path[1:]:
        if sn == 0:
            raise AuditVerificationError(where, "the proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            first = node_hash(node, first)
            second = node_hash(node, second)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            second = node_hash(second, node)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise AuditVerificationError(where, "the proof is shorter than the tree is deep")
    return first, second
