"""Tensors in, logits out: turns this step's sequence chunks into one flat batch and runs the model.

The runner decides no policy. It lays the batch out grouped by adapter slot, so
every adapter's tokens are one contiguous run (the LoRA kernels then slice
instead of gathering), builds the cache slot maps from block tables, and
returns the wanted logits in the order the chunks were given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from longtail.kernels.lora import runs_of, token_groups
from longtail.kernels.lora_cpu import native_available, split_runs
from longtail.serving.kv_cache import PagedKVCache
from longtail.serving.lora_slots import LoraSlots
from longtail.serving.model import BatchPlan, LlamaModel, PrefillSegment


@dataclasses.dataclass(frozen=True)
class SequenceChunk:
    """Tokens of one sequence to run this step: a decode token, a whole prompt, or a piece of one."""

    token_ids: Sequence[int]
    context: int              # tokens of this sequence already in the cache; the first token's position
    blocks: Sequence[int]     # the sequence's KV block table
    lora_slot: int = -1       # adapter slot on the device, -1 = base model only
    logits_from: int | None = -1  # index in token_ids from which next-token logits are wanted (-1: last only)

    @property
    def logit_rows(self) -> int:
        if self.logits_from is None:
            return 0
        return 1 if self.logits_from == -1 else len(self.token_ids) - self.logits_from

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.context > 0


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, lora_slots: LoraSlots) -> None:
        self.model = model
        self.cache = cache
        self.lora_slots = lora_slots

    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """fp32 logits: for each chunk in order, its `logit_rows` rows (chunks wanting none add none)."""
        plan = self.plan(chunks)
        with torch.inference_mode():
            return self.model.forward(plan, self.cache, self.lora_slots)

    def plan(self, chunks: Sequence[SequenceChunk]) -> BatchPlan:
        device = self.model.device
        block_size = self.cache.block_size
        # Decode rows first, then prompt segments; each group ordered by adapter slot so slots are contiguous.
        decode_order = sorted((i for i, c in enumerate(chunks) if c.is_decode), key=lambda i: chunks[i].lora_slot)
        prefill_order = sorted((i for i, c in enumerate(chunks) if not c.is_decode),
                               key=lambda i: chunks[i].lora_slot)
        starts: dict[int, int] = {}
        ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        write_slots: list[torch.Tensor] = []
        segments: list[PrefillSegment] = []
        for index in decode_order + prefill_order:
            chunk = chunks[index]
            length = len(chunk.token_ids)
            starts[index] = len(ids)
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.context, chunk.context + length))
            token_slots.extend([chunk.lora_slot] * length)
            write_slots.append(self.cache.slot_indices(chunk.blocks, chunk.context, chunk.context + length))
            if not chunk.is_decode:
                gather = self.cache.slot_indices(chunk.blocks, 0, chunk.context + length)
                segments.append(PrefillSegment(starts[index], length, chunk.context, gather.to(device)))
        decode_gather, decode_mask = self._decode_gather([chunks[i] for i in decode_order], block_size)
        logits_index: list[int] = []
        for index, chunk in enumerate(chunks):
            if chunk.logits_from is None:
                continue
            start, length = starts[index], len(chunk.token_ids)
            first = length - 1 if chunk.logits_from == -1 else chunk.logits_from
            logits_index.extend(range(start + first, start + length))
        slot_tensor = torch.tensor(token_slots, dtype=torch.int64, device=device)
        runs = runs_of(token_slots)
        native_runs = None
        if runs and device.type == "cpu" and self.model.dtype == torch.float32 and native_available():
            native_runs, runs = split_runs(runs)
        return BatchPlan(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            write_slots=torch.cat(write_slots).to(device),
            token_slots=slot_tensor,
            lora_groups=token_groups(slot_tensor) if any(s >= 0 for s in token_slots) else [],
            lora_runs=runs, native_runs=native_runs,
            prefill=segments,
            decode_count=len(decode_order),
            decode_gather=decode_gather.to(device), decode_mask=decode_mask.to(device),
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
        )

    @staticmethod
    def _decode_gather(decode: list[SequenceChunk], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables of the decode rows [B, W] (padded) and the mask of real keys [B, W * block_size].

        Attention gathers whole blocks (block_size keys in one contiguous copy), not single slots.
        """
        if not decode:
            return torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0, dtype=torch.bool)
        lengths = torch.tensor([c.context + 1 for c in decode])
        table_width = -(-int(lengths.max()) // block_size)
        # Padding repeats the row's own first block, never another sequence's: a masked key still multiplies
        # its value by 0, and 0 * NaN from a failed neighbour's (or a freed block's) value would be NaN.
        table = torch.tensor([list(c.blocks[:table_width]) + [c.blocks[0]] * (table_width - len(c.blocks[:table_width]))
                              for c in decode], dtype=torch.int64)
        mask = torch.arange(table_width * block_size)[None, :] < lengths[:, None]
        return table, mask
