"""Batched multi-LoRA shrink / expand: pure-torch references (the CPU path) and the dispatch.

Weight layout (no padding to a maximum rank): every targeted projection has a
stacked buffer of rank rows. Adapter slot `s` owns rows
`slot_offsets[s] : slot_offsets[s] + slot_ranks[s]` of `a_rows` (its PEFT
`lora_A`, `[rank, in]`) and of `b_rows` (its `lora_B` transposed, `[rank, out]`);
a rank of 0 means the adapter does not target this projection. Tokens carry a
slot index, -1 for none (base model only).

Two call shapes, named as in Punica:
- per token (BGMV, decode): `token_slots [T]`, any order;
- per segment (SGMV, prefill): `seg_starts [S+1]` token boundaries and
  `seg_slots [S]`, tokens of one segment contiguous; empty segments allowed.

The references below are also what the engine runs on CPU, so they batch the
work: one matmul per adapter present, on a slice of the activations when the
adapter's tokens are contiguous (gathered otherwise), never a loop over tokens
and never work padded to the largest rank.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

# add_lora takes the SGMV kernels on Triton when segments average this many tokens.
SGMV_MIN_AVERAGE_RUN = 8
SGMV_MIN_TOKENS = 64

Groups = list[tuple[int, torch.Tensor]]
Segments = tuple[torch.Tensor, torch.Tensor]


class LoraShapeError(ValueError):
    """The tensors handed to a LoRA kernel disagree on a dimension."""


@functools.cache
def _has_cuda() -> bool:
    # Asked on every LoRA call (thousands per engine step); a process's devices do not change.
    return torch.cuda.is_available()


def kernel_backend() -> str:
    """"triton" on CUDA, "torch" elsewhere; LONGTAIL_KERNELS=torch|triton forces one."""
    forced = os.environ.get("LONGTAIL_KERNELS", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    return "triton" if _has_cuda() else "torch"


class TokenGroups(list):
    """A list of (slot, token indices), one per slot present, plus each group's token range.

    `ranges[i]` is (begin, end) when group i's tokens are contiguous (every decode
    token, and every prefill request laid out in order), else None; the reference
    then slices instead of gathering. Built once per step by `token_groups`.
    """

    def __init__(self, groups: list[tuple[int, torch.Tensor]], ranges: list[tuple[int, int] | None],
                 token_count: int = 0, device: torch.device | str = "cpu"):
        super().__init__(groups)
        self.ranges = ranges
        self.token_count = token_count
        self.device = torch.device(device)
        self._segments: Segments | None = None
        self._segments_known = False
        self.longest_segment: int | None = None  # set with the segments: sizes the SGMV grid without a device read

    def segments(self) -> Segments | None:
        """The SGMV form of this batch, built on the host (no device sync), or None if a group is split.

        Cached: the engine builds the groups once per step and every projection reuses them.
        """
        if not self._segments_known:
            self._segments_known = True
            if all(span is not None for span in self.ranges):
                spans = sorted((span[0], span[1], slot) for (slot, _), span in zip(self, self.ranges, strict=True))
                starts, slots, position = [0], [], 0
                for begin, end, slot in spans:
                    if begin > position:  # base-only tokens between adapters form a -1 segment
                        starts.append(begin)
                        slots.append(-1)
                    starts.append(end)
                    slots.append(slot)
                    position = end
                if position < self.token_count:
                    starts.append(self.token_count)
                    slots.append(-1)
                self.longest_segment = max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0)
                self._segments = (torch.tensor(starts, dtype=torch.int64).to(self.device, non_blocking=True),
                                  torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True))
        return self._segments


def token_groups(token_slots: torch.Tensor) -> TokenGroups:
    """(slot, token indices) for every slot present except -1; one stable sort, no per-token loop.

    Callers that apply many projections to the same batch compute this once per
    step and pass it as `groups`, so the grouping is not redone 7 × layers times.
    """
    slots = token_slots.to(torch.int64)
    order = torch.argsort(slots, stable=True)
    present, counts = torch.unique_consecutive(slots[order], return_counts=True)
    order_list = order.tolist()
    groups, ranges, start = [], [], 0
    for slot, count in zip(present.tolist(), counts.tolist(), strict=True):
        if slot >= 0:
            groups.append((slot, order[start:start + count]))
            # A stable sort keeps each group's tokens increasing, so first/last decide contiguity.
            first, last = order_list[start], order_list[start + count - 1]
            ranges.append((first, last + 1) if last - first + 1 == count else None)
        start += count
    return TokenGroups(groups, ranges, token_count=slots.shape[0], device=slots.device)


def token_groups_of(token_slots: Sequence[int], device: torch.device | str = "cpu") -> TokenGroups:
    """`token_groups` from the slots as host ints (the runner has them): nothing is read back from the device.

    The token order goes to the device in one copy (pinned and asynchronous on CUDA); each group's
    indices are a slice of it.
    """
    count = len(token_slots)
    order = sorted(range(count), key=token_slots.__getitem__)  # stable: each group's tokens stay increasing
    device = torch.device(device)
    host = torch.tensor(order, dtype=torch.int64)
    on_device = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    groups, ranges, start = [], [], 0
    while start < count:
        slot = token_slots[order[start]]
        end = start
        while end < count and token_slots[order[end]] == slot:
            end += 1
        if slot >= 0:
            groups.append((slot, on_device[start:end]))
            first, last = order[start], order[end - 1]
            ranges.append((first, last + 1) if last - first + 1 == end - start else None)
        start = end
    return TokenGroups(groups, ranges, token_count=count, device=device)


def _targeted(groups: Groups, ranks: list[int]):
    """(slot, tokens, range or None) for the groups whose slot targets this projection."""
    ranges = getattr(groups, "ranges", None)
    if ranges is None:
        ranges = [None] * len(groups)
    return [(slot, tokens, span) for (slot, tokens), span in zip(groups, ranges, strict=True) if ranks[slot] > 0]


def segments_from_token_slots(token_slots: torch.Tensor) -> Segments:
    """Runs of equal slot in token order: (seg_starts [S+1], seg_slots [S]) for the SGMV form."""
    slots = token_slots.to(torch.int64)
    if slots.numel() == 0:
        return (torch.zeros(1, dtype=torch.int64, device=slots.device),
                torch.zeros(0, dtype=torch.int64, device=slots.device))
    change = torch.ones_like(slots, dtype=torch.bool)
    change[1:] = slots[1:] != slots[:-1]
    starts = torch.nonzero(change, as_tuple=True)[0]
    end = torch.full((1,), slots.numel(), dtype=torch.int64, device=slots.device)
    return torch.cat([starts, end]), slots[starts]


def _check_shapes(x_or_shrunk: torch.Tensor, rows: torch.Tensor, token_count: int, what: str) -> None:
    if x_or_shrunk.dim() != 2 or rows.dim() != 2:
        raise LoraShapeError(f"{what}: expected 2-D tensors, got {tuple(x_or_shrunk.shape)} and {tuple(rows.shape)}")
    if x_or_shrunk.shape[0] != token_count:
        raise LoraShapeError(f"{what}: {x_or_shrunk.shape[0]} rows of activations for {token_count} token slots")


def lora_shrink_ref(x: torch.Tensor, a_rows: torch.Tensor, token_slots: torch.Tensor, slot_offsets: torch.Tensor,
                    slot_ranks: torch.Tensor, max_rank: int, groups: Groups | None = None) -> torch.Tensor:
    """shrunk[t, :r] = x[t] @ A_s^T for the token's slot s (rank r); zeros elsewhere. Dtype of x.

    One matmul per adapter present, on a slice of x when its tokens are contiguous.
    """
    _check_shapes(x, a_rows, token_slots.shape[0], "lora_shrink")
    shrunk = torch.zeros(x.shape[0], max_rank, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or max_rank == 0:
        return shrunk
    groups = token_groups(token_slots) if groups is None else groups
    offsets, ranks = slot_offsets.tolist(), slot_ranks.tolist()
    upcast = x.dtype != torch.float32 or a_rows.dtype != torch.float32
    for slot, tokens, span in _targeted(groups, ranks):
        offset, rank = offsets[slot], ranks[slot]
        a = a_rows[offset:offset + rank]
        x_group = x[span[0]:span[1]] if span else x.index_select(0, tokens)
        if upcast:
            x_group, a = x_group.float(), a.float()
        product = x_group @ a.T
        if span:
            shrunk[span[0]:span[1], :rank] = product
        else:
            shrunk[tokens, :rank] = product.to(x.dtype)
    return shrunk


def lora_expand_ref(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, token_slots: torch.Tensor,
                    slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor,
                    out_col_start: int = 0, groups: Groups | None = None) -> None:
    """out[t, start:start+W] += scale_s * shrunk[t, :r] @ B_s, in place (W = b_rows' width)."""
    _check_shapes(shrunk, b_rows, token_slots.shape[0], "lora_expand")
    width = b_rows.shape[1]
    if out_col_start < 0 or out_col_start + width > out.shape[1]:
        raise LoraShapeError(f"lora_expand: columns {out_col_start}:{out_col_start + width} "
                             f"outside an output of width {out.shape[1]}")
    if out.shape[0] == 0:
        return
    groups = token_groups(token_slots) if groups is None else groups
    offsets, ranks, scales = slot_offsets.tolist(), slot_ranks.tolist(), slot_scales.tolist()
    # A view: in-place ops on it write through to `out` (a fused qkv / gate_up output may be wider).
    target = out[:, out_col_start:out_col_start + width]
    exact = out.dtype == shrunk.dtype == b_rows.dtype == torch.float32
    for slot, tokens, span in _targeted(groups, ranks):
        offset, rank, scale = offsets[slot], ranks[slot], scales[slot]
        b = b_rows[offset:offset + rank]
        if exact and span:
            target[span[0]:span[1]].addmm_(shrunk[span[0]:span[1], :rank], b, alpha=scale)
            continue
        coefficients = shrunk[span[0]:span[1], :rank] if span else shrunk.index_select(0, tokens)[:, :rank]
        delta = coefficients.float() @ b.float()
        if exact:
            target.index_add_(0, tokens, delta, alpha=scale)
        elif span:
            target[span[0]:span[1]] += (delta * scale).to(out.dtype)
        else:
            target.index_add_(0, tokens, (delta * scale).to(out.dtype))


def _segment_bounds(seg_starts: torch.Tensor, seg_slots: torch.Tensor, token_count: int) -> list[tuple[int, int, int]]:
    starts = seg_starts.tolist()
    if len(starts) != seg_slots.shape[0] + 1:
        raise LoraShapeError(f"sgmv: {len(starts)} segment starts for {seg_slots.shape[0]} segments (need S+1)")
    if starts and (starts[0] != 0 or starts[-1] != token_count):
        raise LoraShapeError(f"sgmv: segments cover tokens {starts[0]}:{starts[-1]}, the batch has {token_count}")
    return [(begin, end, slot) for begin, end, slot in zip(starts[:-1], starts[1:], seg_slots.tolist(), strict=True)
            if end > begin and slot >= 0]


def lora_shrink_sgmv_ref(x: torch.Tensor, a_rows: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                         slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> torch.Tensor:
    """Segment form of `lora_shrink_ref`: one matmul per segment on its contiguous tokens."""
    shrunk = torch.zeros(x.shape[0], max_rank, dtype=x.dtype, device=x.device)
    offsets, ranks = slot_offsets.tolist(), slot_ranks.tolist()
    for begin, end, slot in _segment_bounds(seg_starts, seg_slots, x.shape[0]):
        offset, rank = offsets[slot], ranks[slot]
        if rank:
            shrunk[begin:end, :rank] = (x[begin:end].float() @ a_rows[offset:offset + rank].float().T).to(x.dtype)
    return shrunk


def lora_expand_sgmv_ref(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, seg_starts: torch.Tensor,
                         seg_slots: torch.Tensor, slot_offsets: torch.Tensor, slot_ranks: torch.Tensor,
                         slot_scales: torch.Tensor, out_col_start: int = 0) -> None:
    """Segment form of `lora_expand_ref`: one matmul per segment, added in place."""
    width = b_rows.shape[1]
    if out_col_start < 0 or out_col_start + width > out.shape[1]:
        raise LoraShapeError(f"lora_expand_sgmv: columns {out_col_start}:{out_col_start + width} "
                             f"outside an output of width {out.shape[1]}")
    offsets, ranks, scales = slot_offsets.tolist(), slot_ranks.tolist(), slot_scales.tolist()
    for begin, end, slot in _segment_bounds(seg_starts, seg_slots, out.shape[0]):
        offset, rank = offsets[slot], ranks[slot]
        if rank:
            delta = (shrunk[begin:end, :rank].float() @ b_rows[offset:offset + rank].float()) * scales[slot]
            out[begin:end, out_col_start:out_col_start + width] += delta.to(out.dtype)


def lora_shrink(x: torch.Tensor, a_rows: torch.Tensor, token_slots: torch.Tensor, slot_offsets: torch.Tensor,
                slot_ranks: torch.Tensor, max_rank: int, groups: Groups | None = None) -> torch.Tensor:
    """Per-token shrink on the chosen backend (see `kernel_backend`)."""
    if kernel_backend() == "triton":
        from longtail.kernels.lora_triton import lora_shrink_triton

        return lora_shrink_triton(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank)
    return lora_shrink_ref(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank, groups)


def lora_expand(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, token_slots: torch.Tensor,
                slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor,
                out_col_start: int = 0, groups: Groups | None = None) -> None:
    """Per-token expand, added in place into out[:, start:start+W], on the chosen backend."""
    if kernel_backend() == "triton":
        from longtail.kernels.lora_triton import lora_expand_triton

        lora_expand_triton(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, out_col_start)
        return
    lora_expand_ref(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, out_col_start, groups)


def lora_shrink_sgmv(x: torch.Tensor, a_rows: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                     slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> torch.Tensor:
    """Per-segment shrink on the chosen backend."""
    if kernel_backend() == "triton":
        from longtail.kernels.lora_triton import lora_shrink_sgmv_triton

        return lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, max_rank)
    return lora_shrink_sgmv_ref(x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, max_rank)


def lora_expand_sgmv(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, seg_starts: torch.Tensor,
                     seg_slots: torch.Tensor, slot_offsets: torch.Tensor, slot_ranks: torch.Tensor,
                     slot_scales: torch.Tensor, out_col_start: int = 0) -> None:
    """Per-segment expand, added in place, on the chosen backend."""
    if kernel_backend() == "triton":
        from longtail.kernels.lora_triton import lora_expand_sgmv_triton

        lora_expand_sgmv_triton(out, shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, slot_scales,
                                out_col_start)
        return
    lora_expand_sgmv_ref(out, shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, slot_scales,
                         out_col_start)


def prefers_segments(token_count: int, segments: Segments) -> bool:
    """True when the batch is long runs of one adapter (prefill), where SGMV's tiles pay off."""
    segment_count = segments[1].shape[0]
    return token_count >= SGMV_MIN_TOKENS and segment_count * SGMV_MIN_AVERAGE_RUN <= token_count


def add_lora(out: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
             token_slots: torch.Tensor, slot_offsets: torch.Tensor, slot_ranks: torch.Tensor,
             slot_scales: torch.Tensor, max_rank: int, out_col_start: int = 0, groups: Groups | None = None,
             segments: Segments | None = None, per_token: bool = False) -> None:
    """out[:, start:start+W] += scale * (x A^T) B per token's adapter slot, in place.

    Torch backend: the grouped reference (`groups`, from `token_groups`, skips
    regrouping). Triton backend: SGMV when the tokens form long runs of one slot,
    BGMV otherwise. For batches of at least SGMV_MIN_TOKENS the runs come from
    `segments`, else from `groups` (on the host, cached per step), else from
    `segments_from_token_slots` (one device sync). `per_token` (Triton only) always takes BGMV, which reads
    each token's slot on the device: a CUDA graph's replay must not depend on the host's grouping.
    """
    token_count = token_slots.shape[0]
    if max_rank == 0 or token_count == 0:
        return
    if kernel_backend() == "torch":
        shrunk = lora_shrink_ref(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank, groups)
        lora_expand_ref(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, out_col_start,
                        groups)
        return
    from longtail.kernels import lora_triton

    longest = None
    if segments is None and token_count >= SGMV_MIN_TOKENS and not per_token:
        if isinstance(groups, TokenGroups):
            segments = groups.segments()  # host-side and cached per step; None when a slot's tokens are split
            longest = groups.longest_segment  # known on the host: the launches then read nothing back
        else:
            segments = segments_from_token_slots(token_slots)
    if segments is not None and not per_token and prefers_segments(token_count, segments):
        seg_starts, seg_slots = segments
        shrunk = lora_triton.lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks,
                                                     max_rank, longest=longest)
        lora_triton.lora_expand_sgmv_triton(out, shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks,
                                            slot_scales, out_col_start, longest=longest)
        return
    shrunk = lora_triton.lora_shrink_triton(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank)
    lora_triton.lora_expand_triton(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales,
                                   out_col_start)


# --- the CPU engine's path: runs of one slot, weights as per-slot views ---------------------------------------

Runs = list[tuple[int, int, int]]   # (slot, begin, end): tokens begin:end all use `slot`; slot >= 0
SlotWeights = tuple[torch.Tensor, torch.Tensor, float]  # (A^T [in, r], B^T [r, out], scale), views into the stacks


def runs_of(token_slots: list[int]) -> Runs:
    """Maximal runs of one adapter slot in token order, base-only tokens (-1) left out; host-side, no tensors."""
    runs: Runs = []
    begin = 0
    for index in range(1, len(token_slots) + 1):
        if index == len(token_slots) or token_slots[index] != token_slots[begin]:
            if token_slots[begin] >= 0:
                runs.append((token_slots[begin], begin, index))
            begin = index
    return runs


def slot_weights(a_rows: torch.Tensor, b_rows: torch.Tensor, slot_offsets: list[int], slot_ranks: list[int],
                 slot_scales: list[float]) -> list[SlotWeights | None]:
    """Per slot, views of its rows in the stacked buffers (None where the slot does not target this projection).

    Built once when adapters are loaded, so a step slices nothing but activations.
    """
    views: list[SlotWeights | None] = []
    for offset, rank, scale in zip(slot_offsets, slot_ranks, slot_scales, strict=True):
        views.append((a_rows[offset:offset + rank].T, b_rows[offset:offset + rank], float(scale)) if rank else None)
    return views


def add_lora_runs(out: torch.Tensor, x: torch.Tensor, runs: Runs, weights: list[SlotWeights | None],
                  out_col_start: int = 0) -> None:
    """out[t, start:start+W] += scale_s * (x[t] A_s^T) B_s^T for each run's slot s, in place; fp32 exact.

    Same sum as `lora_shrink_ref` + `lora_expand_ref`, with two matmuls per run and no
    intermediate buffer: on a CPU a decode step meets one small matmul pair per adapter
    per projection, so the calls around them are what cost.
    """
    width = None
    target = out
    for slot, begin, end in runs:
        held = weights[slot]
        if held is None:
            continue
        a_t, b, scale = held
        if width is None:
            width = b.shape[1]
            if out_col_start < 0 or out_col_start + width > out.shape[1]:
                raise LoraShapeError(f"add_lora_runs: columns {out_col_start}:{out_col_start + width} "
                                     f"outside an output of width {out.shape[1]}")
            if out_col_start or width != out.shape[1]:
                target = out[:, out_col_start:out_col_start + width]
        target[begin:end].addmm_(x[begin:end] @ a_t, b, alpha=scale)
