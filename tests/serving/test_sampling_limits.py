"""The sampler at the edges of its parameters: it draws or fails one row, never the batch (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch

from longtail.serving.errors import InvalidSamplingParams, SamplingFailed
from longtail.serving.sampling import SamplingParams, sample, sample_rows


def logits_row(seed: int = 0, size: int = 50) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 8


def test_a_tiny_temperature_is_the_greedy_limit_not_a_crash():
    row = logits_row()
    for temperature in (1e-40, 1e-30, 1e-8):
        token, logprob = sample(row, SamplingParams(temperature=temperature), torch.Generator().manual_seed(1))
        assert token == int(row.argmax())
        assert math.isfinite(logprob)


def test_top_p_zero_keeps_the_most_likely_token():
    row = logits_row(3)
    picks = {sample(row, SamplingParams(top_p=0.0), torch.Generator().manual_seed(s))[0] for s in range(20)}
    assert picks == {int(row.argmax())}


def test_a_row_that_cannot_be_sampled_fails_alone():
    rows = torch.stack([logits_row(1), torch.full((50,), float("nan")), logits_row(2)])
    params = [SamplingParams(temperature=0.7, seed=s) for s in range(3)]
    picks = sample_rows(rows, params, [p.generator() for p in params])
    assert isinstance(picks[1], SamplingFailed)
    assert all(isinstance(p, tuple) and 0 <= p[0] < 50 for p in (picks[0], picks[2]))


@pytest.mark.parametrize("bad", [
    {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")}, {"top_p": -0.1},
    {"seed": 2**64}, {"seed": -(2**63) - 1}, {"max_tokens": True}, {"top_k": 1.0},
])
def test_validate_refuses_what_the_sampler_could_not_use(bad):
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(**bad).validate()


def test_validate_takes_the_extremes_openai_allows():
    SamplingParams(temperature=1e-40, top_p=0.0, seed=2**64 - 1).validate()
    SamplingParams(seed=-(2**63)).generator()
