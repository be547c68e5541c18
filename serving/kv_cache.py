"""Paged KV cache: a preallocated pool of fixed-size blocks, sized by a byte budget, and block tables.

A sequence owns a list of blocks (its block table); token position `p` lives
in slot `table[p // block_size] * block_size + p % block_size` of the flat pool.
A sequence is admitted with the blocks its prompt needs now, takes one more
each time it decodes across a block boundary, and gives them all back on
finish, cancel or preemption (the policy is `serving.scheduler`'s).

The byte budget: given, or on CUDA sized from the device's free memory
(`kv_pool_bytes`); on a CPU a fixed default (`CPU_KV_CACHE_BYTES`).
"""

from __future__ import annotations

import torch

from longtail.serving.config import ModelConfig

# On a CPU the pool lives in host RAM, which the process shares with the OS, the adapter host tier, the node,
# the chain client and whatever else runs there: free memory says nothing about what the engine may take, so
# the pool keeps a fixed default unless the operator gives one.
CPU_KV_CACHE_BYTES = 256 * 2**20
# The adapter device tier's default on a CPU, fixed for the same reason. On a CPU the "device" slots are the
# same RAM as the host tier's copies, so the budget is sized to hold one busy batch's adapters: below that,
# requests wait for a pinned adapter to finish and the batch shrinks (a 128-request trace over 38 adapters of
# ranks 8-64, 691 MB in fp32, ran 31 requests at a time under 256 MiB: 219 against 309 tok/s under 1 GiB).
CPU_ADAPTER_BYTES = 2**30


def kv_pool_bytes(free_bytes: int, total_bytes: int, fraction: float, weight_bytes: int, adapter_bytes: int,
                  reserve_bytes: int = 0) -> int:
    """The KV pool's byte budget on an accelerator, from its memory as `torch.cuda.mem_get_info` reports it.

    `free_bytes` is measured with the weights already resident. The engine may use `fraction` of the device
    (vLLM's `gpu_memory_utilization`): `fraction * total_bytes`, of which the weights hold `weight_bytes`; and
    never more than `fraction` of what is free now, so memory that another process holds is left to it with
    the same headroom. From that share, the adapter device tier's budget (`adapter_bytes`) and `reserve_bytes`
    (a step's activations and logits) are set aside first; the rest is the pool. Returns 0 when nothing is left
    (the caller refuses to start: a pool of 0 blocks serves nothing).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    if min(free_bytes, total_bytes, weight_bytes, adapter_bytes, reserve_bytes) < 0 or free_bytes > total_bytes:
        raise ValueError(f"inconsistent memory figures: free {free_bytes}, total {total_bytes}, weights "
                         f"{weight_bytes}, adapters {adapter_bytes}, reserve {reserve_bytes}")
    share = min(int(fraction * total_bytes) - weight_bytes, int(fraction * free_bytes))
    return max(0, share - adapter_bytes - reserve_bytes)


# Of the engine's device share left after the weights and a step's activations, what the adapter device tier
# gets when no budget is given (S-LoRA's unified pool, split once): on an 80-141 GB GPU that is 6-11 GB of
# adapter factors (hundreds of rank-16 adapters of an 8B model); the KV pool keeps the other nine tenths.
ADAPTER_SHARE = 0.1


def adapter_device_bytes(free_bytes: int, total_bytes: int, fraction: float, weight_bytes: int,
                         reserve_bytes: int = 0, share: float = ADAPTER_SHARE) -> int:
    """The adapter device tier's budget on an accelerator when none is configured: `share` of the engine's
    share (as `kv_pool_bytes` computes it) after the weights and `reserve_bytes`; 0 when nothing is left."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"adapter share must be in [0, 1), got {share}")
    engine_share = kv_pool_bytes(free_bytes, total_bytes, fraction, weight_bytes, 0, reserve_bytes)
    return int(share * engine_share)


def step_activation_bytes(config: ModelConfig, max_batch_tokens: int, dtype: torch.dtype) -> int:
    """What one step of `max_batch_tokens` tokens allocates beside the cache, at its peak: the hidden state and
    residual, the fused q/k/v and gate/up outputs, attention and MLP outputs (the engine's dtype), and fp32
    logits twice over (a scoring step wants a row per token, then their log-softmax)."""
    q_kv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    per_token = (4 * config.hidden_size + q_kv + config.num_heads * config.head_dim
                 + 3 * config.intermediate_size) * dtype.itemsize
    return max_batch_tokens * (per_token + 2 * config.vocab_size * 4)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of `block_size` tokens in every layer."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize


class BlockPool:
    """Free-list of block indices; the scheduler is told how many are free and decides who gets them."""

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
        per_block = kv_bytes_per_block(config, block_size, dtype)
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
