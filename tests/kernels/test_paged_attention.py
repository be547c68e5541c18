"""The Triton paged-attention kernels against their torch references, under the interpreter on a CPU.

Every cache slot that no tested position owns holds NaN, so a kernel that reads a key or value
past a row's length, or through a padding entry of the block table, poisons its output and fails.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longtail.kernels.attention_cpu import paged_decode_attention_ref as sdpa_decode_ref
from longtail.kernels.paged_attention import (
    PagedAttentionShapeError,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_extend_attention_ref,
    paged_extend_attention_triton,
)

TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
PAD = 10**9  # a block index far outside the cache: reading through a padding entry would fault or NaN


def make_cache(seed: int, lengths: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """Caches with each sequence's blocks shuffled across the pool, NaN in every slot no position owns."""
    generator = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    width = max(needed + [1])
    blocks = sum(needed) + 3
    keys = torch.full((blocks * block_size, kv_heads, head_dim), float("nan"))
    values = torch.full_like(keys, float("nan"))
    order = torch.randperm(blocks, generator=generator).tolist()
    tables = torch.full((len(lengths), width), PAD, dtype=torch.int64)
    for row, (length, count) in enumerate(zip(lengths, needed, strict=True)):
        owned = [order.pop() for _ in range(count)]
        tables[row, :count] = torch.tensor(owned, dtype=torch.int64)
        for position in range(length):
            slot = owned[position // block_size] * block_size + position % block_size
            keys[slot] = torch.randn(kv_heads, head_dim, generator=generator)
            values[slot] = torch.randn(kv_heads, head_dim, generator=generator)
    return keys.to(dtype), values.to(dtype), tables


def fused_query(seed: int, tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q as the model passes it: a strided view into a fused qkv output."""
    generator = torch.Generator().manual_seed(seed + 1)
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    return fused[:, :heads * head_dim].view(tokens, heads, head_dim)


def run_decode(lengths, heads, kv_heads, head_dim, block_size, dtype, splits=None, seed=0, device="cpu"):
    keys, values, tables = (t.to(device) for t in make_cache(seed, lengths, kv_heads, head_dim, block_size, dtype))
    query = fused_query(seed, len(lengths), heads, kv_heads, head_dim, dtype).to(device)
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    scale = head_dim ** -0.5
    expected = paged_decode_attention_ref(query, keys, values, tables, lens, scale, block_size)
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=device)
    paged_decode_attention_triton(out, query, keys, values, tables, lens, scale, block_size, splits=splits)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    return out, expected


def run_extend(prefixes, lengths, heads, kv_heads, head_dim, block_size, dtype, seed=0, device="cpu"):
    totals = [p + n for p, n in zip(prefixes, lengths, strict=True)]
    keys, values, tables = (t.to(device) for t in make_cache(seed, totals, kv_heads, head_dim, block_size, dtype))
    query = fused_query(seed, sum(lengths), heads, kv_heads, head_dim, dtype).to(device)
    starts = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64, device=device)
    prefix = torch.tensor(prefixes, dtype=torch.int64, device=device)
    scale = head_dim ** -0.5
    expected = paged_extend_attention_ref(query, keys, values, tables, starts, prefix, scale, block_size)
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=device)
    paged_extend_attention_triton(out, query, keys, values, tables, starts, prefix, max(lengths + [0]), scale,
                                  block_size)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    return out, expected


DECODE_CASES = [
    # lengths, heads, kv_heads, head_dim, block_size, dtype, splits
    ([1], 2, 2, 8, 4, torch.float32, None),                      # one-token context
    ([1, 3, 4, 5, 8, 9], 4, 2, 8, 4, torch.float32, None),        # block boundaries, GQA 2
    ([16, 17, 33], 8, 2, 16, 16, torch.float32, None),            # group 4, default block size
    ([7, 40], 6, 2, 24, 8, torch.float32, 3),                     # group 3 (padded heads), head_dim not 2^k
    ([130, 2], 4, 1, 16, 16, torch.float32, 4),                   # long context split in 4, one split-only row
    ([5, 29, 64], 4, 4, 16, 5, torch.bfloat16, 2),                # block size not 2^k, MHA
    ([31, 1, 50], 8, 2, 32, 16, torch.float16, None),
    ([200], 4, 2, 16, 16, torch.bfloat16, 7),                     # splits that do not divide the width
]


@pytest.mark.parametrize("lengths,heads,kv_heads,head_dim,block_size,dtype,splits", DECODE_CASES)
def test_decode_equals_reference(lengths, heads, kv_heads, head_dim, block_size, dtype, splits):
    run_decode(lengths, heads, kv_heads, head_dim, block_size, dtype, splits)


def test_decode_reference_equals_sdpa_gather():
    """The row-loop reference agrees with the engine's former gather + SDPA path (another implementation)."""
    lengths, block_size = [1, 9, 33], 8
    keys, values, tables = make_cache(3, lengths, 2, 16, block_size, torch.float32)
    tables = torch.where(tables == PAD, tables[:, :1], tables)  # the SDPA gather reads every table entry
    keys, values = keys.nan_to_num(0.0), values.nan_to_num(0.0)
    query = fused_query(3, 3, 8, 2, 16, torch.float32)
    lens = torch.tensor(lengths)
    ours = paged_decode_attention_ref(query, keys, values, tables, lens, 0.25, block_size)
    theirs = sdpa_decode_ref(query, keys, values, tables, lens, 0.25, block_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_decode_splits_agree_with_one_split():
    one, _ = run_decode([90, 45], 4, 2, 16, 8, torch.float32, splits=1)
    many, _ = run_decode([90, 45], 4, 2, 16, 8, torch.float32, splits=6)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-6)


EXTEND_CASES = [
    # prefixes, lengths, heads, kv_heads, head_dim, block_size, dtype
    ([0], [1], 2, 2, 8, 4, torch.float32),                        # a one-token prompt
    ([0, 0], [7, 16], 4, 2, 8, 4, torch.float32),                 # first chunks, causal within the chunk
    ([5, 16, 0], [3, 16, 9], 8, 2, 16, 8, torch.float32),         # later chunks across block boundaries
    ([33, 0], [20, 1], 6, 2, 24, 16, torch.float32),              # group 3, head_dim not 2^k
    ([120], [2], 4, 1, 16, 16, torch.float32),                    # long prefix, short chunk
    ([3, 0, 10], [0, 5, 12], 4, 4, 16, 5, torch.bfloat16),        # an empty segment, block size not 2^k
    ([9, 0], [30, 17], 8, 2, 32, 16, torch.float16),              # several query tiles per segment
    ([1], [40], 4, 2, 16, 4, torch.bfloat16),
]


@pytest.mark.parametrize("prefixes,lengths,heads,kv_heads,head_dim,block_size,dtype", EXTEND_CASES)
def test_extend_equals_reference(prefixes, lengths, heads, kv_heads, head_dim, block_size, dtype):
    run_extend(prefixes, lengths, heads, kv_heads, head_dim, block_size, dtype)


def test_extend_is_causal():
    """Changing a later token's key changes nothing before it: the mask is real, not a coincidence."""
    lengths, block_size = [6], 4
    keys, values, tables = make_cache(5, lengths, 1, 8, block_size, torch.float32)
    query = fused_query(5, 6, 2, 1, 8, torch.float32)
    starts, prefix = torch.tensor([0, 6]), torch.tensor([0])
    first = torch.empty_like(query)
    paged_extend_attention_triton(first, query, keys, values, tables, starts, prefix, 6, 0.3, block_size)
    last_slot = tables[0, 5 // block_size] * block_size + 5 % block_size
    keys[last_slot] += 5.0
    values[last_slot] -= 3.0
    second = torch.empty_like(query)
    paged_extend_attention_triton(second, query, keys, values, tables, starts, prefix, 6, 0.3, block_size)
    torch.testing.assert_close(first[:5], second[:5], atol=0, rtol=0)
    assert not torch.allclose(first[5], second[5])


def test_extend_of_one_token_rows_equals_decode():
    """A decode row is an extend segment of length 1 whose prefix is its context minus itself."""
    lengths, block_size = [4, 19, 1], 4
    keys, values, tables = make_cache(7, lengths, 2, 16, block_size, torch.float32)
    query = fused_query(7, 3, 4, 2, 16, torch.float32)
    decode = torch.empty_like(query)
    paged_decode_attention_triton(decode, query, keys, values, tables, torch.tensor(lengths), 0.25, block_size)
    extend = torch.empty_like(query)
    paged_extend_attention_triton(extend, query, keys, values, tables, torch.arange(4),
                                  torch.tensor(lengths) - 1, 1, 0.25, block_size)
    torch.testing.assert_close(decode, extend, atol=1e-6, rtol=1e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_shapes(data):
    kv_heads = data.draw(st.integers(1, 3))
    group = data.draw(st.integers(1, 5))
    head_dim = data.draw(st.sampled_from([4, 8, 12, 16]))
    block_size = data.draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = data.draw(st.integers(0, 2**16))
    lengths = data.draw(st.lists(st.integers(1, 48), min_size=1, max_size=4))
    run_decode(lengths, kv_heads * group, kv_heads, head_dim, block_size, dtype,
               splits=data.draw(st.sampled_from([None, 1, 2, 5])), seed=seed)
    prefixes = data.draw(st.lists(st.integers(0, 40), min_size=len(lengths), max_size=len(lengths)))
    chunk = [min(n, 20) for n in lengths]
    run_extend(prefixes, chunk, kv_heads * group, kv_heads, head_dim, block_size, dtype, seed=seed)


def test_empty_batches_do_nothing():
    keys, values, tables = make_cache(0, [4], 1, 8, 4, torch.float32)
    out = torch.empty(0, 2, 8)
    paged_decode_attention_triton(out, out, keys, values, tables[:0], torch.zeros(0, dtype=torch.int64), 1.0, 4)
    paged_extend_attention_triton(out, out, keys, values, tables[:0], torch.zeros(1, dtype=torch.int64),
                                  torch.zeros(0, dtype=torch.int64), 0, 1.0, 4)


@pytest.mark.parametrize("problem", ["heads", "dtype", "blocks", "rows", "starts", "index_dtype"])
def test_shape_errors_are_refused(problem):
    keys, values, tables = make_cache(0, [8, 8], 2, 8, 4, torch.float32)
    query = torch.randn(2, 4, 8)
    out = torch.empty_like(query)
    lens = torch.tensor([8, 8])
    if problem == "heads":
        query = out = torch.randn(2, 3, 8)
    elif problem == "dtype":
        out = torch.empty_like(query, dtype=torch.bfloat16)
    elif problem == "blocks":
        keys, values = keys[:-1], values[:-1]
    elif problem == "rows":
        lens = torch.tensor([8])
    elif problem == "index_dtype":
        lens = lens.float()
    with pytest.raises(PagedAttentionShapeError):
        if problem == "starts":
            paged_extend_attention_triton(out, query, keys, values, tables, torch.tensor([0, 2]),
                                          torch.tensor([0, 0]), 2, 1.0, 4)
        else:
            paged_decode_attention_triton(out, query, keys, values, tables, lens, 1.0, 4)


# On a GPU, compiled: the serving head layouts (Llama-3.1-8B: 32/8 heads of 128; Llama-3.2-1B: of 64), bf16/fp16.
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_on_gpu_at_serving_shapes(head_dim, dtype):
    run_decode([1, 15, 16, 17, 500, 2049, 3000, 64], 32, 8, head_dim, 16, dtype, device="cuda")
    run_decode([3000], 32, 8, head_dim, 16, dtype, splits=1, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_extend_on_gpu_at_serving_shapes(head_dim, dtype):
    run_extend([0, 0, 16, 700, 5, 0], [1, 300, 33, 2, 129, 1000], 32, 8, head_dim, 16, dtype, device="cuda")
