"""CUDA graphs of the decode step: one per batch-size bucket, its inputs in static buffers.

A decode step on a GPU launches a few hundred small kernels (per layer: norms, the fused
projections, RoPE, the cache write, paged attention, one BGMV pair per LoRA projection);
at batch 1–128 the launches, not the arithmetic, bound the step. A graph replays them all
with one launch. What a graph needs, and how this module gives it:
- Every input at a fixed address: each bucket owns one packed int64 buffer (token ids,
  positions, cache write slots, LoRA slots, context lengths, then the block tables), filled
  by one pinned, asynchronous copy per step.
- Every shape fixed: a bucket of B rows always runs B rows (rows past the batch are padding
  that writes its key and value to a scratch block no request owns and attends to one
  position of it) and block tables `max_context / block_size` wide.
- Nothing chosen on the host from the batch: LoRA reads each token's slot on the device
  (BGMV, `BatchPlan.lora_per_token`), never the host's grouping.
- Nothing the host baked in goes stale: a graph records the LoRA buffers it read (their
  growth count and every projection's per-layer max rank) and is captured again when
  they change (an adapter loaded with a higher rank, a buffer grown).
Steps a graph cannot take (prompt chunks, a batch over the largest bucket, a context over
`max_context`) run eagerly. `capture` is injectable so the buffer plumbing is tested on a
CPU, where "capturing" means keeping the function and "replaying" calls it on the buffers.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

import torch

from longtail.serving.kv_cache import PagedKVCache
from longtail.serving.lora_slots import LoraSlots
from longtail.serving.model import BatchPlan, LlamaModel

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def cuda_capture(function: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Capture `function` into a CUDA graph (after two warm-up runs on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # Triton compiles and autotunes here, never inside the capture
            function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    replay.graph = graph  # keeps the graph (and the memory it owns) alive with the replay
    return replay


@dataclasses.dataclass
class _Bucket:
    rows: int
    packed: torch.Tensor                 # [5 B + B W] int64 on the device: the step's every input
    host: torch.Tensor                   # the same layout on the host (pinned on CUDA)
    replay: Callable[[], torch.Tensor] | None = None
    key: tuple = ()


class DecodeGraphs:
    """Decode steps through captured graphs; `runs(...)` says whether a step can, `run(...)` takes it."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, lora_slots: LoraSlots, max_running: int,
                 max_context: int = 4096, capture: Capture = cuda_capture) -> None:
        self.model, self.cache, self.lora_slots = model, cache, lora_slots
        self.block_size = cache.block_size
        self.width = -(-min(max_context, model.config.max_position_embeddings) // self.block_size)
        self.max_context = self.width * self.block_size
        self.buckets = [b for b in BUCKETS if b < max_running] + [min(max_running, BUCKETS[-1])]
        # Padding rows write their keys here and attend to it: a block taken from the pool for good.
        self.scratch_block = cache.pool.allocate(1)[0]
        self.capture = capture
        self._buckets: dict[int, _Bucket] = {}
        self.captures = 0  # graphs captured so far (a LoRA change recaptures)

    def runs(self, chunks: Sequence) -> bool:
        """A decode-only step of at most the largest bucket's rows, every context within `max_context`."""
        return (0 < len(chunks) <= self.buckets[-1]
                and all(c.is_decode and c.logits_from == -1 and c.context < self.max_context for c in chunks))

    def run(self, chunks: Sequence) -> torch.Tensor:
        """fp32 logits [len(chunks), V] in the order of `chunks` (each decode row wants its one row)."""
        bucket = self._bucket(self.buckets[bisect.bisect_left(self.buckets, len(chunks))])
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].lora_slot)  # an adapter's rows together
        self._fill(bucket, [chunks[i] for i in order])
        key = self._lora_key()
        if bucket.replay is None or bucket.key != key:
            bucket.replay, bucket.key = self.capture(lambda: self._forward(bucket)), key
            self.captures += 1
        logits = bucket.replay()
        back = [0] * len(chunks)
        for row, index in enumerate(order):
            back[index] = row
        return logits[torch.tensor(back, dtype=torch.int64).to(logits.device, non_blocking=True)]

    def _bucket(self, rows: int) -> _Bucket:
        bucket = self._buckets.get(rows)
        if bucket is None:
            size = 5 * rows + rows * self.width
            host = torch.zeros(size, dtype=torch.int64)
            if self.model.device.type == "cuda":
                host = host.pin_memory()
            bucket = self._buckets[rows] = _Bucket(rows, torch.zeros(size, dtype=torch.int64,
                                                                     device=self.model.device), host)
            self._fill(bucket, [])  # the capture runs on padding rows only: it writes to the scratch block
        return bucket

    def _fill(self, bucket: _Bucket, chunks: Sequence) -> None:
        rows, width, block_size = bucket.rows, self.width, self.block_size
        ids, positions, slots, lora, lengths, tables = [], [], [], [], [], []
        for chunk in chunks:
            position = chunk.context
            ids.append(chunk.token_ids[0])
            positions.append(position)
            slots.append(chunk.blocks[position // block_size] * block_size + position % block_size)
            lora.append(chunk.lora_slot)
            lengths.append(position + 1)
            table = list(chunk.blocks[:width])
            tables.extend(table + [table[0]] * (width - len(table)))  # its own block: reads stay in its memory
        padding = rows - len(chunks)
        scratch = self.scratch_block * block_size
        ids += [0] * padding
        positions += [0] * padding
        slots += [scratch] * padding
        lora += [-1] * padding
        lengths += [1] * padding
        tables += [self.scratch_block] * (padding * width)
        # The host buffer is rewritten only after the previous step's tokens came back (the sampler's one
        # transfer), so its previous asynchronous copy has finished by then.
        bucket.host.copy_(torch.tensor(ids + positions + slots + lora + lengths + tables, dtype=torch.int64))
        bucket.packed.copy_(bucket.host, non_blocking=True)

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        rows = bucket.rows
        parts = bucket.packed.split([rows] * 5 + [rows * self.width])
        plan = BatchPlan(
            input_ids=parts[0], positions=parts[1], write_slots=parts[2], token_slots=parts[3], lora_groups=[],
            prefill=[], decode_count=rows, decode_gather=parts[5].view(rows, self.width), context_lens=parts[4],
            logits_index=torch.arange(rows, device=bucket.packed.device), lora_per_token=self._lora_loaded())
        with torch.inference_mode():
            return self.model.forward(plan, self.cache, self.lora_slots)

    def _lora_loaded(self) -> bool:
        return any(any(buffers.max_rank) for buffers in self.lora_slots.buffers.values())

    def _lora_key(self) -> tuple:
        """What a graph baked in from the LoRA buffers: where they are and which launches each layer makes."""
        return (self.lora_slots.grows, tuple(
            (name, tuple(b.max_rank), *(t.data_ptr() for t in (b.a_rows, b.b_rows, b.offsets, b.ranks, b.scales)))
            for name, b in self.lora_slots.buffers.items()))
