"""RFC 9162 §2.1 Merkle tree hashes, as pure functions over leaf data.

Leaf hash = SHA-256(0x00 || data), node hash = SHA-256(0x01 || left || right);
the tree splits at the largest power of two smaller than n, exactly as
Certificate Transparency does, so any CT verifier agrees with ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


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
