"""Batched multi-LoRA shrink / expand: pure-torch references (the CPU path) and the dispatch.

Weight layout (no padding to a maximum rank): every targeted projection has a
stacked buffer of rank rows. Adapter slot `s` owns rows
`slot_offsets[s] : slot_offsets[s] + slot_ranks[s]` of `a_rows` (its PEFT
`lora_A`, `[rank, in]`) and of `b_rows` (its `lora_B` transposed, `[rank, out]`);
a rank of 0 means the adapter does not target this projection. Tokens carry a
slot index, -1 for none.
"""

from __future__ import annotations

import os

import torch


def kernel_backend() -> str:
    """"triton" on CUDA, "torch" elsewhere; LONGTAIL_KERNELS=torch|triton forces one."""
    forced = os.environ.get("LONGTAIL_KERNELS")
    if forced in ("torch", "triton"):
        return forced
    return "triton" if torch.cuda.is_available() else "torch"


def token_groups(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, token indices) for every slot present; one stable sort, no per-token loop.

    Callers that apply many projections to the same batch compute this once per
    step and pass it as `groups`, so the grouping is not redone 7 × layers times.
    """
    slots = token_slots.to(torch.int64)
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    present, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    groups, start = [], 0
    for slot, count in zip(present.tolist(), counts.tolist(), strict=True):
        if slot >= 0:
            groups.append((slot, order[start:start + count]))
        start += count
    return groups


def _token_groups(token_slots: torch.Tensor, slot_ranks: torch.Tensor, groups=None):
    groups = token_groups(token_slots) if groups is None else groups
    return [(slot, tokens) for slot, tokens in groups if int(slot_ranks[slot]) != 0]


def lora_shrink_ref(x: torch.Tensor, a_rows: torch.Tensor, token_slots: torch.Tensor, slot_offsets: torch.Tensor,
                    slot_ranks: torch.Tensor, max_rank: int, groups=None) -> torch.Tensor:
    """shrunk[t, :r] = x[t] @ A_s^T for the token's slot s (rank r); zeros elsewhere."""
    shrunk = torch.zeros(x.shape[0], max_rank, dtype=x.dtype, device=x.device)
    for slot, tokens in _token_groups(token_slots, slot_ranks, groups):
        offset, rank = int(slot_offsets[slot]), int(slot_ranks[slot])
        shrunk[tokens, :rank] = (x[tokens].float() @ a_rows[offset:offset + rank].float().T).to(x.dtype)
    return shrunk


def lora_expand_ref(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, token_slots: torch.Tensor,
                    slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor,
                    out_col_start: int = 0, groups=None) -> None:
    """out[t, start:start+W] += scale_s * shrunk[t, :r] @ B_s, in place."""
    width = b_rows.shape[1]
    for slot, tokens in _token_groups(token_slots, slot_ranks, groups):
        offset, rank = int(slot_offsets[slot]), int(slot_ranks[slot])
        delta = (shrunk[tokens, :rank].float() @ b_rows[offset:offset + rank].float()) * float(slot_scales[slot])
        out[tokens, out_col_start:out_col_start + width] += delta.to(out.dtype)


def segments_from_token_slots(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal slot: (seg_starts [S+1], seg_slots [S]) for the SGMV form."""
    slots = token_slots.to(torch.int64)
    if slots.numel() == 0:
        return torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    change = torch.ones_like(slots, dtype=torch.bool)
    change[1:] = slots[1:] != slots[:-1]
    starts = torch.nonzero(change, as_tuple=True)[0]
    seg_starts = torch.cat([starts, torch.tensor([slots.numel()], device=slots.device)])
    return seg_starts, slots[starts]


def _expand_segments(seg_starts: torch.Tensor, seg_slots: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (seg_starts[1:] - seg_starts[:-1]).to(torch.int64)
    return torch.repeat_interleave(seg_slots.to(torch.int64), lengths, output_size=total)


def lora_shrink_sgmv_ref(x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, max_rank: int):
    return lora_shrink_ref(x, a_rows, _expand_segments(seg_starts, seg_slots, x.shape[0]), slot_offsets,
                           slot_ranks, max_rank)


def lora_expand_sgmv_ref(out, shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, slot_scales,
                         out_col_start: int = 0) -> None:
    lora_expand_ref(out, shrunk, b_rows, _expand_segments(seg_starts, seg_slots, out.shape[0]), slot_offsets,
                    slot_ranks, slot_scales, out_col_start)


def lora_shrink(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank: int, groups=None) -> torch.Tensor:
    if kernel_backend() == "triton":
        from kernels.lora_triton import lora_shrink_triton

        return lora_shrink_triton(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank)
    return lora_shrink_ref(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank, groups)


def lora_expand(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, out_col_start: int = 0,
                groups=None):
    if kernel_backend() == "triton":
        from kernels.lora_triton import lora_expand_triton

        return lora_expand_triton(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales,
                                  out_col_start)
    return lora_expand_ref(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, out_col_start,
                           groups)


def add_lora(out, x, a_rows, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, max_rank: int,
             out_col_start: int = 0, groups=None) -> None:
    """out[:, start:start+W] += scale * (x A^T) B per token's adapter slot, in place.

    `groups` (from `token_groups(token_slots)`) lets the torch path skip regrouping.
    """
    if max_rank == 0 or token_slots.numel() == 0:
        return
    shrunk = lora_shrink(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank, groups)
    lora_expand(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales, out_col_start, groups)
