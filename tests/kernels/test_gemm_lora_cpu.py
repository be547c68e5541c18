"""The base matmul with the decode step's LoRA fused in (gemm_fp32.c's longtail_gemm_packed_lora) against the two
kernels it fuses (the packed GEMM, then the LoRA runs kernel) and the fp64 definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longtail.kernels import gemm_cpu, lora_cpu
from longtail.kernels.lora import LoraShapeError, runs_of

from .test_gemm_cpu import _has_avx512
from .test_lora_cpu import projection_group
from .test_lora_kernels import naive_delta

pytestmark = pytest.mark.skipif(not (gemm_cpu.available() and lora_cpu.native_available()),
                                reason="no C compiler: the CPU kernels cannot be built")

rank_lists = st.lists(st.sampled_from([0, 1, 3, 8, 16, 63, 64, 65, 128]), min_size=1, max_size=5)


def group_case(seed: int, hidden: int, widths: list[int], ranks: list[int], slots: list[int], extra: int = 0):
    """A projection group's packed weight (its outputs side by side, `extra` columns no adapter touches), bias,
    x, runs and LoRA table, and the fp64 definition of the answer."""
    cases, parts, width = projection_group(seed, len(slots), hidden, widths, ranks, slots)
    generator = torch.Generator().manual_seed(seed + 99)
    weight = torch.randn(width + extra, hidden, generator=generator) * 0.1
    bias = torch.randn(width + extra, generator=generator)
    x = cases[0].x
    runs = torch.tensor(runs_of(slots), dtype=torch.int64).reshape(-1, 3)
    want = x.double() @ weight.double().T + bias.double()
    for case, part in zip(cases, parts, strict=True):
        want += naive_delta(case, width + extra, part[5])
    return weight, bias, x, runs, lora_cpu.run_table(parts), want


def unfused(x, packed, bias, runs, table):
    out = gemm_cpu.gemm(x, packed, bias)
    lora_cpu.add_lora_runs_native(out, x, runs, table)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.one_of(st.integers(1, 70), st.sampled_from([576, 800])),
       widths=st.lists(st.integers(1, 40), min_size=1, max_size=3), ranks=rank_lists, data=st.data(),
       extra=st.integers(0, 40))
def test_fused_equals_the_two_kernels_and_the_definition(seed, hidden, widths, ranks, data, extra):
    slots = data.draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=1, max_size=40))
    if data.draw(st.booleans()):
        slots.sort()  # runs of many tokens as well as interleaved single ones
    weight, bias, x, runs, table, want = group_case(seed, hidden, widths, ranks, slots, extra)
    packed = gemm_cpu.pack(weight)
    got = gemm_cpu.gemm_lora(x, packed, bias, runs, table)
    # the same pair math and the same tiles, only interleaved: the same bits as the two calls
    assert torch.equal(got, unfused(x, packed, bias, runs, table))
    torch.testing.assert_close(got.double(), want, atol=1e-4 * hidden ** 0.5, rtol=1e-4)


def big_case():
    """A decode step's shape: 40 rows in runs of 1-4 tokens over 12 adapters, k past one 768 chunk."""
    slots = [s for s in range(12) for _ in range(1 + s % 4)][:40]
    return group_case(7, 800, [96, 40, 40], [8, 16, 64, 0, 32, 8, 64, 16, 8, 33, 64, 8], slots, extra=5)


def long_runs_case(seed: int, hidden: int, lengths: list[int], ranks: list[int]):
    """Runs of the given lengths (a prompt's, or a popular adapter's rows in a decode step) beside single tokens and
    rows with no adapter, in a group whose projections sit on panel boundaries (widths of 32 and 64 columns: every
    build's NR divides them), so the kernel takes the long runs' expand through its tiles."""
    slots = [-1, 0]
    for i, length in enumerate(lengths):
        slots += [1 + i % (len(ranks) - 1)] * length + [0]
    return group_case(seed, hidden, [64, 32, 32], ranks, slots)


def long_case():
    """A decode step with a popular adapter's 25 rows and a 14-row one beside short runs, and a prompt's 80."""
    return long_runs_case(3, 576, [25, 14, 9, 7, 3, 80], [16, 64, 8, 32])


@pytest.mark.parametrize(("flag", "case"), [("-DPREFETCH=0", big_case), ("-DLONG_TILES=0", long_case)])
def test_build_variants_never_change_a_result(flag, case):
    """The build with no prefetch (PREFETCH=0) gives the same bits: the prefetch only moves data into cache. So does
    the build that applies long runs as whole pairs (LONG_TILES=0) instead of the GEMM's tiles."""
    library = gemm_cpu.library_with_flags(flag)
    if library.get() is None:
        pytest.skip("the compiler cannot build the variant")
    weight, bias, x, runs, table, want = case()
    got = gemm_cpu.gemm_lora(x, gemm_cpu.pack(weight), bias, runs, table)
    assert torch.equal(got, gemm_cpu.gemm_lora(x, gemm_cpu.pack(weight, library), bias, runs, table))
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not _has_avx512(), reason="this CPU builds the AVX2 variant already")
@pytest.mark.parametrize("case", [big_case, long_case])
def test_the_avx2_build_fuses_the_same_answer(case):
    library = gemm_cpu.library_with_flags("-mno-avx512f")
    if library.get() is None:
        pytest.skip("the compiler cannot build without AVX-512")
    weight, bias, x, runs, table, want = case()
    got = gemm_cpu.gemm_lora(x, gemm_cpu.pack(weight, library), bias, runs, table)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("case", ["slot", "tokens", "columns", "input width", "bf16 table", "runs dtype", "x"])
def test_refuses_what_does_not_fit(case):
    weight, bias, x, runs, table, _ = big_case()
    packed = gemm_cpu.pack(weight)
    if case == "slot":
        runs = runs.clone()
        runs[0, 0] = table.slot_count
    elif case == "tokens":
        runs = runs.clone()
        runs[-1, 2] = x.shape[0] + 1
    elif case == "columns":  # a group wider than the weight's outputs
        packed, bias = gemm_cpu.pack(weight[:100]), None
    elif case == "input width":
        packed = gemm_cpu.pack(torch.randn(weight.shape[0], 799))
        x = torch.randn(x.shape[0], 799)
    elif case == "bf16 table":
        table = lora_cpu.run_table([(torch.zeros(8, 800, dtype=torch.bfloat16), torch.zeros(8, 4, dtype=torch.bfloat16),
                                     [0], [8], [1.0], 0)])
    elif case == "runs dtype":
        runs = runs.int()
    else:
        x = x.double()
    error = gemm_cpu.GemmShapeError if case == "x" else LoraShapeError
    message = {"slot": "slot outside the table", "tokens": "tokens fall outside", "columns": "columns fall outside"}
    with pytest.raises(error, match=message.get(case)):
        gemm_cpu.gemm_lora(x, packed, bias, runs, table)


def test_no_rows_is_an_empty_answer():
    weight, bias, _, _, table, _ = big_case()
    out = gemm_cpu.gemm_lora(torch.randn(0, 800), gemm_cpu.pack(weight), bias, torch.zeros(0, 3, dtype=torch.int64),
                             table)
    assert out.shape == (0, weight.shape[0])


def test_runs_deep_in_a_long_batch():
    """A prompt chunk beside a few decode runs: the LoRA scratch holds only the runs' rows, mapped back right."""
    slots = [-1] * 250 + [0] * 4 + [-1] * 36 + [1] * 3 + [2] * 7
    weight, bias, x, runs, table, want = group_case(11, 96, [40, 24], [8, 64, 16], slots, extra=3)
    packed = gemm_cpu.pack(weight)
    got = gemm_cpu.gemm_lora(x, packed, bias, runs, table)
    assert torch.equal(got, unfused(x, packed, bias, runs, table))
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


def test_a_popular_adapters_run_as_long_as_the_native_limit():
    """A decode step where one adapter holds MAX_NATIVE_RUN rows beside runs of 1-3: the longest run the engine sends
    to the C pair (split_runs) is fused and equals the definition."""
    slots = [0] * 2 + [1] * lora_cpu.MAX_NATIVE_RUN + [2] + [-1] * 5 + [3] * 3
    weight, bias, x, runs, table, want = group_case(5, 576, [64, 32, 32], [8, 64, 16, 32], slots, extra=2)
    short, long = lora_cpu.split_runs([tuple(r) for r in runs.tolist()])
    assert not long and short.shape[0] == 4
    packed = gemm_cpu.pack(weight)
    got = gemm_cpu.gemm_lora(x, packed, bias, short, table)
    assert torch.equal(got, unfused(x, packed, bias, short, table))
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("run", [15, 16, 17, 33])
@pytest.mark.parametrize("rank", [4, 16, 18, 65, 128])
def test_pairs_applied_unit_by_unit_or_whole_give_the_same_bits(run, rank):
    """The fused kernel applies a run of up to 16 tokens 16 rank rows at a time as their factors arrive, and a longer
    run whole (columns of 40 are off the panels' boundaries, so no run takes the tiles): at ranks around a unit's
    edge, either way equals the LoRA kernel's whole pairs bit for bit."""
    slots = [0] + [1] * run + [2] * 3 + [-1] * 2
    weight, bias, x, runs, table, want = group_case(rank + run, 576, [96, 40, 40], [rank, rank, 8], slots, extra=3)
    packed = gemm_cpu.pack(weight)
    got = gemm_cpu.gemm_lora(x, packed, bias, runs, table)
    assert torch.equal(got, unfused(x, packed, bias, runs, table))
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("hidden", [70, 576, 800])  # 800: k past one 768 chunk, the expand after the last
@pytest.mark.parametrize("lengths", [[9], [17, 33], [100, 12, 40], [300]])
@pytest.mark.parametrize("ranks", [[8, 1, 3], [16, 63, 64], [8, 64, 65]])
def test_long_runs_through_the_tiles_give_the_two_kernels_bits(hidden, lengths, ranks):
    """Runs of more than LONG_TOKENS (8) tokens: shrink first, then the expand as GEMM tiles over lora_B, summed from
    zero in rank order and added to the finished base output, as the LoRA kernel's whole pairs do: the same bits,
    and the definition. A rank over 64 in the call (65) sends every run through the pairs instead."""
    weight, bias, x, runs, table, want = long_runs_case(hidden + len(lengths), hidden, lengths, ranks)
    packed = gemm_cpu.pack(weight)
    got = gemm_cpu.gemm_lora(x, packed, bias, runs, table)
    assert torch.equal(got, unfused(x, packed, bias, runs, table))
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)
