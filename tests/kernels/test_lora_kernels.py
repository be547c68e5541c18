"""The torch references equal a naive per-token loop; every Triton kernel equals its reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/kernels/conftest.py)
in fp32 with tiny shapes: the interpreter is 600–4,000× slower than torch.
The `gpu` tests run the same kernels compiled, in fp16/bf16, at serving shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longtail.kernels.lora import (
    LoraShapeError,
    add_lora,
    add_lora_runs,
    kernel_backend,
    lora_expand,
    lora_expand_ref,
    lora_expand_sgmv,
    lora_expand_sgmv_ref,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_sgmv,
    lora_shrink_sgmv_ref,
    prefers_segments,
    runs_of,
    segments_from_token_slots,
    slot_weights,
    token_groups,
)
from longtail.kernels.lora_triton import (
    lora_expand_sgmv_triton,
    lora_expand_triton,
    lora_shrink_sgmv_triton,
    lora_shrink_triton,
)

CUDA = torch.cuda.is_available()
INTERPRETER_SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REFERENCE_SETTINGS = settings(max_examples=40, deadline=None)
FP32 = dict(atol=1e-4, rtol=1e-4)


@dataclasses.dataclass(frozen=True)
class Case:
    """One batch: activations, the stacked rank-row buffers and the per-slot tables."""

    x: torch.Tensor
    a_rows: torch.Tensor
    b_rows: torch.Tensor
    token_slots: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

    @property
    def max_rank(self) -> int:
        return max(int(self.ranks.max()), 1) if self.ranks.numel() else 1

    def to(self, device: str, dtype: torch.dtype) -> Case:
        return Case(self.x.to(device, dtype), self.a_rows.to(device, dtype), self.b_rows.to(device, dtype),
                    self.token_slots.to(device), self.offsets.to(device), self.ranks.to(device),
                    self.scales.to(device))


def make_case(seed: int, tokens: int, hidden: int, width: int, ranks: list[int], base_only: float = 0.2,
              slots: list[int] | None = None, gap_rows: int = 3) -> Case:
    """Random weights laid out as the serving room does: rank rows side by side, free rows between."""
    generator = torch.Generator().manual_seed(seed)
    offsets, next_row = [], gap_rows
    for rank in ranks:
        offsets.append(next_row)
        next_row += rank + gap_rows
    # Free rows hold huge values: a kernel that reads past a slot's rank fails loudly.
    a_rows = torch.full((next_row, hidden), 1e6)
    b_rows = torch.full((next_row, width), 1e6)
    for offset, rank in zip(offsets, ranks, strict=True):
        a_rows[offset:offset + rank] = torch.randn(rank, hidden, generator=generator) * 0.3
        b_rows[offset:offset + rank] = torch.randn(rank, width, generator=generator) * 0.3
    x = torch.randn(tokens, hidden, generator=generator)
    if slots is None:
        token_slots = torch.randint(0, len(ranks), (tokens,), generator=generator)
        token_slots[torch.rand(tokens, generator=generator) < base_only] = -1
    else:
        token_slots = torch.tensor(slots, dtype=torch.int64)
    scales = torch.rand(len(ranks), generator=generator) + 0.5
    return Case(x, a_rows, b_rows, token_slots, torch.tensor(offsets), torch.tensor(ranks, dtype=torch.int64),
                scales)


def naive_shrink(case: Case, max_rank: int) -> torch.Tensor:
    """The definition, one token at a time in float64."""
    shrunk = torch.zeros(case.x.shape[0], max_rank, dtype=torch.float64)
    for token, slot in enumerate(case.token_slots.tolist()):
        if slot < 0:
            continue
        offset, rank = int(case.offsets[slot]), int(case.ranks[slot])
        shrunk[token, :rank] = case.a_rows[offset:offset + rank].double() @ case.x[token].double()
    return shrunk


def naive_delta(case: Case, out_width: int, start: int) -> torch.Tensor:
    """What add_lora adds to a zero output of `out_width` columns, one token at a time in float64."""
    delta = torch.zeros(case.x.shape[0], out_width, dtype=torch.float64)
    width = case.b_rows.shape[1]
    for token, slot in enumerate(case.token_slots.tolist()):
        if slot < 0 or int(case.ranks[slot]) == 0:
            continue
        offset, rank = int(case.offsets[slot]), int(case.ranks[slot])
        a, b = case.a_rows[offset:offset + rank].double(), case.b_rows[offset:offset + rank].double()
        delta[token, start:start + width] = float(case.scales[slot]) * ((a @ case.x[token].double()) @ b)
    return delta


def random_segments(draw_sizes: list[int], draw_slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """seg_starts / seg_slots from segment sizes (zeros allowed) and the token slots they imply."""
    starts = [0]
    for size in draw_sizes:
        starts.append(starts[-1] + size)
    token_slots = [slot for size, slot in zip(draw_sizes, draw_slots, strict=True) for _ in range(size)]
    return torch.tensor(starts), torch.tensor(draw_slots, dtype=torch.int64), token_slots


rank_lists = st.lists(st.sampled_from([0, 1, 2, 3, 8, 16, 17, 33, 64, 128]), min_size=1, max_size=6)


# --- the references against the definition -------------------------------------------------------


@REFERENCE_SETTINGS
@given(seed=st.integers(0, 10_000), tokens=st.integers(0, 24), hidden=st.integers(1, 70),
       width=st.integers(1, 70), ranks=rank_lists, start=st.integers(0, 9), extra=st.integers(0, 5),
       base_only=st.sampled_from([0.0, 0.3, 1.0]), pass_groups=st.booleans(), sort_tokens=st.booleans())
def test_references_equal_a_naive_per_token_loop(seed, tokens, hidden, width, ranks, start, extra, base_only,
                                                  pass_groups, sort_tokens):
    case = make_case(seed, tokens, hidden, width, ranks, base_only)
    if sort_tokens:  # contiguous runs take the sliced path, interleaved ones the gathered path
        case = dataclasses.replace(case, token_slots=torch.sort(case.token_slots).values)
    max_rank = case.max_rank
    groups = token_groups(case.token_slots) if pass_groups else None
    shrunk = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, max_rank, groups)
    torch.testing.assert_close(shrunk.double(), naive_shrink(case, max_rank), **FP32)
    out = torch.full((tokens, start + width + extra), 0.25)
    lora_expand_ref(out, shrunk, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales, start,
                    groups)
    torch.testing.assert_close(out.double() - 0.25, naive_delta(case, start + width + extra, start), **FP32)


@REFERENCE_SETTINGS
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8),
       ranks=rank_lists, hidden=st.integers(1, 40), width=st.integers(1, 40), data=st.data())
def test_segment_references_equal_the_per_token_references(seed, sizes, ranks, hidden, width, data):
    seg_slots = data.draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=len(sizes), max_size=len(sizes)))
    seg_starts, seg_slots_t, token_slots = random_segments(sizes, seg_slots)
    case = make_case(seed, len(token_slots), hidden, width, ranks, slots=token_slots)
    max_rank = case.max_rank
    per_token = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, max_rank)
    per_segment = lora_shrink_sgmv_ref(case.x, case.a_rows, seg_starts, seg_slots_t, case.offsets, case.ranks,
                                       max_rank)
    torch.testing.assert_close(per_segment, per_token, **FP32)
    out = torch.zeros(len(token_slots), width + 2)
    lora_expand_sgmv_ref(out, per_segment, case.b_rows, seg_starts, seg_slots_t, case.offsets, case.ranks,
                         case.scales, 1)
    torch.testing.assert_close(out.double(), naive_delta(case, width + 2, 1), **FP32)


@REFERENCE_SETTINGS
@given(seed=st.integers(0, 10_000), tokens=st.integers(0, 24), hidden=st.integers(1, 70),
       width=st.integers(1, 70), ranks=rank_lists, start=st.integers(0, 9), extra=st.integers(0, 5),
       base_only=st.sampled_from([0.0, 0.3, 1.0]), sort_tokens=st.booleans())
def test_run_path_equals_a_naive_per_token_loop(seed, tokens, hidden, width, ranks, start, extra, base_only,
                                                sort_tokens):
    """The CPU engine's path: runs of one slot (a slot may own several runs), weights as per-slot views."""
    case = make_case(seed, tokens, hidden, width, ranks, base_only)
    if sort_tokens:
        case = dataclasses.replace(case, token_slots=torch.sort(case.token_slots).values)
    slots = case.token_slots.tolist()
    runs = runs_of(slots)
    assert [s for s, begin, end in runs for _ in range(begin, end)] == [s for s in slots if s >= 0]
    assert all(a[0] != b[0] or a[2] != b[1] for a, b in zip(runs, runs[1:], strict=False)), "runs are maximal"
    weights = slot_weights(case.a_rows, case.b_rows, case.offsets.tolist(), case.ranks.tolist(),
                           case.scales.tolist())
    out = torch.full((tokens, start + width + extra), 0.25)
    add_lora_runs(out, case.x, runs, weights, out_col_start=start)
    torch.testing.assert_close(out.double() - 0.25, naive_delta(case, start + width + extra, start), **FP32)


def test_run_path_refuses_columns_outside_the_output():
    case = make_case(1, 4, 8, 6, [2], base_only=0.0)
    weights = slot_weights(case.a_rows, case.b_rows, case.offsets.tolist(), case.ranks.tolist(), case.scales.tolist())
    with pytest.raises(LoraShapeError, match="columns 3:9"):
        add_lora_runs(torch.zeros(4, 8), case.x, runs_of(case.token_slots.tolist()), weights, out_col_start=3)


@given(slots=st.lists(st.integers(-1, 4), max_size=40))
@settings(max_examples=60, deadline=None)
def test_segments_and_groups_describe_the_token_slots(slots):
    token_slots = torch.tensor(slots, dtype=torch.int64)
    seg_starts, seg_slots = segments_from_token_slots(token_slots)
    lengths = (seg_starts[1:] - seg_starts[:-1]).tolist()
    assert seg_starts[0] == 0 and seg_starts[-1] == len(slots)
    assert all(length > 0 for length in lengths)
    assert all(a != b for a, b in zip(seg_slots.tolist(), seg_slots.tolist()[1:], strict=False))  # maximal runs
    assert [s for s, n in zip(seg_slots.tolist(), lengths, strict=True) for _ in range(n)] == slots
    groups = token_groups(token_slots)
    assert sorted(slot for slot, _ in groups) == sorted({s for s in slots if s >= 0})
    for (slot, tokens), span in zip(groups, groups.ranges, strict=True):
        assert tokens.tolist() == [t for t, s in enumerate(slots) if s == slot]
        contiguous = tokens.tolist() == list(range(tokens[0], tokens[-1] + 1))
        assert (span == (int(tokens[0]), int(tokens[-1]) + 1)) if contiguous else span is None
    # Built on the host from the groups, the SGMV form is the maximal runs, or None if a slot's tokens are split.
    from_groups = groups.segments()
    if all(span is not None for span in groups.ranges):
        assert from_groups is not None
        assert from_groups[0].tolist() == seg_starts.tolist() and from_groups[1].tolist() == seg_slots.tolist()
    else:
        assert from_groups is None


def test_half_precision_reference_accumulates_in_fp32():
    case = make_case(7, 12, 300, 200, [16, 64], base_only=0.0)
    expected = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 64)
    half = case.to("cpu", torch.bfloat16)
    got = lora_shrink_ref(half.x, half.a_rows, half.token_slots, half.offsets, half.ranks, 64)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=2e-2)
    out = torch.zeros(12, 200, dtype=torch.bfloat16)
    lora_expand_ref(out, got, half.b_rows, half.token_slots, half.offsets, half.ranks, half.scales)
    torch.testing.assert_close(out.double(), naive_delta(case, 200, 0), atol=0.5, rtol=3e-2)


def test_shape_errors_name_the_mismatch():
    case = make_case(1, 4, 8, 6, [2])
    with pytest.raises(LoraShapeError, match="columns 3:9 outside an output of width 8"):
        lora_expand_ref(torch.zeros(4, 8), torch.zeros(4, 2), case.b_rows, case.token_slots, case.offsets,
                        case.ranks, case.scales, 3)
    with pytest.raises(LoraShapeError, match="3 rows of activations for 4 token slots"):
        lora_shrink_ref(case.x[:3], case.a_rows, case.token_slots, case.offsets, case.ranks, 2)
    with pytest.raises(LoraShapeError, match="need S\\+1"):
        lora_shrink_sgmv_ref(case.x, case.a_rows, torch.tensor([0, 4]), torch.tensor([0, 0]), case.offsets,
                             case.ranks, 2)
    with pytest.raises(LoraShapeError, match="columns 3:9 outside"):
        lora_expand_triton(torch.zeros(4, 8), torch.zeros(4, 2), case.b_rows, case.token_slots, case.offsets,
                           case.ranks, case.scales, 3)


def test_dispatch_follows_the_environment(monkeypatch):
    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    assert kernel_backend() == "torch"
    monkeypatch.setenv("LONGTAIL_KERNELS", "triton")
    assert kernel_backend() == "triton"
    monkeypatch.delenv("LONGTAIL_KERNELS")
    assert kernel_backend() == ("triton" if CUDA else "torch")


def test_add_lora_prefers_segments_only_for_long_runs():
    assert prefers_segments(256, segments_from_token_slots(torch.arange(256) // 64))
    assert not prefers_segments(256, segments_from_token_slots(torch.arange(256) % 64))
    assert not prefers_segments(16, segments_from_token_slots(torch.zeros(16, dtype=torch.int64)))


# --- the Triton kernels against the references ---------------------------------------------------

DEVICE = "cuda" if CUDA else "cpu"


@INTERPRETER_SETTINGS
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 6), hidden=st.integers(1, 150),
       width=st.integers(1, 150), ranks=rank_lists, start=st.integers(0, 5), splits=st.sampled_from([None, 1, 3]))
def test_bgmv_kernels_equal_the_references(seed, tokens, hidden, width, ranks, start, splits):
    case = make_case(seed, tokens, hidden, width, ranks).to(DEVICE, torch.float32)
    max_rank = case.max_rank
    expected = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, max_rank)
    got = lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, max_rank, splits)
    torch.testing.assert_close(got, expected, **FP32)
    out_ref = torch.randn(tokens, start + width + 2, device=DEVICE)
    out_triton = out_ref.clone()
    lora_expand_ref(out_ref, expected, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales, start)
    lora_expand_triton(out_triton, expected, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales,
                       start)
    torch.testing.assert_close(out_triton, out_ref, **FP32)


@INTERPRETER_SETTINGS
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(0, 20), min_size=1, max_size=4),
       ranks=rank_lists, hidden=st.integers(1, 80), width=st.integers(1, 80), start=st.integers(0, 3),
       data=st.data())
def test_sgmv_kernels_equal_the_references(seed, sizes, ranks, hidden, width, start, data):
    seg_slots = data.draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=len(sizes), max_size=len(sizes)))
    seg_starts, seg_slots_t, token_slots = random_segments(sizes, seg_slots)
    case = make_case(seed, len(token_slots), hidden, width, ranks, slots=token_slots).to(DEVICE, torch.float32)
    seg_starts, seg_slots_t = seg_starts.to(DEVICE), seg_slots_t.to(DEVICE)
    max_rank = case.max_rank
    expected = lora_shrink_sgmv_ref(case.x, case.a_rows, seg_starts, seg_slots_t, case.offsets, case.ranks,
                                    max_rank)
    got = lora_shrink_sgmv_triton(case.x, case.a_rows, seg_starts, seg_slots_t, case.offsets, case.ranks, max_rank)
    torch.testing.assert_close(got, expected, **FP32)
    out_ref = torch.randn(len(token_slots), start + width, device=DEVICE)
    out_triton = out_ref.clone()
    lora_expand_sgmv_ref(out_ref, expected, case.b_rows, seg_starts, seg_slots_t, case.offsets, case.ranks,
                         case.scales, start)
    lora_expand_sgmv_triton(out_triton, expected, case.b_rows, seg_starts, seg_slots_t, case.offsets, case.ranks,
                            case.scales, start)
    torch.testing.assert_close(out_triton, out_ref, **FP32)


def test_all_tokens_base_only_leave_the_output_untouched():
    case = make_case(1, 5, 24, 20, [4, 128], base_only=1.0).to(DEVICE, torch.float32)
    assert (case.token_slots == -1).all()
    assert not lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 128).any()
    out = torch.randn(5, 20, device=DEVICE)
    before = out.clone()
    lora_expand_triton(out, torch.ones(5, 128, device=DEVICE), case.b_rows, case.token_slots, case.offsets,
                       case.ranks, case.scales)
    assert torch.equal(out, before)
    seg_starts, seg_slots = segments_from_token_slots(case.token_slots)
    assert not lora_shrink_sgmv_triton(case.x, case.a_rows, seg_starts, seg_slots, case.offsets, case.ranks,
                                       128).any()


def test_single_token_of_rank_128_and_untargeted_slot():
    case = make_case(2, 1, 33, 47, [0, 128], slots=[1]).to(DEVICE, torch.float32)
    shrunk = lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 128)
    torch.testing.assert_close(shrunk.cpu().double(), naive_shrink(case.to("cpu", torch.float32), 128), **FP32)
    untargeted = dataclasses.replace(case, token_slots=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    assert not lora_shrink_triton(untargeted.x, untargeted.a_rows, untargeted.token_slots, untargeted.offsets,
                                  untargeted.ranks, 128).any()


def test_empty_batch_and_empty_segments():
    case = make_case(3, 6, 20, 18, [5, 9], slots=[1, 1, 1, 0, 0, 0]).to(DEVICE, torch.float32)
    seg_starts = torch.tensor([0, 0, 3, 3, 6, 6], device=DEVICE)  # empty segments before, between and after
    seg_slots = torch.tensor([0, 1, 0, 0, 1], device=DEVICE)
    got = lora_shrink_sgmv_triton(case.x, case.a_rows, seg_starts, seg_slots, case.offsets, case.ranks, 9)
    expected = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 9)
    torch.testing.assert_close(got, expected, **FP32)
    empty = torch.zeros(0, 20, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert lora_shrink_triton(empty, case.a_rows, none, case.offsets, case.ranks, 9).shape == (0, 9)
    assert lora_shrink_sgmv_triton(empty, case.a_rows, torch.zeros(1, dtype=torch.int64, device=DEVICE), none,
                                   case.offsets, case.ranks, 9).shape == (0, 9)


def test_many_adapters_of_mixed_ranks_in_one_launch():
    ranks = [1 + (i * 37) % 128 for i in range(64)]
    case = make_case(4, 16, 20, 12, ranks, base_only=0.1).to(DEVICE, torch.float32)
    expected = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 128)
    got = lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 128)
    torch.testing.assert_close(got, expected, **FP32)
    out_ref = torch.zeros(16, 30, device=DEVICE)
    out_triton = out_ref.clone()
    lora_expand_ref(out_ref, expected, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales, 18)
    lora_expand_triton(out_triton, expected, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales,
                       18)
    torch.testing.assert_close(out_triton, out_ref, **FP32)


@pytest.mark.parametrize("splits", [2, 4, 7])
def test_split_k_shrink_adds_its_partial_sums(splits):
    """Small decode batches split the hidden dimension across programs; the atomics must add up."""
    case = make_case(11, 3, 450, 8, [5, 40, 1], base_only=0.0).to(DEVICE, torch.float32)
    expected = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 40)
    got = lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 40, splits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **FP32)


def test_strided_activations_and_a_fused_output_slice():
    """x is a column slice of a wider tensor (row stride > hidden); q, k, v land in one fused output."""
    case = make_case(5, 4, 24, 10, [3, 8]).to(DEVICE, torch.float32)
    wide = torch.randn(4, 40, device=DEVICE)
    wide[:, :24] = case.x
    strided = wide[:, :24]
    fused_ref = torch.randn(4, 30, device=DEVICE)
    fused_triton = fused_ref.clone()
    for start in (0, 10, 20):
        shrunk = lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 8)
        torch.testing.assert_close(
            lora_shrink_triton(strided, case.a_rows, case.token_slots, case.offsets, case.ranks, 8), shrunk, **FP32)
        lora_expand_ref(fused_ref, shrunk, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales,
                        start)
        lora_expand_triton(fused_triton, shrunk, case.b_rows, case.token_slots, case.offsets, case.ranks,
                           case.scales, start)
    torch.testing.assert_close(fused_triton, fused_ref, **FP32)


@pytest.mark.parametrize("slots", [[-1] * 5 + [0] * 40 + [1] * 30 + [-1] * 10, [0, 1, -1, 2] * 20])
def test_add_lora_gives_the_same_answer_on_both_backends(monkeypatch, slots):
    """Long runs take SGMV on Triton, interleaved tokens BGMV; both equal the torch path."""
    import longtail.kernels.lora_triton as lora_triton

    case = make_case(6, len(slots), 24, 20, [4, 16, 2], slots=slots).to(DEVICE, torch.float32)
    launches = []
    for name in ("lora_shrink_sgmv_triton", "lora_shrink_triton"):
        original = getattr(lora_triton, name)
        monkeypatch.setattr(lora_triton, name,
                            lambda *args, _original=original, _name=name, **kwargs:
                            launches.append(_name) or _original(*args, **kwargs))
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LONGTAIL_KERNELS", backend)
        outputs[backend] = torch.zeros(len(slots), 26, device=DEVICE)
        add_lora(outputs[backend], case.x, case.a_rows, case.b_rows, case.token_slots, case.offsets, case.ranks,
                 case.scales, 16, 6)
        with_groups = torch.zeros(len(slots), 26, device=DEVICE)
        add_lora(with_groups, case.x, case.a_rows, case.b_rows, case.token_slots, case.offsets, case.ranks,
                 case.scales, 16, 6, groups=token_groups(case.token_slots))
        torch.testing.assert_close(with_groups, outputs[backend], **FP32)
        seg_starts, seg_slots = segments_from_token_slots(case.token_slots)
        shrunk = lora_shrink_sgmv(case.x, case.a_rows, seg_starts, seg_slots, case.offsets, case.ranks, 16)
        torch.testing.assert_close(shrunk, lora_shrink(case.x, case.a_rows, case.token_slots, case.offsets,
                                                       case.ranks, 16), **FP32)
        again = torch.zeros(len(slots), 26, device=DEVICE)
        lora_expand_sgmv(again, shrunk, case.b_rows, seg_starts, seg_slots, case.offsets, case.ranks, case.scales, 6)
        lora_expand(again, shrunk, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales, 6)
        torch.testing.assert_close(again, 2 * outputs[backend], **FP32)
    torch.testing.assert_close(outputs["triton"], outputs["torch"], **FP32)
    # add_lora's two Triton calls (without and with groups) chose by the runs; the explicit calls follow.
    long_runs = len(slots) // len(segments_from_token_slots(case.token_slots)[1]) >= 8
    assert launches[:2] == ["lora_shrink_sgmv_triton" if long_runs else "lora_shrink_triton"] * 2
    expected = naive_delta(case.to("cpu", torch.float32), 26, 6)
    torch.testing.assert_close(outputs["torch"].cpu().double(), expected, **FP32)


# --- compiled on a GPU, in half precision, at serving shapes --------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_bgmv_on_gpu_in_half_precision(dtype, tokens):
    case = make_case(8, tokens, 4096, 4096 + 7, [8, 16, 64, 0, 128], base_only=0.1).to("cuda", dtype)
    expected = lora_shrink_ref(case.x.float(), case.a_rows.float(), case.token_slots, case.offsets, case.ranks, 128)
    shrunk = lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 128)
    assert shrunk.dtype == dtype
    torch.testing.assert_close(shrunk.float(), expected, atol=0.25, rtol=2e-2)
    out_ref = torch.zeros(tokens, 4096 + 20, device="cuda")
    lora_expand_ref(out_ref, shrunk.float(), case.b_rows.float(), case.token_slots, case.offsets, case.ranks,
                    case.scales, 13)
    out = torch.zeros(tokens, 4096 + 20, device="cuda", dtype=dtype)
    lora_expand_triton(out, shrunk, case.b_rows, case.token_slots, case.offsets, case.ranks, case.scales, 13)
    torch.testing.assert_close(out.float(), out_ref, atol=0.5, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sgmv_on_gpu_in_half_precision(dtype):
    sizes = [300, 0, 511, 1, 700, 536]
    seg_starts, seg_slots, token_slots = random_segments(sizes, [0, 1, 2, -1, 3, 1])
    case = make_case(9, len(token_slots), 4096, 2048 + 5, [16, 64, 8, 128], slots=token_slots).to("cuda", dtype)
    seg_starts, seg_slots = seg_starts.cuda(), seg_slots.cuda()
    expected = lora_shrink_ref(case.x.float(), case.a_rows.float(), case.token_slots, case.offsets, case.ranks, 128)
    shrunk = lora_shrink_sgmv_triton(case.x, case.a_rows, seg_starts, seg_slots, case.offsets, case.ranks, 128)
    torch.testing.assert_close(shrunk.float(), expected, atol=0.25, rtol=2e-2)
    out_ref = torch.zeros(len(token_slots), 2048 + 5, device="cuda")
    lora_expand_ref(out_ref, shrunk.float(), case.b_rows.float(), case.token_slots, case.offsets, case.ranks,
                    case.scales)
    out = torch.zeros(len(token_slots), 2048 + 5, device="cuda", dtype=dtype)
    lora_expand_sgmv_triton(out, shrunk, case.b_rows, seg_starts, seg_slots, case.offsets, case.ranks, case.scales)
    torch.testing.assert_close(out.float(), out_ref, atol=0.5, rtol=2e-2)


@pytest.mark.gpu
def test_fp32_on_gpu_matches_exactly_enough():
    case = make_case(10, 64, 4096, 4096, [8, 16, 64]).to("cuda", torch.float32)
    seg_starts, seg_slots = segments_from_token_slots(torch.sort(case.token_slots).values)
    sorted_case = dataclasses.replace(case, token_slots=torch.sort(case.token_slots).values)
    for got in (lora_shrink_triton(case.x, case.a_rows, case.token_slots, case.offsets, case.ranks, 64),):
        torch.testing.assert_close(got, lora_shrink_ref(case.x, case.a_rows, case.token_slots, case.offsets,
                                                        case.ranks, 64), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(
        lora_shrink_sgmv_triton(sorted_case.x, sorted_case.a_rows, seg_starts, seg_slots, case.offsets, case.ranks,
                                64),
        lora_shrink_ref(sorted_case.x, sorted_case.a_rows, sorted_case.token_slots, case.offsets, case.ranks, 64),
        atol=1e-3, rtol=1e-3)
