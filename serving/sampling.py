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
    if not sampled:
        # max gives the argmax and the logit that says whether the row had one: a greedy row whose best logit is
        # NaN or +inf (or all -inf) has no token either.
        best, tokens = logits.max(dim=-1)
        usable = torch.isfinite(best)
    else:
        inputs = _device_inputs(params, sampled, _uniforms([generators[row] for row in sampled]), vocab,
                                logits.device)
        subset = logits if len(sampled) == count else logits.index_select(0, inputs.rows)
        drawn, drawable = _draw(_distribution(subset, inputs), inputs.uniform)
        # The argmax costs as much as a softmax: only when there are greedy rows. `max` returns the same first
        # index as `argmax`, ~3x faster on this CPU.
        if len(sampled) == count:
            tokens = drawn
        else:
            tokens = logits.max(dim=-1).indices.index_copy_(0, inputs.rows, drawn)
            drawable = torch.ones(count, dtype=torch.bool, device=logits.device).index_copy_(0, inputs.rows, drawable)
        usable = drawable & torch.isfinite(logits.gather(1, tokens[:, None])[:, 0])
    tokens = tokens.masked_fill(~usable, -1)  # -1: this row could not be sampled
    # The one read back: tokens (< 2^53) and fp32 log-probabilities are exact in float64.
    if any(p.logprobs for p in params):
        # log_softmax rather than logsumexp: torch's CPU exp and logsumexp are ~10x slower on -inf and very negative
        # inputs, which masked vocabularies hold; log_softmax and softmax are not.
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.clamp(min=0)[:, None])[:, 0]
        token_list, logprob_list = torch.stack([tokens.double(), logprobs.double()]).tolist()
    else:
        token_list, logprob_list = tokens.tolist(), [None] * count
    results: list[tuple[int, float | None] | SamplingFailed] = []
    for row_params, token, logprob in zip(params, token_list, logprob_list, strict=True):
        if token < 0:
            results.append(SamplingFailed(
                f"could not sample (temperature={row_params.temperature}, top_p={row_params.top_p}, "
                f"top_k={row_params.top_k}): the distribution has NaN or infinite mass"))
        else:
            results.append((int(token), logprob if row_params.logprobs else None))
    return results


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution [N, V] each row of fp32 logits draws from under its params; a greedy row is one-hot."""
    vocab = logits.shape[-1]
    # scatter rather than one_hot, which reads the indices back to check them
    result = torch.zeros_like(logits).scatter_(1, logits.max(dim=-1, keepdim=True).indices, 1.0)
    sampled = [row for row, p in enumerate(params) if p.temperature != 0.0]
    if sampled:
        inputs = _device_inputs(params, sampled, torch.ones(len(sampled), dtype=torch.float64), vocab, logits.device)
        result = result.index_copy(0, inputs.rows, _distribution(logits.index_select(0, inputs.rows), inputs))
    return result


@dataclasses.dataclass(frozen=True)
class _RowInputs:
    """The sampled rows' indices [S] and parameters on the device, and the rows (among the S) that filter, in two
    groups: `by_top_k` (top-k below the vocabulary, maybe top-p too) looks at the `width` largest logits, the
    largest top-k among them (known on the host); `by_sort` (top-p alone) needs the whole vocabulary sorted."""

    rows: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    uniform: torch.Tensor
    by_top_k: torch.Tensor | None
    width: int
    ties_beyond_width: bool
    by_sort: torch.Tensor | None


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
    # Top-k at or above the vocabulary is off; rows with neither filter skip both groups.
    by_top_k = [i for i, p in enumerate(chosen) if 0 < p.top_k < vocab]
    by_sort = [i for i, p in enumerate(chosen) if not 0 < p.top_k < vocab and p.top_p < 1.0]
    host = torch.cat([
        torch.tensor([float(row) for row in sampled]
                     + [float(p.temperature) for p in chosen]
                     + [float(min(p.top_k, vocab) if p.top_k else vocab) for p in chosen]
                     + [float(p.top_p) for p in chosen], dtype=torch.float64),
        uniform,
        torch.tensor([float(i) for i in by_top_k + by_sort], dtype=torch.float64),
    ])
    if device.type == "cuda":
        host = host.pin_memory()
    values = host.to(device, non_blocking=True)
    size = len(sampled)
    rows, temperature, top_k, top_p, uniform = values[:5 * size].view(5, size)
    width = max((chosen[i].top_k for i in by_top_k), default=vocab)
    # Only top-p needs the mass of tokens tied with the k-th value that `topk(width)` may have left out.
    ties_beyond_width = any(chosen[i].top_p < 1.0 for i in by_top_k)
    groups = values[5 * size:].long()
    return _RowInputs(rows.long(), temperature.float(), top_k.long(), top_p.float(), uniform.float(),
                      groups[:len(by_top_k)] if by_top_k else None, width, ties_beyond_width,
                      groups[len(by_top_k):] if by_sort else None)


def _distribution(logits: torch.Tensor, inputs: _RowInputs) -> torch.Tensor:
    """Temperature, then top-k and top-p on the rows that ask for them, then softmax: probabilities [S, V]."""
    # Shift by the max before dividing: with a tiny temperature (1e-40) logits / T overflows to inf and the softmax
    # of inf - inf is NaN; shifted, the best token is 0 and the rest fall to -inf, which is the limit T -> 0. The
    # floor keeps a temperature below fp32's smallest normal from becoming 0 (0 / 0) or a flushed denormal.
    floor = torch.finfo(torch.float32).tiny
    scaled = (logits - logits.amax(dim=-1, keepdim=True)).div_(inputs.temperature.clamp_min(floor)[:, None])
    # Two groups so that one top-p row does not make the top-k rows sort the whole vocabulary; a row's result does
    # not depend on its group's width (see `_filter`).
    for rows, width, ties_beyond_width in ((inputs.by_top_k, inputs.width, inputs.ties_beyond_width),
                                           (inputs.by_sort, scaled.shape[-1], False)):
        if rows is None:
            continue
        if rows.numel() == scaled.shape[0]:
            scaled = _filter(scaled, inputs.top_k, inputs.top_p, width, ties_beyond_width)
        else:
            kept = _filter(scaled.index_select(0, rows), inputs.top_k.index_select(0, rows),
                           inputs.top_p.index_select(0, rows), width, ties_beyond_width)
            scaled = scaled.index_copy_(0, rows, kept)
    return torch.softmax(scaled, dim=-1)


def _draw(probabilities: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF, one uniform in (0, 1] per row: (tokens [S], drawable [S]: False where the mass is NaN or
    infinite)."""
    cumulative = probabilities.cumsum(dim=-1)
    total = cumulative[:, -1:]
    # The target lies in (0, total]: the first index whose running mass reaches it has positive probability, and
    # scaling by the row's own total keeps fp32 rounding of the sum from pushing it past the end.
    target = (uniform[:, None] * total).contiguous()
    tokens = torch.searchsorted(cumulative, target)[:, 0].clamp_(max=probabilities.shape[-1] - 1)
    return tokens, torch.isfinite(total[:, 0]) & (total[:, 0] > 0)


def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int,
            ties_beyond_width: bool) -> torch.Tensor:
    """Top-k (top_k = V: off), then top-p (1: off) over rows [F, V], in place; dropped logits become -inf.

    Both keep a prefix of the logits in descending order, so each row's filter is one cutoff value: the last kept
    logit. Only the sorted values are used, never the order of tied tokens, so the result is the same whether the
    values come from a full sort or from `topk(width)` (enough: every row's k is at most `width`), and tokens tied
    with the cutoff stay together. That keeps a row's draws independent of the other rows in its batch.
    """
    if width >= scaled.shape[-1]:
        values = torch.sort(scaled, dim=-1, descending=True).values
    else:
        values = torch.topk(scaled, width, dim=-1).values  # sorted, largest first
    kth = values.gather(1, (top_k - 1)[:, None])
    # softmax, not exp: torch's CPU exp is ~10x slower on -inf and very negative inputs (tiny temperatures).
    weights = torch.softmax(values.masked_fill(values < kth, float("-inf")), dim=-1)
    if ties_beyond_width:
        # Top-p measures mass within what top-k keeps, ties with the k-th value included; a tie can lie beyond
        # `width`, and each such token weighs what the k-th one does.
        left_out = (scaled == kth).sum(dim=-1, keepdim=True) - (values == kth).sum(dim=-1, keepdim=True)
        total = 1.0 + left_out * weights.gather(1, (top_k - 1)[:, None])
    else:
        total = 1.0
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    before = (weights.cumsum(dim=-1) - weights) / total
    keep = (values >= kth) & ((before < top_p[:, None]) | (top_p >= 1.0)[:, None])
    keep[:, 0] = True  # the first token always stays (top_p 0)
    cutoff = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    return scaled.masked_fill_(scaled < cutoff, float("-inf"))
