"""Tensors in, logits out: turns this step's sequence chunks into one flat batch and runs the model.

The runner decides no policy. It lays the batch out grouped by adapter slot, so
every adapter's tokens are one contiguous run (the LoRA kernels then slice
instead of gathering), builds the cache slot maps from block tables, and
returns the wanted logits in the order the chunks were given.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from longtail.kernels.lora import kernel_backend, runs_of, token_groups_of
from longtail.kernels.lora_cpu import DTYPES as LORA_KERNEL_DTYPES
from longtail.kernels.lora_cpu import native_available, split_runs
from longtail.serving.cuda_graphs import BUCKETS, DecodeGraphs
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


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A step input to the device without stalling the host: pinned and asynchronous on CUDA.

    The copy is ordered on the stream before the kernels that read it, so nothing waits for it here.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, lora_slots: LoraSlots,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.cache = cache
        self.lora_slots = lora_slots
        # CUDA: decode steps replay captured graphs (serving.cuda_graphs); LONGTAIL_CUDA_GRAPHS=0 runs them eagerly.
        if graphs is None and model.device.type == "cuda" and os.environ.get("LONGTAIL_CUDA_GRAPHS", "").strip() != "0":
            graphs = DecodeGraphs(model, cache, lora_slots, max_running=BUCKETS[-1])
        self.graphs = graphs

    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """fp32 logits: for each chunk in order, its `logit_rows` rows (chunks wanting none add none)."""
        if self.graphs is not None and self.graphs.runs(chunks):
            return self.graphs.run(chunks)
        plan = self.plan(chunks)
        with torch.inference_mode():
            return self.model.forward(plan, self.cache, self.lora_slots)

    def plan(self, chunks: Sequence[SequenceChunk]) -> BatchPlan:
        """The step's tensors, built from plain ints and converted in one `torch.tensor` call.

        Slot maps are computed as Python ints (a decode token is one multiply-add), not with small
        tensor ops per sequence: at batch 32 those were ~150 torch calls per step.
        """
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
        write_slots: list[int] = []
        segments: list[PrefillSegment] = []
        for index in decode_order + prefill_order:
            chunk = chunks[index]
            length = len(chunk.token_ids)
            starts[index] = len(ids)
            ids.extend(chunk.token_ids)
            context, blocks = chunk.context, chunk.blocks
            positions.extend(range(context, context + length))
            token_slots.extend([chunk.lora_slot] * length)
            write_slots.extend(blocks[p // block_size] * block_size + p % block_size
                               for p in range(context, context + length))
            if not chunk.is_decode:
                gather = self.cache.slot_indices(chunk.blocks, 0, chunk.context + length) if context else None
                segments.append(PrefillSegment(starts[index], length, chunk.context,
                                               _to_device(gather, device) if gather is not None else None))
        logits_index: list[int] = []
        for index, chunk in enumerate(chunks):
            if chunk.logits_from is None:
                continue
            start, length = starts[index], len(chunk.token_ids)
            first = length - 1 if chunk.logits_from == -1 else chunk.logits_from
            logits_index.extend(range(start + first, start + length))
        decode = [chunks[i] for i in decode_order]
        context_lens = [c.context + 1 for c in decode]
        tokens = len(ids)
        packed = _to_device(torch.tensor(ids + positions + write_slots + token_slots + logits_index + context_lens,
                                         dtype=torch.int64), device)
        parts = packed.split([tokens, tokens, tokens, tokens, len(logits_index), len(decode)])
        runs = runs_of(token_slots)
        native_runs = None
        if runs and device.type == "cpu" and self.model.dtype in LORA_KERNEL_DTYPES and native_available():
            native_runs, runs = split_runs(runs, fused=self.model.weight_format == "panels")
        slot_tensor = parts[3]
        return BatchPlan(
            input_ids=parts[0], positions=parts[1], write_slots=parts[2], token_slots=slot_tensor,
            # The torch backend reads only the runs; the grouping is for the GPU kernels, made from host ints.
            lora_groups=token_groups_of(token_slots, device) if (runs or native_runs is not None)
            and kernel_backend() != "torch" else [],
            lora_runs=runs, native_runs=native_runs,
            prefill=segments,
            decode_count=len(decode),
            decode_gather=_to_device(self._block_tables(decode, context_lens, block_size), device),
            context_lens=parts[5],
            logits_index=parts[4],
        )

    @staticmethod
    def _block_tables(decode: list[SequenceChunk], lengths: list[int], block_size: int) -> torch.Tensor:
        """Block tables of the decode rows [B, W], W the longest row's blocks, padded with each row's first block.

        Padding repeats the row's own block, never another sequence's: a gathering kernel then reads only memory
        its row owns (a masked key still multiplies its value by 0, and 0 * NaN from a failed neighbour is NaN).
        """
        if not decode:
            return torch.zeros(0, 0, dtype=torch.int64)
        width = -(-max(lengths) // block_size)
        return torch.tensor([list(c.blocks[:width]) + [c.blocks[0]] * (width - len(c.blocks[:width]))
                             for c in decode], dtype=torch.int64)
