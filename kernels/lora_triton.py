"""Triton kernels for batched multi-LoRA: BGMV-style (per token) and SGMV-style (per segment).

Weight layout as in `kernels.lora`: stacked rank rows, slot `s` owns rows
`offsets[s] : offsets[s] + ranks[s]`. Mixed ranks share one launch without
padding the work: each program reads its slot's rank and loops only over that
many rows (`tl.cdiv(rank, BLOCK_R)` iterations), and programs of base-only
tokens (slot -1) or untargeted slots (rank 0) return before touching memory.
Tiles are masked, so hidden sizes need not be multiples of the block sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, slots_ptr, offsets_ptr, ranks_ptr, out_ptr, hidden, max_rank,
                        stride_x, stride_a, stride_out, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    r_block = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    r_start = r_block * BLOCK_R
    if r_start >= rank:
        return
    offset = tl.load(offsets_ptr + slot)
    rows = r_start + tl.arange(0, BLOCK_R)
    row_ok = rows < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        cols = k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < hidden
        x = tl.load(x_ptr + token * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (offset + rows)[:, None] * stride_a + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(out_ptr + token * stride_out + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok & (rows < max_rank))


@triton.jit
def _bgmv_expand_kernel(shrunk_ptr, b_ptr, slots_ptr, offsets_ptr, ranks_ptr, scales_ptr, out_ptr, width,
                        col_start, stride_shrunk, stride_b, stride_out, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    token = tl.program_id(0)
    n_block = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    offset = tl.load(offsets_ptr + slot)
    scale = tl.load(scales_ptr + slot)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(0, tl.cdiv(rank, BLOCK_R)):
        rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < rank
        s = tl.load(shrunk_ptr + token * stride_shrunk + rows, mask=row_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + (offset + rows)[:, None] * stride_b + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * s[:, None], axis=0)
    target = out_ptr + token * stride_out + col_start + cols
    current = tl.load(target, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(target, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, seg_starts_ptr, seg_slots_ptr, offsets_ptr, ranks_ptr, out_ptr, hidden,
                        stride_x, stride_a, stride_out, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    segment = tl.program_id(0)
    r_block = tl.program_id(1)
    slot = tl.load(seg_slots_ptr + segment)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    r_start = r_block * BLOCK_R
    if r_start >= rank:
        return
    begin = tl.load(seg_starts_ptr + segment)
    end = tl.load(seg_starts_ptr + segment + 1)
    offset = tl.load(offsets_ptr + slot)
    rows = r_start + tl.arange(0, BLOCK_R)
    row_ok = rows < rank
    for m in range(0, tl.cdiv(end - begin, BLOCK_M)):
        tokens = begin + m * BLOCK_M + tl.arange(0, BLOCK_M)
        token_ok = tokens < end
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, tl.cdiv(hidden, BLOCK_K)):
            cols = k * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < hidden
            x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :],
                        mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + (offset + rows)[None, :] * stride_a + cols[:, None],
                        mask=row_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(x, a)
        tl.store(out_ptr + tokens[:, None] * stride_out + rows[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=token_ok[:, None] & row_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(shrunk_ptr, b_ptr, seg_starts_ptr, seg_slots_ptr, offsets_ptr, ranks_ptr, scales_ptr,
                        out_ptr, width, col_start, stride_shrunk, stride_b, stride_out, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    segment = tl.program_id(0)
    n_block = tl.program_id(1)
    slot = tl.load(seg_slots_ptr + segment)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    begin = tl.load(seg_starts_ptr + segment)
    end = tl.load(seg_starts_ptr + segment + 1)
    offset = tl.load(offsets_ptr + slot)
    scale = tl.load(scales_ptr + slot)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    for m in range(0, tl.cdiv(end - begin, BLOCK_M)):
        tokens = begin + m * BLOCK_M + tl.arange(0, BLOCK_M)
        token_ok = tokens < end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, tl.cdiv(rank, BLOCK_R)):
            rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < rank
            s = tl.load(shrunk_ptr + tokens[:, None] * stride_shrunk + rows[None, :],
                        mask=token_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr + (offset + rows)[:, None] * stride_b + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(s, b)
        target = out_ptr + tokens[:, None] * stride_out + col_start + cols[None, :]
        both = token_ok[:, None] & col_ok[None, :]
        current = tl.load(target, mask=both, other=0.0).to(tl.float32)
        tl.store(target, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=both)


def _check(x: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    if x.stride(-1) != 1 or rows.stride(-1) != 1:
        raise ValueError(f"{what}: the last dimension must be contiguous")


def _rank_block(max_rank: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(max_rank, 1))))


def lora_shrink_triton(x, a_rows, token_slots, slot_offsets, slot_ranks, max_rank: int) -> torch.Tensor:
    """BGMV shrink: one program per (token, rank block); tokens with slot -1 return at once."""
    _check(x, a_rows, "lora_shrink")
    tokens, hidden = x.shape
    shrunk = torch.zeros(tokens, max_rank, dtype=x.dtype, device=x.device)
    if tokens == 0 or max_rank == 0:
        return shrunk
    block_r = _rank_block(max_rank)
    grid = (tokens, triton.cdiv(max_rank, block_r))
    _bgmv_shrink_kernel[grid](x, a_rows, token_slots, slot_offsets, slot_ranks, shrunk, hidden, max_rank,
                              x.stride(0), a_rows.stride(0), shrunk.stride(0), BLOCK_R=block_r, BLOCK_K=64)
    return shrunk


def lora_expand_triton(out, shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales,
                       out_col_start: int = 0) -> None:
    """BGMV expand: one program per (token, output tile), adding scale · shrunk @ B in place."""
    _check(out, b_rows, "lora_expand")
    tokens = out.shape[0]
    width = b_rows.shape[1]
    if tokens == 0:
        return
    grid = (tokens, triton.cdiv(width, 64))
    _bgmv_expand_kernel[grid](shrunk, b_rows, token_slots, slot_offsets, slot_ranks, slot_scales.float(), out,
                              width, out_col_start, shrunk.stride(0), b_rows.stride(0), out.stride(0),
                              BLOCK_N=64, BLOCK_R=16)


def lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, max_rank: int):
    """SGMV shrink: one program per (segment, rank block), tiles of BLOCK_M tokens through tl.dot."""
    _check(x, a_rows, "lora_shrink_sgmv")
    tokens, hidden = x.shape
    shrunk = torch.zeros(tokens, max_rank, dtype=x.dtype, device=x.device)
    segments = seg_slots.numel()
    if segments == 0 or max_rank == 0:
        return shrunk
    block_r = _rank_block(max_rank)
    grid = (segments, triton.cdiv(max_rank, block_r))
    _sgmv_shrink_kernel[grid](x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, shrunk, hidden,
                              x.stride(0), a_rows.stride(0), shrunk.stride(0), BLOCK_M=16, BLOCK_R=block_r,
                              BLOCK_K=32)
    return shrunk


def lora_expand_sgmv_triton(out, shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, slot_scales,
                            out_col_start: int = 0) -> None:
    _check(out, b_rows, "lora_expand_sgmv")
    segments = seg_slots.numel()
    width = b_rows.shape[1]
    if segments == 0:
        return
    grid = (segments, triton.cdiv(width, 32))
    _sgmv_expand_kernel[grid](shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, slot_scales.float(),
                              out, width, out_col_start, shrunk.stride(0), b_rows.stride(0), out.stride(0),
                              BLOCK_M=16, BLOCK_N=32, BLOCK_R=16)
