"""The CPU attention kernels (RoPE + cache write, paged decode attention) against torch and the definition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longtail.kernels.attention_cpu import (
    AttentionShapeError,
    available,
    library_with_flags,
    paged_decode_attention,
    paged_decode_attention_ref,
    rope_write,
    rope_write_ref,
)

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the CPU kernel cannot be built")


def paged_case(seed: int, lengths: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lengths)
    blocks = len(lengths) * width + 3
    keys = torch.randn(blocks * block_size, kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(blocks * block_size, kv_heads, head_dim, generator=generator).to(dtype)
    # Each row owns its own shuffled blocks, as the pool hands them out.
    tables = torch.randperm(blocks, generator=generator)[:len(lengths) * width].view(len(lengths), width).contiguous()
    # Rows of a wider fused output, as the model passes q: a view, not a copy.
    fused = torch.randn(len(lengths), (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    query = fused[:, :heads * head_dim].view(len(lengths), heads, head_dim)
    return query, keys, values, tables, torch.tensor(lengths, dtype=torch.int64)


def definition(query, keys, values, tables, lengths, block_size) -> torch.Tensor:
    """Per row and head, in float64: softmax(q K^T / sqrt(D)) V over the row's positions, slot by slot."""
    rows, heads, head_dim = query.shape
    group = heads // keys.shape[1]
    out = torch.zeros(rows, heads, head_dim, dtype=torch.float64)
    for row in range(rows):
        slots = [int(tables[row, p // block_size]) * block_size + p % block_size for p in range(int(lengths[row]))]
        for head in range(heads):
            k = keys[slots, head // group].double()
            v = values[slots, head // group].double()
            weights = torch.softmax(k @ query[row, head].double() / math.sqrt(head_dim), dim=0)
            out[row, head] = weights @ v
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 70), min_size=1, max_size=6),
       kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 3, 5]),
       head_dim=st.sampled_from([2, 8, 32, 64, 128]),
       block_size=st.sampled_from([1, 4, 16]))
def test_decode_attention_equals_the_definition_and_the_reference(seed, lengths, kv_heads, group, head_dim,
                                                                  block_size):
    query, keys, values, tables, context = paged_case(seed, lengths, kv_heads * group, kv_heads, head_dim,
                                                      block_size, torch.float32)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(out, query, keys, values, tables, context, head_dim ** -0.5, block_size)
    expected = definition(query, keys, values, tables, context, block_size)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-5)
    reference = paged_decode_attention_ref(query, keys, values, tables, context, head_dim ** -0.5, block_size)
    torch.testing.assert_close(out, reference, atol=2e-6, rtol=2e-5)


# head_dim 64 and 128 take the register-held path (4 or 8 vectors of 16 lanes; of 8 lanes without AVX-512: 32 and
# 64), query heads in chunks of up to four per KV head (a group of 5 is a chunk of 4 and one of 1); 8 the general loop.
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (10, 2, 128), (8, 2, 32), (4, 2, 8)])
def test_decode_attention_in_bf16_is_within_bf16_rounding(heads, kv_heads, head_dim):
    query, keys, values, tables, context = paged_case(3, [5, 40, 17, 1], heads, kv_heads, head_dim, 16,
                                                      torch.bfloat16)
    out = torch.empty_like(query)
    paged_decode_attention(out, query, keys, values, tables, context, head_dim ** -0.5, 16)
    expected = definition(query, keys, values, tables, context, 16)
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 8), (10, 2, 64), (3, 1, 128)])
def test_decode_attention_never_reads_padding_past_the_context(heads, kv_heads, head_dim):
    """Slots past a row's length hold NaN (a failed request's leftovers): the kernel must not touch them, nor
    prefetch its way into trouble (a prefetch past the table would read a block number that is not there)."""
    query, keys, values, tables, context = paged_case(5, [3, 18, 33, 4], heads, kv_heads, head_dim, 4, torch.float32)
    clean = definition(query, keys, values, tables, context, 4)
    for row, length in enumerate(context.tolist()):
        for position in range(length, tables.shape[1] * 4):
            slot = int(tables[row, position // 4]) * 4 + position % 4
            keys[slot], values[slot] = float("nan"), float("nan")
    out = torch.empty_like(query)
    paged_decode_attention(out, query, keys, values, tables, context, head_dim ** -0.5, 4)
    torch.testing.assert_close(out.double(), clean, atol=2e-6, rtol=2e-5)


def _has_avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512(), reason="this CPU builds the AVX2 variant already")
def test_the_avx2_build_attends_the_same():
    """8-lane vectors: head_dim 32 and 64 take the register-held path there, 128 the general loop."""
    library = library_with_flags("-mno-avx512f")
    if library.get() is None:
        pytest.skip("the compiler cannot build the variant")
    for heads, kv_heads, head_dim in [(9, 3, 64), (10, 2, 32), (2, 1, 128)]:
        query, keys, values, tables, context = paged_case(11, [1, 7, 30, 64], heads, kv_heads, head_dim, 16,
                                                          torch.float32)
        out = torch.empty_like(query)
        paged_decode_attention(out, query, keys, values, tables, context, head_dim ** -0.5, 16, library)
        expected = definition(query, keys, values, tables, context, 16)
        torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_equals_the_torch_code(dtype):
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, tokens = 6, 2, 16, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 50
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    caches = [torch.zeros(64, kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    slots = torch.tensor([7, 0, 63, 12, 30])
    mine = qkv.clone()
    rope_write(mine, heads, kv_heads, cos, sin, caches[0], caches[1], slots)
    rope_write_ref(qkv, heads, kv_heads, cos, sin, caches[2], caches[3], slots)
    if dtype == torch.float32:  # no FMA contraction: the same roundings as torch's multiply and add
        assert torch.equal(mine, qkv) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    else:  # one rounding to bf16 where torch rounds after each op
        torch.testing.assert_close(mine.float(), qkv.float(), atol=0.05, rtol=0.02)
        assert torch.equal(caches[1], caches[3])


def test_out_of_range_indices_raise_before_any_write():
    keys, values = torch.zeros(32, 1, 4), torch.zeros(32, 1, 4)
    qkv = torch.randn(2, 12)
    cos, sin = torch.ones(2, 4), torch.zeros(2, 4)
    for slots in ([0, 32], [-1, 0]):
        with pytest.raises(AttentionShapeError):
            rope_write(qkv, 1, 1, cos, sin, keys, values, torch.tensor(slots))
        assert not keys.any() and not values.any()
    query, out = torch.randn(1, 1, 4), torch.zeros(1, 1, 4)
    cases = [(torch.tensor([[8]]), torch.tensor([1])),       # block past the 8-block cache
             (torch.tensor([[0]]), torch.tensor([5])),       # context longer than its table
             (torch.tensor([[0]]), torch.tensor([0]))]       # an empty context
    for tables, lengths in cases:
        with pytest.raises(AttentionShapeError):
            paged_decode_attention(out, query, keys, values, tables, lengths, 0.5, 4)
    with pytest.raises(AttentionShapeError):  # a cache of another dtype
        paged_decode_attention(out, query, keys.double(), values.double(), torch.tensor([[0]]), torch.tensor([1]),
                               0.5, 4)
