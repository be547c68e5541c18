"""Span attribution benchmark: planted spans from the synthetic Datanets, precision/recall and latency.

Builds ~10 MB of Datanet text (the four synthetic domains, regenerated at 2.8 MB
each with the shipped generator), tokenizes it with the base model's tokenizer,
indexes each Datanet, then attributes 256-token outputs made of novel filler plus
spans copied from records of one or two Datanets. Reports Datanet-level precision
and recall, query latency, and the speed-up over a naive scan (bytes.find of each
output k-gram in each Datanet's token bytes), and writes a table to docs/attribution.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from longtail.attribution.datanets import build_manifest  # noqa: E402
from longtail.attribution.spans import IndexedRecord, SpanIndex, attribute_output, tokenize_records  # noqa: E402
from longtail.attribution.synthetic import DEFAULT_SEED, DOMAINS, generate_records  # noqa: E402
from longtail.scripts.docs_section import write_section  # noqa: E402

MODEL = Path(os.environ.get("LONGTAIL_HOME", Path.home() / ".cache" / "longtail")) / "models" / "smollm2-135m-instruct"
FILLER_WORDS = ("river window quietly orange seven bicycle whisper mountain paper yellow engine garden softly "
                "lantern marble thirteen violin cloud harbor pencil silver autumn ladder breeze copper meadow "
                "puzzle candle forest ribbon velvet island tunnel feather compass saddle thunder orchard kettle "
                "glacier pebble jacket shadow rocket canyon walnut umbrella festival horizon tiger planet").split()


def filler(rng: random.Random, tokenizer, count: int) -> list[int]:
    words = " ".join(rng.choice(FILLER_WORDS) for _ in range(count))
    return tokenizer(" " + words, add_special_tokens=False)["input_ids"][:count]


def planted_output(rng, tokenizer, datanet_tokens, names, length=256):
    sources = rng.sample(names, rng.choice([1, 1, 2]))
    pieces = []
    for name in sources:
        for _ in range(rng.choice([1, 2])):
            records = datanet_tokens[name]
            record = records[rng.randrange(len(records))]
            while len(record) < 40:
                record = records[rng.randrange(len(records))]
            span = rng.randrange(16, 40)
            start = rng.randrange(len(record) - span + 1)
            pieces.append(list(record[start:start + span]))
    budget = length - sum(len(p) for p in pieces)
    gaps = sorted(rng.randrange(budget + 1) for _ in range(len(pieces)))
    bounds = [0, *gaps, budget]
    fill = filler(rng, tokenizer, budget + 20)[:budget]
    output = []
    for i, piece in enumerate(pieces):
        output += fill[bounds[i]:bounds[i + 1]] + piece
    output += fill[bounds[-2]:]
    return output[:length], set(sources)


def naive_hits(output, datanet_bytes, k):
    """Baseline: which Datanets contain some k-gram of the output, by scanning token bytes."""
    found = set()
    for name, blob in datanet_bytes.items():
        for i in range(len(output) - k + 1):
            if np.asarray(output[i:i + k], dtype=">u4").tobytes() in blob:
                found.add(name)
                break
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes-per-datanet", type=int, default=2_800_000)
    parser.add_argument("--outputs", type=int, default=300)
    parser.add_argument("--min-span", type=int, default=8)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    rng = random.Random(7)
    indexes, datanet_tokens, ids, total_bytes, total_tokens = [], {}, {}, 0, 0
    started = time.perf_counter()
    for name, (_domain, make_text) in DOMAINS.items():
        records = generate_records(name, make_text, DEFAULT_SEED, args.bytes_per_datanet)
        ident = build_manifest(name, "0x" + "11" * 20, records).datanet_id
        tokens = tokenize_records([r.text for r in records], tokenizer)
        t0 = time.perf_counter()
        indexes.append(SpanIndex.build(ident, (IndexedRecord(r.id, r.contributor, t) for r, t in zip(records, tokens, strict=True))))
        print(f"{name}: {len(records)} records, {sum(map(len, tokens))} tokens, index built in {time.perf_counter() - t0:.2f} s")
        datanet_tokens[name], ids[name] = tokens, ident
        total_bytes += sum(len(r.text.encode()) for r in records)
        total_tokens += sum(map(len, tokens))
    print(f"prepared {total_bytes / 1e6:.1f} MB, {total_tokens} tokens in {time.perf_counter() - started:.1f} s")
    by_id = {v: k for k, v in ids.items()}
    names = list(DOMAINS)
    true_positive = predicted = actual = 0
    weight_on_truth = []
    latencies = []
    cases = [planted_output(rng, tokenizer, datanet_tokens, names) for _ in range(args.outputs)]
    controls = [filler(rng, tokenizer, 256) for _ in range(args.outputs // 5)]
    for _ in range(3):  # warm the per-k hash sets and caches
        attribute_output(cases[0][0], indexes, args.min_span)
    for output, truth in cases:
        # Best of 3 per output: the 2 cores are shared with other jobs, whose bursts are not ours.
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            result = attribute_output(output, indexes, args.min_span)
            runs.append((time.perf_counter() - t0) * 1e3)
        latencies.append(min(runs))
        found = {by_id[d] for d in result.vector.datanet_ids}
        true_positive += len(found & truth)
        predicted += len(found)
        actual += len(truth)
        weight_on_truth.append(sum(w for d, w in zip(result.vector.datanet_ids, result.vector.weights_bps, strict=True)
                                   if by_id[d] in truth) / 10_000)
    false_on_controls = 0
    for output in controls:
        result = attribute_output(output, indexes, args.min_span)
        false_on_controls += len(result.vector.datanet_ids)
    predicted += false_on_controls
    precision = true_positive / predicted if predicted else 1.0
    recall = true_positive / actual
    datanet_bytes = {n: np.concatenate([np.asarray(t + [2**31], dtype=">u4") for t in datanet_tokens[n]]).tobytes()
                     for n in names}
    naive_cases = cases[:10]
    t0 = time.perf_counter()
    for output, _ in naive_cases:
        naive_hits(output, datanet_bytes, args.min_span)
    naive_ms = (time.perf_counter() - t0) * 1e3 / len(naive_cases)
    p50, p99 = statistics.median(latencies), float(np.percentile(latencies, 99))
    mean = statistics.fmean(latencies)
    print(f"precision {precision:.3f}  recall {recall:.3f}  weight on true Datanets {statistics.fmean(weight_on_truth):.3f}"
          f"  false Datanets on {len(controls)} filler-only outputs: {false_on_controls}")
    print(f"latency per 256-token output: mean {mean:.2f} ms, p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
          f"naive scan {naive_ms:.1f} ms -> {naive_ms / mean:.0f}x faster")
    rows = [
        "| measure | value |", "| --- | --- |",
        f"| Datanet text | {total_bytes / 1e6:.1f} MB, {total_tokens:,} tokens, 4 Datanets |",
        f"| outputs | {len(cases)} planted (256 tokens, 1–4 spans of 16–39 tokens from 1–2 Datanets) + {len(controls)} filler-only |",
        f"| precision (Datanet level) | {precision:.3f} |",
        f"| recall (Datanet level) | {recall:.3f} |",
        f"| mean weight on the true Datanets | {statistics.fmean(weight_on_truth):.3f} |",
        f"| Datanets reported for filler-only outputs | {false_on_controls} |",
        f"| latency per output (best of 3), mean / p50 / p99 | {mean:.2f} / {p50:.2f} / {p99:.2f} ms |",
        f"| naive k-gram scan (baseline, same run) | {naive_ms:.1f} ms per output ({naive_ms / mean:.0f}x slower) |",
    ]
    if not args.no_docs:
        write_section(REPO / "docs" / "attribution.md", "bench_attribution", "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
