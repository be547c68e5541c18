"""The CPU C kernel for short LoRA runs against its torch reference and the per-token definition."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longtail.kernels.lora import LoraShapeError, add_lora_runs, runs_of, slot_weights
from longtail.kernels.lora_cpu import (
    MAX_NATIVE_RUN,
    add_lora_runs_native,
    build,
    native_available,
    run_table,
    split_runs,
)

from .test_lora_kernels import make_case, naive_delta

pytestmark = pytest.mark.skipif(not native_available(), reason="no C compiler: the CPU kernel cannot be built")

FP32 = dict(atol=1e-4, rtol=1e-4)
rank_lists = st.lists(st.sampled_from([0, 1, 3, 8, 16, 63, 64, 65, 128]), min_size=1, max_size=5)


def projection_group(seed: int, tokens: int, hidden: int, widths: list[int], ranks: list[int], slots: list[int]):
    """Cases that share activations and token slots (as q/k/v share x), laid side by side in one output."""
    cases, parts, column = [], [], 0
    for index, width in enumerate(widths):
        case = make_case(seed + index, tokens, hidden, width, [r if index % 2 == 0 else r // 2 for r in ranks],
                         slots=slots)
        if cases:
            case = dataclasses.replace(case, x=cases[0].x)
        cases.append(case)
        parts.append((case.a_rows, case.b_rows, case.offsets.tolist(), case.ranks.tolist(), case.scales.tolist(),
                      column))
        column += width
    return cases, parts, column


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.integers(1, 70), widths=st.lists(st.integers(1, 40), min_size=1,
       max_size=3), ranks=rank_lists, data=st.data(), extra=st.integers(0, 4))
def test_kernel_equals_the_definition_and_the_torch_reference(seed, hidden, widths, ranks, data, extra):
    slots = data.draw(st.lists(st.integers(-1, len(ranks) - 1), max_size=40))
    if data.draw(st.booleans()):
        slots.sort()  # long runs (past the 8-token tile) as well as interleaved single tokens
    cases, parts, width = projection_group(seed, len(slots), hidden, widths, ranks, slots)
    runs = runs_of(slots)
    out = torch.full((len(slots), width + extra), 0.25)
    reference = out.clone()
    add_lora_runs_native(out, cases[0].x, torch.tensor(runs, dtype=torch.int64).reshape(-1, 3), run_table(parts))
    expected = torch.zeros(len(slots), width + extra, dtype=torch.float64)
    for case, part in zip(cases, parts, strict=True):
        expected += naive_delta(case, width + extra, part[5])
        add_lora_runs(reference, case.x, runs, slot_weights(*part[:5]), out_col_start=part[5])
    torch.testing.assert_close(out.double() - 0.25, expected, **FP32)
    torch.testing.assert_close(out, reference, **FP32)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.integers(1, 70), widths=st.lists(st.integers(1, 40), min_size=1,
       max_size=3), ranks=rank_lists, data=st.data())
def test_bf16_kernel_rounds_where_the_torch_reference_does(seed, hidden, widths, ranks, data):
    """bf16 factors, activations and output: within bf16 rounding of torch's two bf16 matmuls per run."""
    slots = sorted(data.draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=1, max_size=24)))
    cases, parts, width = projection_group(seed, len(slots), hidden, widths, ranks, slots)
    parts = [(a.bfloat16(), b.bfloat16(), *rest) for a, b, *rest in parts]
    x = cases[0].x.bfloat16()
    runs = runs_of(slots)
    out = torch.full((len(slots), width), 0.25, dtype=torch.bfloat16)
    reference = out.clone()
    add_lora_runs_native(out, x, torch.tensor(runs, dtype=torch.int64).reshape(-1, 3), run_table(parts))
    for part in parts:
        add_lora_runs(reference, x, runs, slot_weights(*part[:5]), out_col_start=part[5])
    assert out.dtype == torch.bfloat16
    scale = max(1.0, reference.float().abs().max().item())
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2 * scale, rtol=2e-2)


def test_row_strided_activations_and_a_slice_of_a_wider_output():
    slots = [0, 0, 1, -1, 1, 1]
    cases, parts, width = projection_group(3, len(slots), 12, [5, 7], [4, 9], slots)
    wide = torch.randn(len(slots), 20)
    wide[:, 4:16] = cases[0].x
    x = wide[:, 4:16]                       # stride(0) = 20, rows contiguous
    out = torch.zeros(len(slots), width)
    add_lora_runs_native(out, x, torch.tensor(runs_of(slots)), run_table(parts))
    expected = sum(naive_delta(case, width, part[5]) for case, part in zip(cases, parts, strict=True))
    torch.testing.assert_close(out.double(), expected, **FP32)


def test_split_runs_sends_long_runs_to_torch():
    runs = [(0, 0, 3), (1, 3, 3 + MAX_NATIVE_RUN), (2, 3 + MAX_NATIVE_RUN, 4 + 2 * MAX_NATIVE_RUN)]
    short, long = split_runs(runs)
    assert short.tolist() == [list(r) for r in runs[:2]]
    assert long == runs[2:]
    assert split_runs(runs[2:])[0] is None


@pytest.mark.parametrize("runs, message", [
    ([(5, 0, 2)], "slot outside the table"),
    ([(0, 1, 9)], "outside the batch"),
    ([(0, 3, 2)], "outside the batch"),
])
def test_bad_runs_are_refused_before_anything_is_written(runs, message):
    slots = [0, 0, 1, 1]
    cases, parts, width = projection_group(1, 4, 6, [5], [2, 3], slots)
    out = torch.zeros(4, width)
    with pytest.raises(LoraShapeError, match=message):
        add_lora_runs_native(out, cases[0].x, torch.tensor([(0, 0, 1), *runs]), run_table(parts))
    assert not out.any()


def test_bad_tensors_are_refused():
    slots = [0, 1]
    cases, parts, width = projection_group(2, 2, 6, [5], [2, 3], slots)
    table, runs = run_table(parts), torch.tensor(runs_of(slots))
    with pytest.raises(LoraShapeError, match="columns fall outside"):
        add_lora_runs_native(torch.zeros(2, width - 1), cases[0].x, runs, table)
    with pytest.raises(LoraShapeError, match="table's dtype"):
        add_lora_runs_native(torch.zeros(2, width, dtype=torch.float64), cases[0].x.double(), runs, table)
    with pytest.raises(LoraShapeError, match="table's dtype"):  # bf16 activations against fp32 factors
        add_lora_runs_native(torch.zeros(2, width, dtype=torch.bfloat16), cases[0].x.bfloat16(), runs, table)
    with pytest.raises(LoraShapeError, match="one dtype"):
        run_table([(torch.zeros(4, 6), torch.zeros(4, 5, dtype=torch.bfloat16), [0], [4], [1.0], 0)])
    with pytest.raises(LoraShapeError, match="fp32 or bf16"):
        run_table([(torch.zeros(4, 6).double(), torch.zeros(4, 5).double(), [0], [4], [1.0], 0)])
    with pytest.raises(LoraShapeError, match="contiguous rows"):
        add_lora_runs_native(torch.zeros(width, 2).T, cases[0].x, runs, table)
    with pytest.raises(LoraShapeError, match="input width"):
        add_lora_runs_native(torch.zeros(2, width), torch.zeros(2, 7), runs, table)
    with pytest.raises(LoraShapeError, match="rows 0:9 outside a buffer of 4 rows"):
        run_table([(torch.zeros(4, 6), torch.zeros(4, 5), [0], [9], [1.0], 0)])


def test_build_writes_a_loadable_library(tmp_path):
    import ctypes

    target = build(tmp_path / "lora_runs.so")
    assert ctypes.CDLL(str(target)).longtail_lora_runs
    assert [p.name for p in tmp_path.iterdir()] == ["lora_runs.so"]  # no partial file left behind
