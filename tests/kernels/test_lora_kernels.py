"""Every Triton kernel equals its torch reference; the references equal a naive per-token loop.

On CPU the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py):
fp32, tiny shapes. The same cases run on CUDA in fp16/bf16 with `-m gpu`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import lora_expand_ref, lora_shrink_ref, segments_from_token_slots
from kernels.lora import lora_expand_sgmv_ref, lora_shrink_sgmv_ref
from kernels.lora_triton import (
    lora_expand_sgmv_triton,
    lora_expand_triton,
    lora_shrink_sgmv_triton,
    lora_shrink_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(seed, tokens, hidden, width, ranks, base_only_fraction=0.2, sorted_slots=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    offsets, total = [], 0
    for rank in ranks:
        offsets.append(total)
        total += rank
    total = max(total, 1)
    a_rows = torch.randn(total, hidden, generator=generator) * 0.3
    b_rows = torch.randn(total, width, generator=generator) * 0.3
    x = torch.randn(tokens, hidden, generator=generator)
    slots = torch.randint(0, len(ranks), (tokens,), generator=generator)
    slots[torch.rand(tokens, generator=generator) < base_only_fraction] = -1
    if sorted_slots:
        slots = torch.sort(slots).values
    scales = torch.rand(len(ranks), generator=generator) + 0.5

    def to(t, kind=None):
        return t.to(DEVICE, kind) if kind else t.to(DEVICE)
    return (to(x, dtype), to(a_rows, dtype), to(b_rows, dtype), to(slots), to(torch.tensor(offsets)),
            to(torch.tensor(ranks)), to(scales))


def naive(x, a_rows, b_rows, slots, offsets, ranks, scales, width, start=0, out_width=None):
    out = torch.zeros(x.shape[0], out_width or width, dtype=torch.float64)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0 or ranks[slot] == 0:
            continue
        o, r = int(offsets[slot]), int(ranks[slot])
        a, b = a_rows[o:o + r].double(), b_rows[o:o + r].double()
        out[t, start:start + width] = float(scales[slot]) * (x[t].double() @ a.T) @ b
    return out


TOLERANCE = 1e-4 if DEVICE == "cpu" else 2e-2


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 9), hidden=st.integers(1, 70), width=st.integers(1, 70),
       ranks=st.lists(st.sampled_from([0, 1, 3, 8, 17, 33]), min_size=1, max_size=5),
       start=st.integers(0, 5))
def test_bgmv_kernels_equal_the_reference(seed, tokens, hidden, width, ranks, start):
    x, a_rows, b_rows, slots, offsets, ranks_t, scales = make_case(seed, tokens, hidden, width, ranks)
    max_rank = max(ranks) or 1
    expected = lora_shrink_ref(x, a_rows, slots, offsets, ranks_t, max_rank)
    got = lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, max_rank)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    out_ref = torch.zeros(tokens, width + start + 3, device=DEVICE)
    out_tri = out_ref.clone()
    lora_expand_ref(out_ref, expected, b_rows, slots, offsets, ranks_t, scales, start)
    lora_expand_triton(out_tri, expected, b_rows, slots, offsets, ranks_t, scales, start)
    torch.testing.assert_close(out_tri, out_ref, atol=TOLERANCE, rtol=TOLERANCE)
    full = naive(x.cpu(), a_rows.cpu(), b_rows.cpu(), slots.cpu(), offsets.cpu(), ranks_t.cpu(), scales.cpu(),
                 width, start, width + start + 3)
    torch.testing.assert_close(out_ref.cpu().double(), full, atol=1e-4, rtol=1e-4)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 40), hidden=st.integers(1, 40), width=st.integers(1, 40),
       ranks=st.lists(st.sampled_from([0, 2, 8, 19]), min_size=1, max_size=4))
def test_sgmv_kernels_equal_the_reference(seed, tokens, hidden, width, ranks):
    x, a_rows, b_rows, slots, offsets, ranks_t, scales = make_case(seed, tokens, hidden, width, ranks,
                                                                   sorted_slots=True)
    seg_starts, seg_slots = segments_from_token_slots(slots)
    max_rank = max(ranks) or 1
    expected = lora_shrink_sgmv_ref(x, a_rows, seg_starts, seg_slots, offsets, ranks_t, max_rank)
    got = lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, offsets, ranks_t, max_rank)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    out_ref = torch.zeros(tokens, width, device=DEVICE)
    out_tri = out_ref.clone()
    lora_expand_sgmv_ref(out_ref, expected, b_rows, seg_starts, seg_slots, offsets, ranks_t, scales)
    lora_expand_sgmv_triton(out_tri, expected, b_rows, seg_starts, seg_slots, offsets, ranks_t, scales)
    torch.testing.assert_close(out_tri, out_ref, atol=TOLERANCE, rtol=TOLERANCE)


def test_edge_cases_all_base_only_single_token_empty_segments_large_rank():
    x, a_rows, b_rows, slots, offsets, ranks_t, scales = make_case(1, 5, 24, 20, [4, 128], base_only_fraction=1.1)
    assert (slots == -1).all()
    assert lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, 128).abs().sum() == 0
    x, a_rows, b_rows, slots, offsets, ranks_t, scales = make_case(2, 1, 24, 20, [128], base_only_fraction=0)
    torch.testing.assert_close(lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, 128),
                               lora_shrink_ref(x, a_rows, slots, offsets, ranks_t, 128), atol=TOLERANCE, rtol=0)
    seg_starts = torch.tensor([0, 0, 1, 1], device=DEVICE)  # two empty segments
    seg_slots = torch.tensor([0, 0, 0], device=DEVICE)
    got = lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, offsets, ranks_t, 128)
    torch.testing.assert_close(got, lora_shrink_ref(x, a_rows, slots, offsets, ranks_t, 128), atol=TOLERANCE, rtol=0)


def test_many_adapters_in_one_launch():
    ranks = [1 + (i * 7) % 33 for i in range(40)]
    x, a_rows, b_rows, slots, offsets, ranks_t, scales = make_case(3, 12, 16, 12, ranks)
    max_rank = max(ranks)
    expected = lora_shrink_ref(x, a_rows, slots, offsets, ranks_t, max_rank)
    torch.testing.assert_close(lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, max_rank), expected,
                               atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    x, a_rows, b_rows, slots, offsets, ranks_t, scales = make_case(4, 64, 4096, 4096, [8, 16, 64], dtype=dtype)
    expected = lora_shrink_ref(x, a_rows, slots, offsets, ranks_t, 64)
    torch.testing.assert_close(lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, 64).float(), expected.float(),
                               atol=5e-2, rtol=5e-2)


def test_dispatch_follows_the_environment(monkeypatch):
    from kernels import kernel_backend

    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    assert kernel_backend() == "torch"
    monkeypatch.setenv("LONGTAIL_KERNELS", "triton")
    assert kernel_backend() == "triton"
    monkeypatch.delenv("LONGTAIL_KERNELS")
    assert kernel_backend() == ("triton" if torch.cuda.is_available() else "torch")
