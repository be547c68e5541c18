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
    (pick,) = sample_rows(logits[None], [dataclasses.replace(params, logprobs=True)], [generator])
    if isinstance(pick, SamplingFailed):
        raise pick
    return pick


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[tuple[int, float | None] | SamplingFailed]:
    """One token per row of fp32 logits [N, V], all rows in one batched pass and one device-to-host transfer.

    Greedy rows take the argmax; the others draw by inverse CDF from one uniform each, taken on the host from the
    row's own generator (a seeded request gets the same tokens whatever else is in the batch) or, unseeded, from
    torch's default one. The log-probability is returned only for rows whose params ask for it. A row that cannot
    be sampled gets its `SamplingFailed` in place of a pick, so the caller fails that request alone.
    """
    count, vocab = logits.shape
    if count != len(params) or count != len(generators):
        raise ValueError(f"{count} logit rows but {len(params)} params and {len(generators)} generators")
    if count == 0:
        return []
    sampled = [row for row, p in enumerate(params) if p.temperature != 0.0]
    tokens = logits.argmax(dim=-1)
    failed = torch.zeros(count, dtype=torch.bool, device=logits.device)
    if sampled:
        inputs = _device_inputs(params, sampled, _uniforms([generators[row] for row in sampled]), vocab,
                                logits.device)
        subset = logits if len(sampled) == count else logits.index_select(0, inputs.rows)
        drawn, mass_failed = _draw(_distribution(subset, inputs), inputs.uniform)
        if len(sampled) == count:
            tokens, failed = drawn, mass_failed
        else:
            tokens = tokens.index_copy(0, inputs.rows, drawn)
            failed = failed.index_copy(0, inputs.rows, mass_failed)
    chosen = logits.gather(1, tokens[:, None])[:, 0]
    # A greedy row whose best logit is NaN or +inf (or all -inf) has no token either.
    failed = failed | ~torch.isfinite(chosen)
    if any(p.logprobs for p in params):
        logprobs = chosen - torch.logsumexp(logits, dim=-1)
    else:
        logprobs = torch.zeros_like(chosen)
    # The one read back: tokens (< 2^53) and fp32 log-probabilities are exact in float64.
    token_list, logprob_list, failed_list = torch.stack([tokens.double(), logprobs.double(), failed.double()]).tolist()
    results: list[tuple[int, float | None] | SamplingFailed] = []
    for row_params, token, logprob, row_failed in zip(params, token_list, logprob_list, failed_list, strict=True):
        if row_failed:
            results.append(SamplingFailed(
                f"could not sample (temperature={row_params.temperature}, top_p={row_params.top_p}, "
                f"top_k={row_params.top_k}): the distribution has NaN or infinite mass"))
        else:
            results.append((int(token), logprob if row_params.logprobs else None))
    return results


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution [N, V] each row of fp32 logits draws from under its params; a greedy row is one-hot."""
    count, vocab = logits.shape
    result = torch.nn.functional.one_hot(logits.argmax(dim=-1), vocab).to(logits.dtype)
    sampled = [row for row, p in enumerate(params) if p.temperature != 0.0]
    if sampled:
        inputs = _device_inputs(params, sampled, torch.ones(len(sampled), dtype=torch.float64), vocab, logits.device)
        result = result.index_copy(0, inputs.rows, _distribution(logits.index_select(0, inputs.rows), inputs))
    return result


@dataclasses.dataclass(frozen=True)
class _RowInputs:
    """The sampled rows' indices [S] and parameters on the device; `filtered` indexes the rows that need the sort."""

    rows: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    uniform: torch.Tensor
    filtered: torch.Tensor | None


def _uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """One uniform per sampled row in (0, 1], on the host: a seeded row's from its own generator, so its draw does
    not depend on the batch; the unseeded rows' from torch's default generator in one call. Zero is excluded since
    it would select a leading zero-probability token."""
    unseeded = sum(generator is None for generator in generators)
    shared = iter(torch.rand(unseeded, dtype=torch.float64)) if unseeded else iter(())
    return 1.0 - torch.cat([torch.rand(1, dtype=torch.float64, generator=generator) if generator is not None
                            else next(shared)[None] for generator in generators])


def _device_inputs(params: list[SamplingParams], sampled: list[int], uniform: torch.Tensor, vocab: int,
                   device: torch.device) -> _RowInputs:
    """Row indices, parameters and uniforms, all known on the host, in one host-to-device copy.

    One float64 buffer (exact for the integers here), pinned and non-blocking on a GPU: nothing waits for the device.
    """
    chosen = [params[row] for row in sampled]
    # Top-k at or above the vocabulary and top-p 1 change nothing: those rows skip the sort.
    filtered = [i for i, p in enumerate(chosen) if 0 < p.top_k < vocab or p.top_p < 1.0]
    host = torch.cat([
        torch.tensor([float(row) for row in sampled]
                     + [float(p.temperature) for p in chosen]
                     + [float(min(p.top_k, vocab) if p.top_k else vocab) for p in chosen]
                     + [float(p.top_p) for p in chosen], dtype=torch.float64),
        uniform,
        torch.tensor([float(i) for i in filtered], dtype=torch.float64),
    ])
    if device.type == "cuda":
        host = host.pin_memory()
    values = host.to(device, non_blocking=True)
    size = len(sampled)
    rows, temperature, top_k, top_p, uniform = values[:5 * size].view(5, size)
    return _RowInputs(rows.long(), temperature.float(), top_k.long(), top_p.float(), uniform.float(),
                      values[5 * size:].long() if filtered else None)


def _distribution(logits: torch.Tensor, inputs: _RowInputs) -> torch.Tensor:
    """Temperature, then top-k and top-p on the rows that ask for them, then softmax: probabilities [S, V]."""
    # Shift by the max before dividing: with a tiny temperature (1e-40) logits / T overflows to inf and the softmax
    # of inf - inf is NaN; shifted, the best token is 0 and the rest fall to -inf, which is the limit T -> 0. The
    # floor keeps a temperature below fp32's smallest normal from becoming 0 (0 / 0) or a flushed denormal.
    floor = torch.finfo(torch.float32).tiny
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / inputs.temperature.clamp_min(floor)[:, None]
    filtered = inputs.filtered
    if filtered is not None:
        if filtered.numel() == scaled.shape[0]:
            scaled = _filter(scaled, inputs.top_k, inputs.top_p)
        else:
            kept = _filter(scaled.index_select(0, filtered), inputs.top_k.index_select(0, filtered),
                           inputs.top_p.index_select(0, filtered))
            scaled = scaled.index_copy(0, filtered, kept)
    return torch.softmax(scaled, dim=-1)


def _draw(probabilities: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF, one uniform in (0, 1] per row: (tokens [S], failed [S] where the mass is NaN or infinite)."""
    cumulative = probabilities.cumsum(dim=-1)
    total = cumulative[:, -1:]
    # The target lies in (0, total]: the first index whose running mass reaches it has positive probability, and
    # scaling by the row's own total keeps fp32 rounding of the sum from pushing it past the end.
    target = (uniform[:, None] * total).contiguous()
    tokens = torch.searchsorted(cumulative, target)[:, 0].clamp_(max=probabilities.shape[-1] - 1)
    failed = ~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0)
    return tokens, failed


def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k (top_k = V: off), then top-p (1: off) over rows [F, V], with one sort; dropped logits become -inf."""
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    kth = sorted_logits.gather(1, (top_k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probabilities = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays): drop a token when the mass
    # before it already reaches top_p.
    drop = (probabilities.cumsum(dim=-1) - probabilities >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
