"""The batched sampler: the same distributions as a per-row reference, seeded draws that ignore the batch, failures
that stay in their row, and one device-to-host transfer per call (issue 25)."""

from __future__ import annotations

import math

import pytest
import torch

from longtail.serving.errors import SamplingFailed
from longtail.serving.sampling import SamplingParams, probabilities, sample_rows

from device_reads import READS, DeviceReads


def reference_probabilities(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row, the straightforward way: temperature, top-k by torch.topk, top-p by a sort, softmax."""
    if params.temperature == 0.0:
        return torch.nn.functional.one_hot(row.argmax(), row.numel()).float()
    scaled = (row - row.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        mass = torch.softmax(sorted_logits, dim=-1)
        drop = mass.cumsum(dim=-1) - mass >= params.top_p
        drop[0] = False
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(scaled, dim=-1)


MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=10, top_p=0.5),
    SamplingParams(temperature=1.0, top_p=0.0),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=0.9, top_k=1000),  # above the vocabulary: off
    SamplingParams(temperature=0.0, top_k=3, top_p=0.2),  # greedy ignores the filters
    SamplingParams(temperature=0.5, top_p=0.999),
]


def mixed_logits(rows: int = len(MIXED), vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


def test_batched_distributions_equal_the_per_row_reference():
    logits = mixed_logits()
    batched = probabilities(logits, MIXED)
    for row, params in enumerate(MIXED):
        expected = reference_probabilities(logits[row], params)
        assert torch.equal(batched[row] > 0, expected > 0), f"row {row} keeps other tokens ({params})"
        torch.testing.assert_close(batched[row], expected, atol=1e-6, rtol=1e-5)
    kept = (batched > 0).sum(dim=-1).tolist()
    assert kept[2] == 5 and kept[5] == 1 and kept[6] == 1 and kept[7] == 64


def test_top_p_keeps_the_smallest_prefix_that_reaches_it():
    row = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1.0])
    mass = torch.softmax(row, dim=-1).cumsum(dim=-1).tolist()
    params = [SamplingParams(top_p=mass[1] - 1e-4), SamplingParams(top_p=mass[1] + 1e-4),
              SamplingParams(top_p=mass[3] + 1e-4), SamplingParams(top_p=0.0), SamplingParams(top_p=0.999999)]
    kept = (probabilities(row.expand(len(params), -1), params) > 0).sum(dim=-1).tolist()
    assert kept == [2, 3, 5, 1, 6]


def test_tokens_tied_at_the_cutoff_stay_together():
    """Four equal tokens: which of them a cutoff would keep is arbitrary, so all stay (top-k and top-p alike)."""
    row = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, -2.0]])
    for params in (SamplingParams(top_k=2), SamplingParams(top_k=2, top_p=0.9), SamplingParams(top_p=0.5)):
        kept = probabilities(row, [params])[0] > 0
        assert kept.tolist() == [True, True, True, True, True, False], params
    top = probabilities(torch.zeros(1, 4), [SamplingParams(top_p=0.0)])[0]
    torch.testing.assert_close(top, torch.full((4,), 0.25))


def test_top_p_after_top_k_weighs_every_tie_at_the_k_th_logit():
    """Top-k 3 keeps six tokens here (four tie at the third logit); top-p 0.75 measures mass among all six, whether
    the batch's widest top-k is 3 (the ties lie beyond the values looked at) or 10."""
    row = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    params = SamplingParams(top_k=3, top_p=0.75)
    alone = probabilities(row[None], [params])[0]
    beside = probabilities(torch.stack([row, row]), [params, SamplingParams(top_k=10, top_p=0.5)])[0]
    assert (alone > 0).tolist() == [True] * 6 + [False] * 6
    torch.testing.assert_close(alone, beside)
    torch.testing.assert_close(alone[:6], torch.softmax(row[:6], dim=-1))


def test_greedy_rows_take_the_argmax_and_logprobs_are_the_unmodified_ones():
    logits = mixed_logits(seed=1)
    params = [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, logprobs=row % 2 == 0)
              for row, p in enumerate(MIXED)]
    picks = sample_rows(logits, params, [torch.Generator().manual_seed(row) for row in range(len(params))])
    log_softmax = torch.log_softmax(logits, dim=-1)
    for row, (pick, row_params) in enumerate(zip(picks, params, strict=True)):
        token, logprob = pick
        if row_params.temperature == 0.0:
            assert token == int(logits[row].argmax())
        if row_params.logprobs:
            assert logprob == pytest.approx(float(log_softmax[row, token]), abs=1e-5)
        else:
            assert logprob is None
        assert reference_probabilities(logits[row], row_params)[token] > 0


def draw_sequence(logits: torch.Tensor, params: SamplingParams, steps: int, neighbours: list[SamplingParams],
                  position: int) -> list[int]:
    """`steps` draws of one seeded request placed at `position` among `neighbours` (seeded, unseeded, greedy)."""
    generator = params.generator()
    others = [p.generator() for p in neighbours]
    tokens = []
    for step in range(steps):
        batch_params = neighbours[:position] + [params] + neighbours[position:]
        batch_generators = others[:position] + [generator] + others[position:]
        rows = [logits[(step + i) % logits.shape[0]] for i in range(len(batch_params))]
        rows[position] = logits[step % logits.shape[0]]
        pick = sample_rows(torch.stack(rows), batch_params, batch_generators)[position]
        tokens.append(pick[0])
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.7, top_k=8, seed=2**63),
    SamplingParams(temperature=1.2, top_p=0.8, seed=-5),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.6, seed=0),
])
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied-logits"])
def test_a_seeded_request_draws_the_same_alone_or_in_any_batch(params, tied):
    logits = mixed_logits(rows=6, vocab=200, seed=4)
    if tied:  # integer logits: many ties at every top-k and top-p cutoff
        logits = logits.round()
    alone = draw_sequence(logits, params, 12, [], 0)
    assert alone == draw_sequence(logits, params, 12, [], 0)  # same seed, same tokens, run after run
    neighbours = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), SamplingParams(top_p=0.3, seed=1),
                  SamplingParams(temperature=0.5, top_k=3)]
    for position in (0, 2, 4):
        assert draw_sequence(logits, params, 12, neighbours, position) == alone
    assert len(set(alone)) > 1  # it does sample: a constant sequence would hide a broken generator


CHI_SQUARE_LIMIT = 30.0  # above the 0.9999 quantile for 7 degrees of freedom (29.9); the draws are seeded anyway


def chi_square(counts: torch.Tensor, expected: torch.Tensor, draws: int) -> float:
    support = expected > 0
    return float((((counts[support] - draws * expected[support]) ** 2) / (draws * expected[support])).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.5),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.5, top_k=6, top_p=0.8),
])
def test_unseeded_draws_follow_the_distribution(params):
    row = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0])
    draws = 20_000
    torch.manual_seed(11)
    picks = sample_rows(row.expand(draws, -1).contiguous(), [params] * draws, [None] * draws)
    counts = torch.bincount(torch.tensor([token for token, _ in picks]), minlength=row.numel()).double()
    expected = reference_probabilities(row, params).double()
    assert counts[expected == 0].sum() == 0  # a filtered-out token is never drawn
    assert chi_square(counts, expected, draws) < CHI_SQUARE_LIMIT


def test_seeded_draws_follow_the_distribution():
    """One draw each from 8,000 seeds: the per-row generators are uniform as well."""
    row = torch.tensor([1.0, 0.8, 0.2, 0.0, -0.3, -1.0, -2.0, -4.0])
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=seed) for seed in range(8_000)]
    picks = sample_rows(row.expand(len(params), -1).contiguous(), params, [p.generator() for p in params])
    counts = torch.bincount(torch.tensor([token for token, _ in picks]), minlength=row.numel()).double()
    expected = reference_probabilities(row, params[0]).double()
    assert counts[expected == 0].sum() == 0
    assert chi_square(counts, expected, len(params)) < CHI_SQUARE_LIMIT


def test_rows_that_cannot_be_sampled_fail_alone_and_the_others_draw_as_without_them():
    good = mixed_logits(rows=3, vocab=50, seed=6)
    nan_at_one = good[0].clone()
    nan_at_one[17] = float("nan")
    positive_inf = good[1].clone()
    positive_inf[3] = float("inf")
    bad = [torch.full((50,), float("nan")), nan_at_one, positive_inf, torch.full((50,), float("-inf")),
           torch.full((50,), float("nan"))]
    bad_params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9),
                  SamplingParams(temperature=1.0, top_k=4), SamplingParams(temperature=0.5),
                  SamplingParams(temperature=0.0)]
    good_params = [SamplingParams(temperature=0.7, seed=1, logprobs=True), SamplingParams(temperature=0.0),
                   SamplingParams(top_p=0.5, seed=2)]
    alone = sample_rows(good, good_params, [p.generator() for p in good_params])
    rows = torch.stack([bad[0], good[0], bad[1], bad[2], good[1], bad[3], good[2], bad[4]])
    params = [bad_params[0], good_params[0], bad_params[1], bad_params[2], good_params[1], bad_params[3],
              good_params[2], bad_params[4]]
    picks = sample_rows(rows, params, [p.generator() for p in params])
    assert [isinstance(p, SamplingFailed) for p in picks] == [True, False, True, True, False, True, False, True]
    assert [picks[1], picks[4], picks[6]] == alone
    assert math.isfinite(alone[0][1])


def test_an_empty_batch_and_mismatched_lengths():
    assert sample_rows(torch.zeros(0, 10), [], []) == []
    with pytest.raises(ValueError):
        sample_rows(torch.zeros(2, 10), [SamplingParams()], [None])




@pytest.mark.parametrize("mix", ["mixed", "greedy", "sampled", "logprobs-free"])
def test_one_device_to_host_transfer_per_call(monkeypatch, mix):
    logits = mixed_logits(seed=9)
    params = {
        "mixed": [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=row, logprobs=True)
                  for row, p in enumerate(MIXED)],
        "greedy": [SamplingParams(temperature=0.0, logprobs=True)] * len(MIXED),
        "sampled": [SamplingParams(temperature=0.8, top_p=0.9)] * len(MIXED),
        "logprobs-free": list(MIXED),
    }[mix]
    generators = [p.generator() for p in params]
    reads = DeviceReads(monkeypatch)
    reads.active = True
    try:
        picks = sample_rows(logits, params, generators)
    finally:
        reads.active = False
    counts = reads.counts
    assert counts == {**dict.fromkeys(READS, 0), "tolist": 1}
    assert all(isinstance(p, tuple) for p in picks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA's own sync detector")
def test_on_a_gpu_the_only_synchronizing_call_is_the_read_back():
    """CUDA's sync debug mode warns on every call that waits for the device: one, the final read back."""
    import warnings

    logits = mixed_logits(seed=12).cuda()
    params = [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=row, logprobs=True)
              for row, p in enumerate(MIXED)]
    generators = [p.generator() for p in params]
    sample_rows(logits, params, [p.generator() for p in params])  # warm the caching allocators
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            picks = sample_rows(logits, params, generators)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch prints one notice that the mode is a prototype when it is switched on; the warnings that count are
    # the ones it raises for a call ("called a synchronizing CUDA operation"), seen on an H200 with torch 2.11.
    synchronizing = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert len(synchronizing) == 1, [str(w.message) for w in synchronizing]
    on_cpu = sample_rows(logits.cpu(), params, [p.generator() for p in params])
    assert [pick[0] for pick in picks] == [pick[0] for pick in on_cpu]
