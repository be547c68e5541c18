"""Paged attention on the GPU: Triton kernels that read keys and values in place through the block table.

Cache layout, as `serving.kv_cache.PagedKVCache` holds one layer: `key_cache`, `value_cache`
`[slots, KV, D]`, position `p` of a sequence with block table `table` in slot
`table[p // block_size] * block_size + p % block_size`. Block tables are `[rows, W]` int64
(padding entries past a row's length are never read). Queries are `[tokens, H, D]` with
`H = KV * group` (GQA: query head `h` reads KV head `h // group`); rows may be strided views into
a fused qkv output as long as each head's `D` values are contiguous.

Two calls, each beside its pure-torch reference (`*_ref`, a per-row loop in fp32: the definition):
- `paged_decode_attention_triton`: one query token per row over its first `context_lens[b]`
  cached positions. Split-KV (flash-decoding): `grid = (rows, KV, splits)`, each program takes
  all `group` query heads of one KV head (one read of each key serves the whole group) over a
  range of positions, then a second launch merges the splits by their log-sum-exp. The number
  of splits comes from the table's width (known on the host), never from `context_lens`, so
  the launcher reads nothing back from the device.
- `paged_extend_attention_triton`: the prefill / extend form. Segment `s` holds query tokens
  `query_starts[s] : query_starts[s+1]` at positions `prefix_lens[s] + i`; their own keys and
  values are already in the cache (the model writes them first), so token `i` attends to
  positions `[0, prefix_lens[s] + i]`: causal within the chunk, full over the prefix. One
  launch covers every segment: `grid = (segments, query tiles, KV)`, a tile being
  `BLOCK_Q` tokens × the group's heads, so a tile of `BLOCK_Q * group` rows shares each key tile
  (the layout of vLLM's unified attention). `max_query_len` sizes the grid and is a host int.

Softmax runs online in fp32 with exp2; loads keep their dtype (fp32/fp16/bf16), fp32 products
are exact (`ieee`, not tf32) so the fp32 path matches its reference to rounding.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


class PagedAttentionShapeError(ValueError):
    """Tensors handed to a paged-attention kernel disagree on a shape or dtype."""


# --------------------------------------------------------------------------------------------------
# References: the definition, row by row, in fp32.


def _positions_to_slots(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(length, device=table.device)
    return table[positions // block_size].to(torch.int64) * block_size + positions % block_size


def paged_decode_attention_ref(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               block_size: int) -> torch.Tensor:
    """[B, H, D] -> [B, H, D]: each row's softmax(q K^T * scale) V over its first context_lens[b] positions."""
    rows, heads, _ = query.shape
    group = heads // key_cache.shape[1]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    for row, length in enumerate(context_lens.tolist()):
        slots = _positions_to_slots(block_tables[row], length, block_size)
        keys = key_cache[slots].float().repeat_interleave(group, dim=1)      # [N, H, D]
        values = value_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[row].float(), keys) * scale
        out[row] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values).to(query.dtype)
    return out


def paged_extend_attention_ref(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, query_starts: torch.Tensor, prefix_lens: torch.Tensor,
                               scale: float, block_size: int) -> torch.Tensor:
    """[T, H, D] -> [T, H, D]: token i of segment s attends to positions [0, prefix_lens[s] + i]."""
    heads = query.shape[1]
    group = heads // key_cache.shape[1]
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    starts = query_starts.tolist()
    for segment, prefix in enumerate(prefix_lens.tolist()):
        begin, end = starts[segment], starts[segment + 1]
        length = end - begin
        if length == 0:
            continue
        total = prefix + length
        slots = _positions_to_slots(block_tables[segment], total, block_size)
        keys = key_cache[slots].float().repeat_interleave(group, dim=1)
        values = value_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,nhd->htn", query[begin:end].float(), keys) * scale
        allowed = torch.arange(total, device=query.device)[None, :] <= \
            prefix + torch.arange(length, device=query.device)[:, None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[begin:end] = torch.einsum("htn,nhd->thd", scores.softmax(-1), values).to(query.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32; UPCAST multiplies fp32 copies (the interpreter's bf16 tl.dot returns garbage)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _online_softmax_step(scores, m_i, l_i, acc):
    """One key tile of the online softmax (scores already in log2 units, -inf where masked)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row with nothing allowed yet keeps m = -inf; exponents then use 0 so no NaN appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    return m_new, l_i, acc, p


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   scale_log2, split_len, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_tb, stride_ob, stride_oh, num_heads,
                   GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, num_splits, DIRECT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (row, KV head, split): the group's heads over positions [split*split_len, +split_len) ∩ context."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + row).to(tl.int32)
    begin = split * split_len
    end = tl.minimum(begin + split_len, length)
    heads = kv_head * GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row64 = row.to(tl.int64)
    q = tl.load(q_ptr + row64 * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    table = tables_ptr + row64 * stride_tb
    for start in range(begin, end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        key_ok = positions < end
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = blocks * BLOCK_SIZE + positions % BLOCK_SIZE
        k = tl.load(k_ptr + slots[None, :] * stride_kt + kv_head * stride_kh + dims[:, None],
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        scores = _dot(q, k.to(q.dtype), DOT_PRECISION, UPCAST) * scale_log2
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_i, l_i, acc, p = _online_softmax_step(scores, m_i, l_i, acc)
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    safe_l = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / safe_l[:, None]
    both = head_ok[:, None] & dim_ok[None, :]
    if DIRECT:  # one split: the final answer
        tl.store(out_ptr + row64 * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=both)
    else:
        # Partials [B, H, splits, BLOCK_D] fp32 and their log2-sum-exp [B, H, splits] (-inf: empty).
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(safe_l))
        part_rows = (row64 * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part_rows[:, None] * BLOCK_D + dims[None, :], acc, mask=both)
        tl.store(part_lse_ptr + part_rows, lse, mask=head_ok)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (row, head): out = Σ_s exp2(lse_s - lse) · partial_s, over the splits that saw keys."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    base = (row * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)
    weights = weights / tl.maximum(tl.sum(weights, axis=0), 1e-30)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * BLOCK_D + dims[None, :],
                    mask=split_ok[:, None], other=0.0)
    merged = tl.sum(parts * weights[:, None], axis=0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, starts_ptr, prefix_ptr, out_ptr, scale_log2,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_tb, stride_ot, stride_oh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (segment, query tile, KV head): BLOCK_Q tokens × GROUP heads against positions [0, tile's last]."""
    segment = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    begin = tl.load(starts_ptr + segment).to(tl.int32)
    length = tl.load(starts_ptr + segment + 1).to(tl.int32) - begin
    if q_tile * BLOCK_Q >= length:  # the grid is sized for the longest segment
        return
    prefix = tl.load(prefix_ptr + segment).to(tl.int32)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = q_tile * BLOCK_Q + rows // GROUP_PAD          # index within the segment
    in_group = rows % GROUP_PAD
    row_ok = (token < length) & (in_group < GROUP)
    heads = kv_head * GROUP + in_group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    token64 = (begin + token).to(tl.int64)
    q = tl.load(q_ptr + token64[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    query_pos = prefix + token
    # Causal: the tile's last token sees up to its own position; nothing later is loaded.
    kv_end = prefix + tl.minimum((q_tile + 1) * BLOCK_Q, length)
    m_i = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
    table = tables_ptr + segment.to(tl.int64) * stride_tb
    for start in range(0, kv_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        key_ok = positions < kv_end
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = blocks * BLOCK_SIZE + positions % BLOCK_SIZE
        k = tl.load(k_ptr + slots[None, :] * stride_kt + kv_head * stride_kh + dims[:, None],
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        scores = _dot(q, k.to(q.dtype), DOT_PRECISION, UPCAST) * scale_log2
        allowed = key_ok[None, :] & (positions[None, :] <= query_pos[:, None]) & row_ok[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        m_i, l_i, acc, p = _online_softmax_step(scores, m_i, l_i, acc)
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token64[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers.


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """True under the Triton interpreter with bf16, whose tl.dot is wrong there (triton 3.7, numpy has no bf16).

    The operands are still rounded to bf16 first, so the interpreter checks the same arithmetic a GPU runs.
    """
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _processor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check(what: str, query: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           tables: torch.Tensor, block_size: int, *index_tensors: torch.Tensor) -> tuple[int, int, int]:
    """Shape, dtype and device checks from metadata only (no device read). Returns (heads, kv_heads, head_dim)."""
    if query.dim() != 3 or out.shape != query.shape:
        raise PagedAttentionShapeError(f"{what}: query {tuple(query.shape)} and out {tuple(out.shape)} must be "
                                       f"the same [tokens, H, D]")
    heads, head_dim = query.shape[1:]
    if key_cache.dim() != 3 or value_cache.shape != key_cache.shape or key_cache.shape[2] != head_dim:
        raise PagedAttentionShapeError(f"{what}: caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} "
                                       f"are not [slots, KV, {head_dim}]")
    kv_heads = key_cache.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise PagedAttentionShapeError(f"{what}: {heads} query heads are not a multiple of {kv_heads} KV heads")
    if block_size <= 0 or key_cache.shape[0] % block_size:
        raise PagedAttentionShapeError(f"{what}: a cache of {key_cache.shape[0]} slots is not whole blocks of "
                                       f"{block_size}")
    if query.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype or out.dtype != query.dtype:
        raise PagedAttentionShapeError(f"{what}: query {query.dtype}, out {out.dtype}, caches {key_cache.dtype}, "
                                       f"{value_cache.dtype} must agree")
    for tensor in (query, out, key_cache, value_cache):
        if tensor.stride(2) != 1:
            raise PagedAttentionShapeError(f"{what}: the head dimension must be contiguous "
                                           f"(strides {tensor.stride()})")
    if tables.dim() != 2 or tables.stride(1) != 1:
        raise PagedAttentionShapeError(f"{what}: block tables must be [rows, W] with contiguous rows")
    for tensor in (tables, *index_tensors):
        if tensor.dtype not in (torch.int32, torch.int64):
            raise PagedAttentionShapeError(f"{what}: index tensors must be int32 or int64, got {tensor.dtype}")
        if tensor.device != query.device or key_cache.device != query.device:
            raise PagedAttentionShapeError(f"{what}: tensors on {tensor.device}, {key_cache.device} and "
                                           f"{query.device}")
    return heads, kv_heads, head_dim


def _head_block(head_dim: int) -> int:
    # tl.dot's inner dimension must be at least 16 on a GPU; dims past head_dim are masked.
    return max(16, triton.next_power_of_2(head_dim))


def _group_block(group: int) -> int:
    # tl.dot on a GPU needs at least 16 rows; the padding heads are masked out.
    return max(16, triton.next_power_of_2(group))


def decode_splits(rows: int, kv_heads: int, max_context: int, device: torch.device, block_n: int) -> int:
    """Splits so that rows × KV × splits fills the GPU (~2 programs per SM), each split ≥ 2 key tiles."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_context, 4 * block_n)))
    wanted = triton.cdiv(2 * _processor_count(device.index or 0), max(1, rows * kv_heads))
    return max(1, min(wanted, triton.cdiv(max_context, 2 * block_n), 64))


def paged_decode_attention_triton(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                                  value_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float, block_size: int, splits: int | None = None) -> None:
    """out[b] = attention of query[b] ([H, D]) over the first context_lens[b] positions of block_tables[b].

    Every context length must be ≥ 1 and ≤ W·block_size (the caller's contract; the table's width W is
    the bound the launch is sized by, so no length is read back to the host).
    """
    rows = query.shape[0]
    heads, kv_heads, head_dim = _check("paged_decode_attention", query, out, key_cache, value_cache,
                                       block_tables, block_size, context_lens)
    if block_tables.shape[0] != rows or context_lens.shape != (rows,):
        raise PagedAttentionShapeError(f"paged_decode_attention: {rows} rows, tables {tuple(block_tables.shape)}, "
                                       f"lengths {tuple(context_lens.shape)}")
    if rows == 0:
        return
    group = heads // kv_heads
    block_d = _head_block(head_dim)
    block_n = 64 if query.is_cuda else 16
    max_context = block_tables.shape[1] * block_size
    splits = splits or decode_splits(rows, kv_heads, max_context, query.device, block_n)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    splits = max(1, triton.cdiv(max_context, split_len))
    if splits > 1:
        part_out = torch.empty(rows, heads, splits, block_d, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused by the kernel when there is one split
    _decode_kernel[(rows, kv_heads, splits)](
        query, key_cache, value_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E, split_len, query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), heads,
        GROUP=group, BLOCK_H=_group_block(group), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, num_splits=splits, DIRECT=splits == 1, DOT_PRECISION=_dot_precision(query.dtype),
        UPCAST=_upcast(query.dtype), num_warps=4, num_stages=2)
    if splits > 1:
        # The split count is a runtime argument (the table's width changes every block_size tokens, and a
        # constexpr would compile a kernel per value); only its power-of-two bound is compiled in.
        _decode_merge_kernel[(rows, heads)](part_out, part_lse, out, out.stride(0), out.stride(1), heads, splits,
                                            HEAD_DIM=head_dim, BLOCK_D=block_d,
                                            BLOCK_S=triton.next_power_of_2(splits))


def paged_extend_attention_triton(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                                  value_cache: torch.Tensor, block_tables: torch.Tensor, query_starts: torch.Tensor,
                                  prefix_lens: torch.Tensor, max_query_len: int, scale: float,
                                  block_size: int) -> None:
    """Causal attention of every segment's query tokens over its prefix and itself, keys read from the cache.

    query_starts [S+1] token boundaries into query/out, prefix_lens [S] positions cached before each
    segment, block_tables [S, W] covering prefix + length positions. `max_query_len` (a host int, at
    least the longest segment) sizes the grid; tiles past a segment's end leave at once.
    """
    segments = prefix_lens.shape[0]
    heads, kv_heads, head_dim = _check("paged_extend_attention", query, out, key_cache, value_cache,
                                       block_tables, block_size, query_starts, prefix_lens)
    if query_starts.shape != (segments + 1,) or block_tables.shape[0] != segments:
        raise PagedAttentionShapeError(f"paged_extend_attention: {segments} segments, starts "
                                       f"{tuple(query_starts.shape)}, tables {tuple(block_tables.shape)}")
    if segments == 0 or max_query_len <= 0 or query.shape[0] == 0:
        return
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    # Rows per tile = BLOCK_Q × group_pad: 64 on a GPU (tensor-core tiles), ≥ 16 for tl.dot.
    rows_per_tile = 64 if query.is_cuda else 16
    block_q = max(1, rows_per_tile // group_pad)
    block_q = min(block_q, max(1, triton.next_power_of_2(max_query_len))) if block_q * group_pad > 16 else block_q
    while block_q * group_pad < 16:
        block_q *= 2
    # fp32 tiles are twice the bytes: 32 keys a tile keeps two pipelined K/V stages well inside shared memory.
    block_n = (32 if query.dtype == torch.float32 else 64) if query.is_cuda else 16
    grid = (segments, triton.cdiv(max_query_len, block_q), kv_heads)
    _extend_kernel[grid](
        query, key_cache, value_cache, block_tables, query_starts, prefix_lens, out, scale * LOG2E,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), value_cache.stride(0),
        value_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=_head_block(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(query.dtype),
        UPCAST=_upcast(query.dtype), num_warps=4, num_stages=2)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
