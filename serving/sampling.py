"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed, logprobs."""

from __future__ import annotations

import dataclasses

import torch

from longtail.serving.errors import InvalidSamplingParams, SamplingFailed

# torch.Generator.manual_seed takes any value in [-2^63, 2^64); OpenAI's seed is an int64.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and stops. temperature 0 is greedy; `stop` strings need the engine's tokenizer."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidSamplingParams(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        # `0.0 <= x <= 100.0` is False for NaN, so these range checks also refuse NaN and infinities.
        if isinstance(self.temperature, bool) or not (isinstance(self.temperature, (int, float))
                                                      and 0.0 <= self.temperature <= 100.0):
            raise InvalidSamplingParams(f"temperature must be in [0, 100], got {self.temperature}")
        # top_p 0 is allowed (OpenAI accepts it): the most likely token always stays, so it means greedy-like.
        if isinstance(self.top_p, bool) or not (isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0):
            raise InvalidSamplingParams(f"top_p must be in [0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidSamplingParams(f"top_k must be an int >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InvalidSamplingParams(f"seed must be an int in [-2^63, 2^64) or None, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidSamplingParams(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise InvalidSamplingParams(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """One token from fp32 logits [V]; returns (token, its log-probability under the unmodified distribution)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    if params.temperature == 0.0:
        token = int(torch.argmax(logits))
        return token, float(log_probs[token])
    # Shift by the max before dividing: with a tiny temperature (1e-40) logits / T overflows to inf and the softmax
    # of inf - inf is NaN; shifted, the best token is 0 and the rest fall to -inf, which is the limit T -> 0.
    scaled = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        drop[0] = False
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probabilities = torch.softmax(scaled, dim=-1)
    try:
        token = int(torch.multinomial(probabilities.cpu(), 1, generator=generator))
    except RuntimeError as error:  # a distribution with NaN/inf/negative mass: this row only cannot be sampled
        raise SamplingFailed(f"could not sample (temperature={params.temperature}, top_p={params.top_p}, "
                             f"top_k={params.top_k}): {error}") from None
    return token, float(log_probs[token])


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[tuple[int, float | None] | SamplingFailed]:
    """One token per row of fp32 logits [N, V]; greedy rows in one argmax, others one by one with their seed.

    The log-probability is returned only for rows whose params ask for it. A row that cannot be sampled gets its
    `SamplingFailed` in place of a pick, so the caller fails that request alone and the batch goes on.
    """
    greedy = logits.argmax(dim=-1).tolist()
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    log_probs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
    row_of = {index: row for row, index in enumerate(wanted)}
    results: list[tuple[int, float | None]] = []
    for index, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if row_params.temperature == 0.0:
            token = greedy[index]
        else:
            try:
                token, _ = sample(logits[index], row_params, generator)
            except SamplingFailed as error:
                results.append(error)
                continue
        logprob = float(log_probs[row_of[index], token]) if log_probs is not None and index in row_of else None
        results.append((token, logprob))
    return results
