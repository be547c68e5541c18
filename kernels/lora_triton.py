"""Triton kernels for batched multi-LoRA: BGMV (one program per token) and SGMV (per segment tile).

Weight layout as in `kernels.lora`: stacked rank rows, slot `s` owns rows
`offsets[s] : offsets[s] + ranks[s]`. Mixed ranks share one launch without
padding the work: every program reads its slot's rank and loops only over
`cdiv(rank, BLOCK_R)` row blocks, and programs of base-only tokens (slot -1)
or untargeted slots (rank 0) return before touching weights. Every tile is
masked, so hidden sizes need not be multiples of the block sizes. Loads keep
their dtype (fp32/fp16/bf16); products accumulate in fp32.

Each `*_triton` launcher here has its pure-torch twin `*_ref` in `kernels.lora`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from longtail.kernels.lora import LoraShapeError


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, slots_ptr, offsets_ptr, ranks_ptr, out_ptr, hidden, max_rank, k_per_split,
                        stride_x, stride_a, stride_out, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        ATOMIC: tl.constexpr):
    """Program (token, k split): out[token, :rank] (+)= x[token, ks] @ A[rows, ks]^T, rank rows only."""
    token = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    # A rank above max_rank is a caller error; clamping keeps every access inside the buffers.
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    if rank <= 0:
        return
    offset = tl.load(offsets_ptr + slot).to(tl.int64)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, hidden)
    x_row = x_ptr + token.to(tl.int64) * stride_x
    # Rank blocks outside, K inside: the accumulator is one BLOCK_R vector, and the
    # loop count follows this token's own rank, so a rank-8 token does rank-8 work.
    for r in range(0, tl.cdiv(rank, BLOCK_R)):
        rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            col_ok = cols < k_end
            x = tl.load(x_row + cols, mask=col_ok, other=0.0)
            a = tl.load(a_ptr + (offset + rows)[:, None] * stride_a + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        target = out_ptr + token.to(tl.int64) * stride_out + rows
        if ATOMIC:
            tl.atomic_add(target, acc, mask=row_ok)
        else:
            tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _bgmv_expand_kernel(shrunk_ptr, b_ptr, slots_ptr, offsets_ptr, ranks_ptr, scales_ptr, out_ptr, width,
                        max_rank, col_start, stride_shrunk, stride_b, stride_out, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """Program (token, output tile): out[token, tile] += scale * shrunk[token, :rank] @ B[rows, tile]."""
    token = tl.program_id(0)
    n_block = tl.program_id(1)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    if rank <= 0:
        return
    offset = tl.load(offsets_ptr + slot).to(tl.int64)
    scale = tl.load(scales_ptr + slot)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(0, tl.cdiv(rank, BLOCK_R)):
        rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < rank
        s = tl.load(shrunk_ptr + token.to(tl.int64) * stride_shrunk + rows, mask=row_ok, other=0.0)
        b = tl.load(b_ptr + (offset + rows)[:, None] * stride_b + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * s.to(tl.float32)[:, None], axis=0)
    target = out_ptr + token.to(tl.int64) * stride_out + col_start + cols
    current = tl.load(target, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(target, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, seg_starts_ptr, seg_slots_ptr, offsets_ptr, ranks_ptr, out_ptr, hidden,
                        max_rank, stride_x, stride_a, stride_out, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (token tile, rank block, segment): a [BLOCK_M, BLOCK_R] tile of x @ A^T through tl.dot."""
    m_block = tl.program_id(0)
    r_block = tl.program_id(1)
    segment = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + segment).to(tl.int64)
    if slot < 0:
        return
    begin = tl.load(seg_starts_ptr + segment)
    end = tl.load(seg_starts_ptr + segment + 1)
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    r_start = r_block * BLOCK_R
    # Tiles past this segment's length or this slot's rank (grid sized for the longest / largest) leave at once.
    if begin + m_block * BLOCK_M >= end or r_start >= rank:
        return
    offset = tl.load(offsets_ptr + slot).to(tl.int64)
    tokens = (begin + m_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    token_ok = tokens < end
    rows = r_start + tl.arange(0, BLOCK_R)
    row_ok = rows < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        cols = k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < hidden
        x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :],
                    mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptr + (offset + rows)[None, :] * stride_a + cols[:, None],
                    mask=row_ok[None, :] & col_ok[:, None], other=0.0)
        acc += tl.dot(x, a.to(x.dtype), input_precision=DOT_PRECISION)
    tl.store(out_ptr + tokens[:, None] * stride_out + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & row_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(shrunk_ptr, b_ptr, seg_starts_ptr, seg_slots_ptr, offsets_ptr, ranks_ptr, scales_ptr,
                        out_ptr, width, max_rank, col_start, stride_shrunk, stride_b, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Program (token tile, output tile, segment): out tile += scale * shrunk tile @ B tile, over rank blocks."""
    m_block = tl.program_id(0)
    n_block = tl.program_id(1)
    segment = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + segment).to(tl.int64)
    if slot < 0:
        return
    begin = tl.load(seg_starts_ptr + segment)
    end = tl.load(seg_starts_ptr + segment + 1)
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    if begin + m_block * BLOCK_M >= end or rank <= 0:
        return
    offset = tl.load(offsets_ptr + slot).to(tl.int64)
    scale = tl.load(scales_ptr + slot)
    tokens = (begin + m_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    token_ok = tokens < end
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, tl.cdiv(rank, BLOCK_R)):
        rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < rank
        s = tl.load(shrunk_ptr + tokens[:, None] * stride_shrunk + rows[None, :],
                    mask=token_ok[:, None] & row_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (offset + rows)[:, None] * stride_b + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(s, b.to(s.dtype), input_precision=DOT_PRECISION)
    target = out_ptr + tokens[:, None] * stride_out + col_start + cols[None, :]
    both = token_ok[:, None] & col_ok[None, :]
    current = tl.load(target, mask=both, other=0.0).to(tl.float32)
    tl.store(target, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=both)


def _check_inputs(what: str, activations: torch.Tensor, rows: torch.Tensor, count: int, *index_tensors) -> None:
    if activations.dim() != 2 or rows.dim() != 2:
        raise LoraShapeError(f"{what}: expected 2-D tensors, got {tuple(activations.shape)} and {tuple(rows.shape)}")
    if activations.shape[0] != count:
        raise LoraShapeError(f"{what}: {activations.shape[0]} rows of activations for {count} tokens")
    if activations.stride(-1) != 1 or rows.stride(-1) != 1:
        raise LoraShapeError(f"{what}: the last dimension must be contiguous "
                             f"(strides {activations.stride()} and {rows.stride()})")
    for tensor in index_tensors:
        if tensor.device != activations.device:
            raise LoraShapeError(f"{what}: index tensor on {tensor.device}, activations on {activations.device}")


def _check_columns(what: str, out: torch.Tensor, width: int, out_col_start: int) -> None:
    if out.stride(-1) != 1:
        raise LoraShapeError(f"{what}: the output's last dimension must be contiguous (strides {out.stride()})")
    if out_col_start < 0 or out_col_start + width > out.shape[1]:
        raise LoraShapeError(f"{what}: columns {out_col_start}:{out_col_start + width} "
                             f"outside an output of width {out.shape[1]}")


def _rank_block(max_rank: int) -> int:
    """Rank rows per block: the rank itself up to 64 (tl.dot needs at least 16)."""
    return max(16, min(64, triton.next_power_of_2(max(max_rank, 1))))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply exactly (tensor-core tf32 would drift from the reference); halves are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _processor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _shrink_splits(tokens: int, hidden: int, device: torch.device, block_k: int) -> int:
    """K splits so a small decode batch still fills the GPU (≈4 programs per SM); 1 on CPU."""
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(4 * _processor_count(device.index or 0), tokens)
    return max(1, min(wanted, triton.cdiv(hidden, 4 * block_k)))


def lora_shrink_triton(x: torch.Tensor, a_rows: torch.Tensor, token_slots: torch.Tensor, slot_offsets: torch.Tensor,
                       slot_ranks: torch.Tensor, max_rank: int, splits: int | None = None) -> torch.Tensor:
    """BGMV shrink: one program per (token, K split); slot -1 returns at once. Returns [T, max_rank], x's dtype.

    With `splits` > 1 the partial sums meet in an fp32 buffer by atomic adds (used
    on CUDA when the batch is too small to fill the device).
    """
    tokens, hidden = x.shape
    _check_inputs("lora_shrink", x, a_rows, token_slots.shape[0], token_slots, slot_offsets, slot_ranks)
    if tokens == 0 or max_rank == 0:
        return torch.zeros(tokens, max_rank, dtype=x.dtype, device=x.device)
    block_k = 128 if x.is_cuda else 64
    splits = splits or _shrink_splits(tokens, hidden, x.device, block_k)
    k_per_split = triton.cdiv(triton.cdiv(hidden, splits), block_k) * block_k
    splits = triton.cdiv(hidden, k_per_split)
    atomic = splits > 1
    shrunk = torch.zeros(tokens, max_rank, dtype=torch.float32 if atomic else x.dtype, device=x.device)
    _bgmv_shrink_kernel[(tokens, splits)](
        x, a_rows, token_slots, slot_offsets, slot_ranks, shrunk, hidden, max_rank, k_per_split,
        x.stride(0), a_rows.stride(0), shrunk.stride(0),
        BLOCK_R=min(32, max(4, triton.next_power_of_2(max_rank))), BLOCK_K=block_k, ATOMIC=atomic)
    return shrunk.to(x.dtype) if atomic else shrunk


def lora_expand_triton(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, token_slots: torch.Tensor,
                       slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor,
                       out_col_start: int = 0) -> None:
    """BGMV expand: one program per (token, output tile), adding scale · shrunk @ B into out in place."""
    _check_inputs("lora_expand", shrunk, b_rows, token_slots.shape[0], token_slots, slot_offsets, slot_ranks)
    width = b_rows.shape[1]
    _check_columns("lora_expand", out, width, out_col_start)
    tokens = out.shape[0]
    if tokens == 0 or width == 0:
        return
    block_n = 128 if out.is_cuda else 64
    grid = (tokens, triton.cdiv(width, block_n))
    _bgmv_expand_kernel[grid](shrunk, b_rows, token_slots, slot_offsets, slot_ranks,
                              slot_scales.to(torch.float32), out, width, shrunk.shape[1], out_col_start,
                              shrunk.stride(0), b_rows.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_R=16)


def _longest_segment(seg_starts: torch.Tensor, segments: int, tokens: int, longest: int | None = None) -> int:
    if seg_starts.shape[0] != segments + 1:
        raise LoraShapeError(f"sgmv: {seg_starts.shape[0]} segment starts for {segments} segments (need S+1)")
    if longest is not None:  # the caller knows it on the host (kernels.TokenGroups): no device read
        if longest < 0 or longest > tokens:
            raise LoraShapeError(f"sgmv: longest segment {longest} outside 0..{tokens}")
        return longest if segments else 0
    # One host read per launch when the caller does not know the longest segment.
    return int((seg_starts[1:] - seg_starts[:-1]).max()) if segments else 0


def lora_shrink_sgmv_triton(x: torch.Tensor, a_rows: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                            slot_offsets: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int,
                            longest: int | None = None) -> torch.Tensor:
    """SGMV shrink: one program per (token tile, rank block, segment), tiles through tl.dot.

    `longest` (the longest segment's tokens, a host int; an under-estimate drops tokens) sizes the grid;
    without it the launcher reads it from `seg_starts`, a device sync.
    """
    tokens, hidden = x.shape
    _check_inputs("lora_shrink_sgmv", x, a_rows, tokens, seg_starts, seg_slots, slot_offsets, slot_ranks)
    shrunk = torch.zeros(tokens, max_rank, dtype=x.dtype, device=x.device)
    segments = seg_slots.shape[0]
    longest = _longest_segment(seg_starts, segments, tokens, longest)
    if longest <= 0 or max_rank == 0:
        return shrunk
    block_m, block_r = (32, _rank_block(max_rank)) if x.is_cuda else (16, _rank_block(max_rank))
    grid = (triton.cdiv(longest, block_m), triton.cdiv(max_rank, block_r), segments)
    _sgmv_shrink_kernel[grid](x, a_rows, seg_starts, seg_slots, slot_offsets, slot_ranks, shrunk, hidden,
                              max_rank, x.stride(0), a_rows.stride(0), shrunk.stride(0), BLOCK_M=block_m,
                              BLOCK_R=block_r, BLOCK_K=64 if x.is_cuda else 32,
                              DOT_PRECISION=_dot_precision(x.dtype))
    return shrunk


def lora_expand_sgmv_triton(out: torch.Tensor, shrunk: torch.Tensor, b_rows: torch.Tensor, seg_starts: torch.Tensor,
                            seg_slots: torch.Tensor, slot_offsets: torch.Tensor, slot_ranks: torch.Tensor,
                            slot_scales: torch.Tensor, out_col_start: int = 0, longest: int | None = None) -> None:
    """SGMV expand: one program per (token tile, output tile, segment), added into out in place (`longest`
    as in `lora_shrink_sgmv_triton`)."""
    tokens = out.shape[0]
    _check_inputs("lora_expand_sgmv", shrunk, b_rows, tokens, seg_starts, seg_slots, slot_offsets, slot_ranks)
    width = b_rows.shape[1]
    _check_columns("lora_expand_sgmv", out, width, out_col_start)
    segments = seg_slots.shape[0]
    longest = _longest_segment(seg_starts, segments, tokens, longest)
    if longest <= 0 or width == 0:
        return
    block_m, block_n = (32, 64) if out.is_cuda else (16, 32)
    grid = (triton.cdiv(longest, block_m), triton.cdiv(width, block_n), segments)
    _sgmv_expand_kernel[grid](shrunk, b_rows, seg_starts, seg_slots, slot_offsets, slot_ranks,
                              slot_scales.to(torch.float32), out, width, shrunk.shape[1], out_col_start,
                              shrunk.stride(0), b_rows.stride(0), out.stride(0), BLOCK_M=block_m,
                              BLOCK_N=block_n, BLOCK_R=16, DOT_PRECISION=_dot_precision(shrunk.dtype))
