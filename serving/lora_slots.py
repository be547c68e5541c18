"""The device-side LoRA buffers the kernels read: stacked rank rows per projection, per-slot tables.

For each projection name there is one buffer of rank rows per layer
(`a_rows[m]`: [layers, rows, in], `b_rows[m]`: [layers, rows, out]); an adapter
loaded into slot `s` gets a contiguous run of rows in each projection it
targets, as many as its largest rank there (no padding to the engine's maximum
rank). Buffers grow by doubling at load time, never during a step; so does
the slot table: the number of slots is not a cap (the tiers' byte budget is),
so a 65th (or 6,500th) adapter gets a slot as the first did.

Every tensor copy goes through `self.copy` so that the tiers can run it on a
side stream on CUDA, and a test can defer it on CPU to play the part of a copy
still in flight (tests/serving/test_adapter_tiers.py, the growth race).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from longtail.kernels.lora import SlotWeights, slot_weights
from longtail.kernels.lora_cpu import RunTable, run_table
from longtail.serving.config import ModelConfig
from longtail.serving.errors import AdapterIncompatible
from longtail.serving.peft_format import AdapterWeights

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RowAllocator:
    """First-fit allocator of contiguous row ranges, with coalescing frees."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []

    def allocate(self, rows: int) -> int | None:
        for index, (start, length) in enumerate(self.free):
            if length >= rows:
                if length == rows:
                    self.free.pop(index)
                else:
                    self.free[index] = (start + rows, length - rows)
                return start
        return None

    def release(self, start: int, rows: int) -> None:
        self.free.append((start, rows))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for begin, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == begin:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((begin, length))
        self.free = merged

    def grow(self, new_capacity: int) -> None:
        self.release(self.capacity, new_capacity - self.capacity)
        self.capacity = new_capacity


@dataclasses.dataclass
class ProjectionBuffers:
    a_rows: torch.Tensor      # [layers, rows, in]
    b_rows: torch.Tensor      # [layers, rows, out]   (lora_B transposed)
    offsets: torch.Tensor     # [slots] int64
    ranks: torch.Tensor       # [layers, slots] int64 (0 = not targeted)
    scales: torch.Tensor      # [layers, slots] float32
    allocator: RowAllocator
    rows_of_slot: dict[int, tuple[int, int]]
    max_rank: list[int]       # per layer, over loaded slots


def _copy(destination: torch.Tensor, source: torch.Tensor) -> None:
    # Asynchronous from pinned host memory (the tiers pin host copies on CUDA); synchronous otherwise.
    destination.copy_(source, non_blocking=True)


class LoraSlots:
    """Adapters on the device: `initial_slots` slots to start with, doubled whenever they run out."""

    def __init__(self, config: ModelConfig, initial_slots: int = 16, initial_rows: int = 64,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        slots = max(1, int(initial_slots))
        self.capacity = slots
        self.grows = 0  # buffer or table reallocations so far: a growth moves every adapter's rows (see tiers)
        self.copy: Callable[[torch.Tensor, torch.Tensor], None] = _copy
        self.device = torch.device(device)
        self.dtype = dtype
        shapes = config.module_shapes().shapes
        layers = config.num_layers
        self.buffers = {
            name: ProjectionBuffers(
                a_rows=torch.zeros(layers, initial_rows, shapes[name][0], device=self.device, dtype=dtype),
                b_rows=torch.zeros(layers, initial_rows, shapes[name][1], device=self.device, dtype=dtype),
                offsets=torch.zeros(slots, dtype=torch.int64, device=self.device),
                ranks=torch.zeros(layers, slots, dtype=torch.int64, device=self.device),
                scales=torch.zeros(layers, slots, dtype=torch.float32, device=self.device),
                allocator=RowAllocator(initial_rows), rows_of_slot={}, max_rank=[0] * layers)
            for name in PROJECTIONS
        }
        self.slot_of: dict[str, int] = {}
        self.nbytes_of: dict[str, int] = {}
        self._free_slots = list(range(slots))
        self._views: dict[str, list[list[SlotWeights | None]]] = {}
        self._tables: dict[tuple, RunTable] = {}

    def views(self, name: str, layer: int) -> list[SlotWeights | None]:
        """Per slot, (A^T, B^T, scale) views of projection `name` in `layer` for the CPU path; rebuilt after a
        load, free or growth (which moves the buffers), never during a step."""
        per_layer = self._views.get(name)
        if per_layer is None:
            buffers = self.buffers[name]
            offsets = buffers.offsets.tolist()
            ranks, scales = buffers.ranks.tolist(), buffers.scales.tolist()
            per_layer = [slot_weights(buffers.a_rows[layer_], buffers.b_rows[layer_], offsets, ranks[layer_],
                                      scales[layer_]) for layer_ in range(self.config.num_layers)]
            self._views[name] = per_layer
        return per_layer[layer]

    def run_table(self, columns: tuple[tuple[str, int], ...], layer: int) -> RunTable:
        """The C kernel's table for a group of projections that share an input (`columns`: (name, first output
        column) each) in `layer`; rebuilt after a load, free or growth, never during a step."""
        key = (columns, layer)
        table = self._tables.get(key)
        if table is None:
            parts = []
            for name, column in columns:
                buffers = self.buffers[name]
                parts.append((buffers.a_rows[layer], buffers.b_rows[layer], buffers.offsets.tolist(),
                              buffers.ranks[layer].tolist(), buffers.scales[layer].tolist(), column))
            table = self._tables[key] = run_table(parts)
        return table

    def _forget_views(self) -> None:
        self._views.clear()
        self._tables.clear()

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self.slot_of

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def __len__(self) -> int:
        return len(self.slot_of)

    def _grow(self, buffers: ProjectionBuffers, needed: int) -> None:
        old = buffers.allocator.capacity
        new = max(old * 2, old + needed, 16)
        layers, _, width_in = buffers.a_rows.shape
        a = torch.zeros(layers, new, width_in, device=self.device, dtype=self.dtype)
        b = torch.zeros(layers, new, buffers.b_rows.shape[2], device=self.device, dtype=self.dtype)
        self.copy(a[:, :old], buffers.a_rows)
        self.copy(b[:, :old], buffers.b_rows)
        buffers.a_rows, buffers.b_rows = a, b
        buffers.allocator.grow(new)
        self.grows += 1
        self._forget_views()

    def _grow_slots(self) -> None:
        """Double the per-slot tables (offsets, ranks, scales); the new slots start untargeted."""
        old, new = self.capacity, self.capacity * 2
        for buffers in self.buffers.values():
            offsets = torch.zeros(new, dtype=torch.int64, device=self.device)
            ranks = torch.zeros(buffers.ranks.shape[0], new, dtype=torch.int64, device=self.device)
            scales = torch.zeros(buffers.scales.shape[0], new, dtype=torch.float32, device=self.device)
            self.copy(offsets[:old], buffers.offsets)
            self.copy(ranks[:, :old], buffers.ranks)
            self.copy(scales[:, :old], buffers.scales)
            buffers.offsets, buffers.ranks, buffers.scales = offsets, ranks, scales
        self._free_slots.extend(range(old, new))
        self.capacity = new
        self.grows += 1
        self._forget_views()

    def load(self, weights: AdapterWeights) -> int:
        """Copy an adapter into a free slot; returns the slot index."""
        if weights.adapter_id in self.slot_of:
            return self.slot_of[weights.adapter_id]
        shapes = self.config.module_shapes().shapes
        by_projection: dict[str, list] = {}
        for module in weights.modules:
            if module.module not in shapes or not 0 <= module.layer < self.config.num_layers:
                raise AdapterIncompatible(f"adapter {weights.adapter_id} targets {module.module} of layer "
                                          f"{module.layer}, which this base model does not have")
            width_in, width_out = shapes[module.module]
            if tuple(module.lora_a.shape[1:]) != (width_in,) or module.lora_b.shape[0] != width_out:
                raise AdapterIncompatible(f"adapter {weights.adapter_id}: {module.module} of layer {module.layer} "
                                          f"has shapes A {tuple(module.lora_a.shape)}, B {tuple(module.lora_b.shape)}; "
                                          f"the base needs [r, {width_in}] and [{width_out}, r]")
            by_projection.setdefault(module.module, []).append(module)
        if not self._free_slots:
            self._grow_slots()
        slot = self._free_slots.pop(0)
        for name, modules in by_projection.items():
            buffers = self.buffers[name]
            rows = max(m.rank for m in modules)
            start = buffers.allocator.allocate(rows)
            if start is None:
                self._grow(buffers, rows)
                start = buffers.allocator.allocate(rows)
            buffers.rows_of_slot[slot] = (start, rows)
            buffers.offsets[slot] = start
            for module in modules:
                rank = module.rank
                self.copy(buffers.a_rows[module.layer, start:start + rank], module.lora_a)
                self.copy(buffers.b_rows[module.layer, start:start + rank], module.lora_b.T)
                buffers.ranks[module.layer, slot] = rank
                buffers.scales[module.layer, slot] = module.scale
                buffers.max_rank[module.layer] = max(buffers.max_rank[module.layer], rank)
        self.slot_of[weights.adapter_id] = slot
        self.nbytes_of[weights.adapter_id] = weights.nbytes
        self._forget_views()
        return slot

    def free(self, adapter_id: str) -> None:
        slot = self.slot_of.pop(adapter_id)
        self.nbytes_of.pop(adapter_id, None)
        for buffers in self.buffers.values():
            placed = buffers.rows_of_slot.pop(slot, None)
            if placed is None:
                continue
            buffers.allocator.release(*placed)
            buffers.ranks[:, slot] = 0
            buffers.scales[:, slot] = 0.0
            buffers.max_rank = [int(r) for r in buffers.ranks.max(dim=1).values.tolist()]
        self._free_slots.append(slot)
        self._free_slots.sort()
        self._forget_views()
