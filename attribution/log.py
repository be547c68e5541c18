"""An append-only RFC 9162 Merkle log that answers root, inclusion and consistency for any past size.

It keeps every complete, aligned perfect subtree: `levels[h][i]` is the hash of
leaves `[i * 2**h, (i + 1) * 2**h)`. Appending a leaf adds it at level 0 and
closes the perfect subtrees it completes, O(log n) hashes at worst and O(1)
amortized. Any subtree the RFC's recursion asks for is one stored node or a
short right spine of them, so proofs cost O(log² n) hashes at worst for any
past size, and nothing is re-read from storage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from longtail.attribution.merkle import EMPTY_ROOT, consistency_path, inclusion_path, node_hash, split_point


class MerkleLog:
    """In-memory incremental Merkle tree over leaf hashes (32 bytes each)."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        # Readers may ask for proofs while the writer appends; the lock keeps levels coherent.
        self._lock = threading.RLock()
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def __len__(self) -> int:
        return self.size

    def leaf(self, index: int) -> bytes:
        return self._levels[0][index]

    def append(self, leaf: bytes) -> int:
        """Append one leaf hash; returns its index."""
        if len(leaf) != 32:
            raise ValueError(f"a leaf hash is 32 bytes, got {len(leaf)}")
        with self._lock:
            levels = self._levels
            index = len(levels[0])
            levels[0].append(bytes(leaf))
            height, position = 0, index
            # Each odd position closes a pair: hash it into the level above.
            while position & 1:
                if height + 1 == len(levels):
                    levels.append([])
                levels[height + 1].append(node_hash(levels[height][position - 1], levels[height][position]))
                height += 1
                position >>= 1
            return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for leaf in leaf_hashes:
            self.append(leaf)

    def subtree_hash(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for ranges the RFC recursion produces (lo aligned to the left split)."""
        if not 0 <= lo < hi <= self.size:
            raise IndexError(f"range [{lo}, {hi}) is outside a log of size {self.size}")
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            return self._levels[n.bit_length() - 1][lo // n]
        k = split_point(n)
        if lo % k:
            raise ValueError(f"range [{lo}, {hi}) is not a subtree of the RFC 9162 shape")
        # The left part is a stored perfect subtree; only the right spine is hashed here.
        return node_hash(self._levels[k.bit_length() - 1][lo // k], self.subtree_hash(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first `size` leaves (default: all)."""
        with self._lock:
            size = self.size if size is None else size
            if not 0 <= size <= self.size:
                raise IndexError(f"size {size} is beyond the log's size {self.size}")
            return EMPTY_ROOT if size == 0 else self.subtree_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path of leaf `index` in the tree of the first `size` leaves."""
        with self._lock:
            size = self.size if size is None else size
            if size > self.size:
                raise IndexError(f"size {size} is beyond the log's size {self.size}")
            return inclusion_path(index, size, self.subtree_hash)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Proof that the tree of `new_size` leaves extends the tree of `old_size` leaves."""
        with self._lock:
            new_size = self.size if new_size is None else new_size
            if new_size > self.size:
                raise IndexError(f"size {new_size} is beyond the log's size {self.size}")
            return consistency_path(old_size, new_size, self.subtree_hash)

    def leaf_hashes(self) -> Sequence[bytes]:
        return tuple(self._levels[0])
