"""RFC 9162 §2.1 Merkle tree hashes, inclusion and consistency proofs, as pure functions.

Leaf hash = SHA-256(0x00 || data), node hash = SHA-256(0x01 || left || right);
the tree splits at the largest power of two smaller than n, exactly as
Certificate Transparency does, so any CT verifier agrees with ours. Proof
generation follows the RFC's recursive PATH and SUBPROOF definitions over a
`subtree(lo, hi)` hasher, so the pure functions here and the incremental
`attribution.log.MerkleLog` share one implementation; verification follows the
RFC's iterative algorithms (§2.1.3.2, §2.1.4.2) step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()
HASH_SIZE = 32

SubtreeHasher = Callable[[int, int], bytes]


class InvalidProof(ValueError):
    """An inclusion or consistency proof does not verify; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf's data, with the 0x00 domain prefix."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node, with the 0x01 domain prefix."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves; iterative so a million leaves do not recurse."""
    if not hashes:
        return EMPTY_ROOT
    # Folding pairs left to right level by level gives the same shape as the
    # recursive split: an odd node at the end of a level is promoted unchanged.
    level = list(hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 over raw leaf data."""
    return root_from_leaf_hashes([leaf_hash(d) for d in leaves])


# --- proof generation (RFC 9162 §2.1.3.1 and §2.1.4.1) --------------------------------------------

def inclusion_path(index: int, size: int, subtree: SubtreeHasher) -> list[bytes]:
    """PATH(index, D[size]): sibling hashes from the leaf up to the root.

    `subtree(lo, hi)` returns MTH(D[lo:hi]); the recursion is unrolled from the
    root down and reversed, because each level appends its sibling after the deeper ones.
    """
    if not 0 <= index < size:
        raise IndexError(f"leaf index {index} is outside a tree of size {size}")
    siblings: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index - lo < k:
            siblings.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            siblings.append(subtree(lo, lo + k))
            lo = lo + k
    siblings.reverse()
    return siblings


def consistency_path(old_size: int, new_size: int, subtree: SubtreeHasher) -> list[bytes]:
    """PROOF(old_size, D[new_size]) = SUBPROOF(m, D[n], true); empty when the sizes are equal.

    A proof from the empty tree is not defined (every tree extends it), so old_size 0
    is refused, as CT verifiers refuse it.
    """
    if not 0 < old_size <= new_size:
        raise ValueError(f"consistency needs 0 < old size <= new size, got {old_size} and {new_size}")
    nodes: list[bytes] = []
    m, lo, hi, complete = old_size, 0, new_size, True
    while m != hi - lo:
        k = split_point(hi - lo)
        if m <= k:
            nodes.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            nodes.append(subtree(lo, lo + k))
            m -= k
            lo = lo + k
            complete = False
    if not complete:
        nodes.append(subtree(lo, hi))
    nodes.reverse()
    return nodes


def _list_hasher(hashes: Sequence[bytes]) -> SubtreeHasher:
    return lambda lo, hi: root_from_leaf_hashes(hashes[lo:hi])


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Inclusion proof of leaf `index` in the tree over all of `leaf_hashes`."""
    return inclusion_path(index, len(leaf_hashes), _list_hasher(leaf_hashes))


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Consistency proof from the first `old_size` leaves to all of `leaf_hashes`."""
    return consistency_path(old_size, len(leaf_hashes), _list_hasher(leaf_hashes))


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ------------------------------------------------

def _check_hash(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise InvalidProof(f"{name} must be {HASH_SIZE} bytes, got {value!r:.80}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to; raises InvalidProof when the proof has the wrong shape."""
    if not 0 <= index < size:
        raise InvalidProof(f"leaf index {index} is outside a tree of size {size}")
    _check_hash("leaf hash", leaf)
    fn, sn, r = index, size - 1, bytes(leaf)
    for position, p in enumerate(proof):
        _check_hash(f"proof[{position}]", p)
        if sn == 0:
            raise InvalidProof(f"proof has {len(proof)} hashes, more than a tree of size {size} needs")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof(f"proof has {len(proof)} hashes, too few for leaf {index} of a tree of size {size}")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf` (a leaf hash) is leaf `index` of the tree of `size` with `root`."""
    _check_hash("root", root)
    computed = root_from_inclusion_proof(index, size, leaf, proof)
    if computed != root:
        raise InvalidProof(f"inclusion proof for leaf {index} of size {size} leads to root "
                           f"{computed.hex()}, expected {bytes(root).hex()}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check that the tree of `new_size` with `new_root` extends the tree of `old_size` with `old_root`."""
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    if old_size > new_size:
        raise InvalidProof(f"old size {old_size} is larger than new size {new_size}")
    if old_size == new_size:
        if proof:
            raise InvalidProof(f"sizes are equal ({old_size}) but the proof is not empty")
        if old_root != new_root:
            raise InvalidProof(f"sizes are equal ({old_size}) but the roots differ")
        return
    if old_size == 0:
        raise InvalidProof("a consistency proof from the empty tree is not defined")
    if not proof:
        raise InvalidProof(f"empty proof for sizes {old_size} -> {new_size}")
    for position, p in enumerate(proof):
        _check_hash(f"proof[{position}]", p)
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is a complete subtree of the new one: its root is the first node.
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof(f"proof has {len(proof)} hashes, more than sizes {old_size} -> {new_size} need")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof(f"proof has {len(proof)} hashes, too few for sizes {old_size} -> {new_size}")
    if fr != old_root:
        raise InvalidProof(f"proof leads to old root {fr.hex()}, expected {bytes(old_root).hex()}")
    if sr != new_root:
        raise InvalidProof(f"proof leads to new root {sr.hex()}, expected {bytes(new_root).hex()}")
