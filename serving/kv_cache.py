"""Paged KV cache: a preallocated pool of fixed-size blocks, sized by a byte budget, and block tables.

A sequence owns a list of blocks (its block table); token position `p` lives
in slot `table[p // block_size] * block_size + p % block_size` of the flat pool.
Sequences are admitted only when their blocks fit, and give them back on
finish or cancel.
"""

from __future__ import annotations

import torch

from longtail.serving.config import ModelConfig


class BlockPool:
    """Free-list of block indices; the scheduler asks it whether a request fits."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"{count} KV blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    def __init__(self, config: ModelConfig, budget_bytes: int, block_size: int = 16,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.block_size = block_size
        per_block = 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize
        num_blocks = max(1, budget_bytes // per_block)
        self.bytes = num_blocks * per_block
        slots = num_blocks * block_size
        shape = (config.num_layers, slots, config.num_kv_heads, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pool = BlockPool(num_blocks)

    def scrub(self, blocks: list[int]) -> None:
        """Zero the keys and values of `blocks` in every layer."""
        per_block = self.keys.view(self.keys.shape[0], -1, self.block_size, *self.keys.shape[2:])
        index = torch.tensor(blocks, dtype=torch.int64, device=self.keys.device)
        per_block.index_fill_(1, index, 0.0)
        self.values.view_as(per_block).index_fill_(1, index, 0.0)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def slot_indices(self, table: list[int], start: int, stop: int) -> torch.Tensor:
        """Flat slots of positions [start, stop) of a sequence with block table `table`."""
        positions = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
