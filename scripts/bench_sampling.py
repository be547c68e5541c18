"""The batched sampler against the per-row one it replaced, on CPU logits [N, 49152] (issue 25).

The baseline, run in the same process, is the old sampler kept here as `_sample_rows_reference`: one argmax for
greedy rows, then per non-greedy row a temperature, top-k, top-p (its own sort), a softmax copied to the host and
`torch.multinomial` with the row's generator; logprobs read back one `float()` per row. Writes a table to
docs/serving.md (the "Sampling" section).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from longtail.scripts.docs_section import write_section  # noqa: E402
from longtail.serving.sampling import SamplingParams, sample_rows  # noqa: E402

WORKLOADS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 0.8": SamplingParams(temperature=0.8, seed=1),
    "top-k 50": SamplingParams(temperature=0.8, top_k=50, seed=1),
    "top-p 0.9, logprobs": SamplingParams(temperature=1.0, top_p=0.9, seed=1, logprobs=True),
    "top-k 50, top-p 0.9": SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=1),
}


def _sample_reference(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The old per-row draw (serving/sampling.py before issue 25), less its error wrapping."""
    scaled = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        drop[0] = False
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probabilities = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


def _sample_rows_reference(logits: torch.Tensor, params: list[SamplingParams],
                           generators: list[torch.Generator | None]) -> list[tuple[int, float | None]]:
    """The old loop: greedy rows in one argmax, the others one by one, logprobs one `float()` each."""
    greedy = logits.argmax(dim=-1).tolist()
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    log_probs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
    row_of = {index: row for row, index in enumerate(wanted)}
    results = []
    for index, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        token = greedy[index] if row_params.temperature == 0.0 else _sample_reference(logits[index], row_params,
                                                                                       generator)
        logprob = float(log_probs[row_of[index], token]) if log_probs is not None and index in row_of else None
        results.append((token, logprob))
    return results


def time_pair(logits: torch.Tensor, params: list[SamplingParams], repeats: int) -> tuple[float, float]:
    """Median milliseconds of one call of each sampler, the two interleaved so that both see the same load on
    these shared cores; fresh generators each call (as a new step of the same requests)."""
    times: dict[object, list[float]] = {_sample_rows_reference: [], sample_rows: []}
    for repeat in range(repeats + 1):
        for sampler, spent in times.items():
            generators = [p.generator() for p in params]
            started = time.perf_counter()
            sampler(logits, params, generators)
            if repeat:  # the first round warms the allocator
                spent.append(time.perf_counter() - started)
    return statistics.median(times[_sample_rows_reference]) * 1e3, statistics.median(times[sample_rows]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--repeats", type=int, default=7)
    # One thread by default: on two cores shared with other work, a second one times the contention.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    rows = ["| batch | rows sample with | per-row sampler (ms) | batched (ms) | speed-up |", "| --- | --- | --- | --- | --- |"]
    for batch in args.batches:
        logits = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(batch)) * 3
        mixes = {name: [row_params] * batch for name, row_params in WORKLOADS.items()}
        if batch > 1:  # a step's rows as they come: each row takes the next workload, seeded or not
            kinds = list(WORKLOADS.values())
            mixes["mixed, half unseeded"] = [dataclasses.replace(kinds[row % len(kinds)],
                                                                 seed=None if row % 2 else row)
                                             for row in range(batch)]
        for name, params in mixes.items():
            old, new = time_pair(logits, params, args.repeats)
            loads.append(os.getloadavg()[0])
            print(f"batch {batch:4d}  {name:22s} per-row {old:8.2f} ms  batched {new:8.2f} ms  {old / new:5.2f}x")
            rows.append(f"| {batch} | {name} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    note = (f"\nV = {args.vocab}, fp32 logits on the CPU, {args.threads} torch thread(s), median of {args.repeats} "
            f"interleaved calls; load average {min(loads):.1f}–{max(loads):.1f} on 2 shared cores "
            "(`.venv/bin/python -P scripts/bench_sampling.py`).")
    print(note.strip())
    if not args.no_docs:
        write_section(REPO / "docs" / "serving.md", "bench_sampling", "\n".join(rows) + "\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
