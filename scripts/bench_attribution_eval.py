"""Held-out evaluation of span attribution and its payment rule, before (a git revision) and after (this tree).

Datanets and outputs come from a generator of this script's own, apart from
attribution/synthetic.py (which the tests and scripts/bench_attribution.py
use): four Datanets whose records are sentences of the base tokenizer's own
whole-word vocabulary (a topic vocabulary per Datanet with Zipf frequencies,
shared function words), with

- generic stock phrases (English boilerplate and code-ish lines an answer
  produces on its own) sprinkled into records and into novel text alike;
- shared sentences, each present in two or three Datanets;
- templated records (one template, slots filled), so the exact source record
  is the only one holding the slot values.

Outputs are 256 tokens of novel text (fresh sentences and stock phrases) with
planted copies: verbatim spans of 8-12 tokens, of 13-40 tokens, near-verbatim
copies (20-40 tokens with a word replaced about every 10 tokens), whole shared
sentences, whole templated records; and outputs of novel text only.

Reported per scale (records over the four Datanets), for the baseline revision
(its `attribute_output` and its 50/50 blend with the registry shares) and for
this tree (`Attributor`): token-level precision and recall per kind, novel
outputs whose payment moved off the registry shares, L1 error of the receipt's
vector against the truth (the same payment rule applied to the planted tokens),
exact source record found, latency per 256-token output, index bytes per token.
Writes the table into docs/attribution.md between `<!-- attribution_eval:start -->`
and `<!-- attribution_eval:end -->`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from longtail.attribution.spans import (  # noqa: E402
    IndexedRecord,
    SpanIndex,
    attribute_output,
    ensure_reference,
    tokenizer_fingerprint,
)
from longtail.node.attributor import Attributor  # noqa: E402
from longtail.node.catalog import CatalogEntry, DatanetShare  # noqa: E402
from longtail.scripts.docs_section import write_section  # noqa: E402

MODEL = Path(os.environ.get("LONGTAIL_HOME", Path.home() / ".cache" / "longtail")) / "models" / "smollm2-135m-instruct"
BASELINE_REV = "bf158eafc3a87983856312e504a68da8c9c76bf5"  # attribution/spans.py before issue 23
DATANETS = [("0x" + f"{i + 1:02x}" * 32) for i in range(4)]
REGISTRY = {d: 2500 for d in DATANETS}
FUNCTION_WORDS = ("the of and to in is for that with as on by this be are from at or which it an was not can "
                  "has have will each its their more when all also into than these other such only may some "
                  "any between both after over under most where while about").split()
STOCK_PHRASES = [
    "Thank you for your question, I hope this helps you with your work.",
    "Let me know if you have any other questions about this topic.",
    "Traceback (most recent call last):\n  File \"<stdin>\", line 1, in <module>",
    "Changed in version 3.8: the default value was changed.",
    "For more information, please refer to the official documentation.",
    "It is important to note that the results may vary depending on the situation.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "5, 10, 15, 20, 25, 30",
    "In conclusion, there are many factors to consider when making this decision.",
    "Please note that this is only a summary and not a complete list.",
    "As mentioned above, the answer depends on the context of the question.",
    "On the other hand, there are also some disadvantages to this approach.",
    "import numpy as np\nimport pandas as pd",
    "if __name__ == \"__main__\":\n    main()",
    "The quick brown fox jumps over the lazy dog.",
    "All rights reserved. No part of this publication may be reproduced.",
]
TEMPLATE = ("Order {n} was shipped to {a} {b} on day {d}, and the package contained {c} units of {e} "
            "together with a printed receipt signed by the warehouse supervisor.")


class Generator:
    """Sentences of whole words from the tokenizer's vocabulary: a topic vocabulary per Datanet, Zipf weights."""

    def __init__(self, tokenizer, seed: int) -> None:
        rng = random.Random(seed)
        words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()
                        and t[1:].islower() and 4 <= len(t) - 1 <= 12})
        rng.shuffle(words)
        self.topics = [words[i * 2500:(i + 1) * 2500] for i in range(5)]  # 4 Datanets + novel-only words
        ranks = np.arange(1, 2501)
        self.weights = list(1 / ranks ** 1.05)
        self.rng = rng

    def sentence(self, topic: int, rng: random.Random) -> str:
        count = rng.randrange(8, 22)
        words = [rng.choice(FUNCTION_WORDS) if rng.random() < 0.35 else
                 rng.choices(self.topics[topic], self.weights)[0] for _ in range(count)]
        return " ".join(words).capitalize() + "."

    def record(self, topic: int, rng: random.Random, stock_rate: float) -> str:
        parts = [self.sentence(topic, rng) for _ in range(rng.randrange(1, 4))]
        if rng.random() < stock_rate:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(STOCK_PHRASES))
        return " ".join(parts)


def build_datanets(gen: Generator, tokenizer, total_records: int, seed: int):
    """Four Datanets of `total_records` records in all; returns records per Datanet and the shared sentences."""
    rng = random.Random(seed)
    shared = [(gen.sentence(4, rng), rng.sample(range(4), rng.choice([2, 3]))) for _ in range(40)]
    per = total_records // 4
    datanets = []
    for d in range(4):
        texts = []
        for i in range(per):
            if d == 0 and i % 5 == 0:  # templated records
                texts.append(TEMPLATE.format(n=i * 7 + 1000, a=rng.choice(gen.topics[0]), b=rng.choice(gen.topics[0]),
                                             d=rng.randrange(1, 366), c=rng.randrange(2, 999),
                                             e=rng.choice(gen.topics[0])))
            else:
                texts.append(gen.record(d, rng, stock_rate=0.1))
        for sentence, holders in shared:
            if d in holders:
                at = rng.randrange(len(texts))
                texts[at] = texts[at] + " " + sentence
        datanets.append(texts)
    tokens = [[list(t) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]] for texts in datanets]
    return datanets, tokens, shared


def words_tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(" " + text, add_special_tokens=False)["input_ids"]


def novel_tokens(gen: Generator, tokenizer, rng: random.Random, count: int) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        piece = rng.choice(STOCK_PHRASES) if rng.random() < 0.25 else gen.sentence(4, rng)
        out += words_tokens(tokenizer, piece)
    return out[:count]


def word_start_positions(tokenizer_tokens: list[str]) -> list[int]:
    return [i for i, t in enumerate(tokenizer_tokens) if t.startswith("Ġ")]


def plant(kind: str, gen, tokenizer, rng, texts, tokens, shared, length=256):
    """One output of `kind`; truth per token: {datanet: [record numbers]} for copied tokens, None for novel."""
    pieces: list[tuple[list[int], dict | None, str]] = []
    if kind == "novel":
        return novel_tokens(gen, tokenizer, rng, length), [None] * length, []
    copies = rng.choice([1, 2, 3]) if kind in ("8-12", "13+", "near") else 1
    for _ in range(copies):
        if kind == "shared":
            sentence, holders = rng.choice(shared)
            piece = words_tokens(tokenizer, sentence)
            owners = {}
            for d in holders:
                owners[DATANETS[d]] = [r for r, text in enumerate(texts[d]) if sentence in text]
            pieces.append((piece, owners, kind))
            continue
        if kind == "template":
            # A templated record as the template made it: not one a shared sentence was appended to (whose truth
            # would be several Datanets; the "shared" kind plants those).
            while True:
                r = rng.randrange(0, len(texts[0]), 5)
                if not any(sentence in texts[0][r] for sentence, _ in shared):
                    break
            pieces.append((list(tokens[0][r]), {DATANETS[0]: [r]}, kind))
            continue
        d = rng.randrange(4)
        while True:
            r = rng.randrange(len(texts[d]))
            record = tokens[d][r]
            if d == 0 and r % 5 == 0:
                continue
            # Copies come from a record's own text: not a stock phrase (generic, found in many records) nor a
            # shared sentence (whose truth is several Datanets; the "shared" kind plants those).
            if any(p in texts[d][r] for p in STOCK_PHRASES) or any(sentence in texts[d][r] for sentence, _ in shared):
                continue
            names = tokenizer.convert_ids_to_tokens(record)
            starts = word_start_positions(names)
            want = rng.randrange(8, 13) if kind == "8-12" else rng.randrange(13, 41) if kind == "13+" else rng.randrange(20, 41)
            # a copy starts and ends at word boundaries, as a model repeating text does
            options = [s for s in starts if any(e - s >= want for e in starts + [len(record)])
                       and not any("Ċ" in n for n in names[s:s + want])]
            if options:
                break
        s = rng.choice(options)
        ends = [e for e in starts + [len(record)] if e - s >= want]
        e = min(ends)
        piece = list(record[s:e])
        truth = {DATANETS[d]: [r]}
        if kind == "near":
            marks = list(range(rng.randrange(6, 11), len(piece) - 1, 10))
            piece = list(piece)
            mutated = set()
            for m in marks:
                word = words_tokens(tokenizer, rng.choice(gen.topics[4]))
                piece[m:m + 1] = word[:1]
                mutated.add(m)
            pieces.append((piece, truth, kind, mutated))
            continue
        pieces.append((piece, truth, kind))
    budget = length - sum(len(p[0]) for p in pieces)
    fill = novel_tokens(gen, tokenizer, rng, max(budget, 0) + 64)
    # A copy goes in where a filler word starts: cut anywhere, the filler's next word piece would glue onto the
    # copy's last word (" dyed" + "thus"), which no model repeating a record writes.
    names = tokenizer.convert_ids_to_tokens(fill[:max(budget, 0) + 1])
    openings = [i for i in range(max(budget, 0) + 1) if names[i].startswith("Ġ")] or [0]
    cuts = sorted(rng.choice(openings) for _ in pieces)
    output, truth = [], []
    last = 0
    for cut, item in zip(cuts, pieces, strict=True):
        output += fill[last:cut]
        truth += [None] * (cut - last)
        last = cut
        piece, owners = item[0], item[1]
        mutated = item[3] if len(item) > 3 else set()
        output += piece
        truth += [None if i in mutated else owners for i in range(len(piece))]
    output += fill[last:budget]
    truth += [None] * (budget - last)
    return output[:length], truth[:length], pieces


def load_baseline(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:attribution/spans.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "spans_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("spans_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["spans_baseline"] = module
    spec.loader.exec_module(module)
    return module


def baseline_attribute(module, output, indexes):
    """The baseline node: span weights blended 50/50 with the registry shares as soon as any span matched."""
    matched = module.attribute_output(output, indexes, 8)
    if not matched.vector.datanet_ids:
        return dict(REGISTRY), matched.spans, matched.records, set()
    span = dict(zip(matched.vector.datanet_ids, matched.vector.weights_bps, strict=True))
    blended = {d: 0.5 * share / 10_000 + 0.5 * span.get(d, 0) / 10_000 for d, share in REGISTRY.items()}
    covered = {i for s in matched.spans for i in range(s.start, s.end)}
    return module.to_basis_points(blended), matched.spans, matched.records, covered


def truth_vector(truth: list) -> dict[str, float]:
    """The payment rule applied to the planted tokens: prior moved by the copied fraction toward their holders."""
    length = len(truth)
    span: dict[str, float] = {}
    copied = 0
    for owners in truth:
        if owners:
            copied += 1
            for d in owners:
                span[d] = span.get(d, 0) + 1 / len(owners)
    weight = copied / length
    return {d: (1 - weight) * REGISTRY[d] / 10_000 + weight * span.get(d, 0) / max(copied, 1) for d in DATANETS}


def l1(weights: dict[str, int], truth: dict[str, float]) -> float:
    return sum(abs(weights.get(d, 0) / 10_000 - truth[d]) for d in DATANETS)


def exact_records(pieces, output_truth, spans, records) -> tuple[int, int]:
    """For each planted copy with one source record: is the record with the most credit over it that record?"""
    found = total = 0
    weight = {(r.datanet_id, r.record_id): r.weight for r in records}
    starts = []
    for i, owners in enumerate(output_truth):
        if owners and (i == 0 or output_truth[i - 1] is not owners):
            starts.append(i)
    for start in starts:
        owners = output_truth[start]
        end = start
        while end < len(output_truth) and output_truth[end] is owners:
            end += 1
        if len(owners) != 1:
            continue
        (d, rows), = owners.items()
        if len(rows) != 1:
            continue
        total += 1
        candidates = {(s.datanet_id, c.record_id) for s in spans if s.start < end and s.end > start
                      for c in s.records}
        candidates |= {(r.datanet_id, r.record_id) for r in records}
        overlapping = [key for key in candidates if key[0] == d and key in weight]
        listed = {(s.datanet_id, c.record_id) for s in spans if s.start < end and s.end > start for c in s.records}
        overlapping = [key for key in overlapping if key in listed] or overlapping
        if overlapping and max(overlapping, key=lambda k: (weight[k], k))[1] == f"r{rows[0]}":
            found += 1
    return found, total


def old_index_bytes(index) -> int:
    """What the baseline index holds in memory once queried: codes, suffix array, int32 text, prefix keys, text
    bytes, and the per-k hash set."""
    total = index.tokens.nbytes + index.suffix_array.nbytes + index._text.nbytes + index._prefix.nbytes
    total += len(index._text_bytes) + sum(h.nbytes for h in index._gram_hashes.values())
    return total


def run_scale(total_records, args, tokenizer, reference, baseline, gen):
    # The outputs' own stream: seeded like build_datanets' it would replay the draws that made the shared
    # sentences, and the novel filler would repeat pieces of them.
    rng = random.Random(f"outputs-{args.seed + total_records}")
    texts, tokens, shared = build_datanets(gen, tokenizer, total_records, args.seed + total_records)
    token_count = sum(len(t) for ts in tokens for t in ts)
    fingerprint = tokenizer_fingerprint(tokenizer)
    new_indexes, old_indexes = {}, []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for d, datanet in enumerate(DATANETS):
            records = [IndexedRecord(f"r{i}", "0x" + "11" * 20, t) for i, t in enumerate(tokens[d])]
            SpanIndex.build(datanet, records, fingerprint).save(Path(tmp) / f"{d}.lti")
            new_indexes[datanet] = SpanIndex.load(Path(tmp) / f"{d}.lti", datanet, fingerprint)
        build_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        for d, datanet in enumerate(DATANETS):
            records = [baseline.IndexedRecord(f"r{i}", "0x" + "11" * 20, t) for i, t in enumerate(tokens[d])]
            old_indexes.append(baseline.SpanIndex.build(datanet, records))
        build_old = time.perf_counter() - t0
        attributor = Attributor(new_indexes, reference=reference)
        entry = CatalogEntry(name="eval", adapter_id="0x" + "aa" * 32, price_per_1k_tokens=1,
                             datanets=tuple(DatanetShare(d, f"d{i}", REGISTRY[d]) for i, d in enumerate(DATANETS)))
        kinds = ["8-12", "13+", "near", "shared", "template", "novel"]
        counts = {"8-12": args.outputs, "13+": args.outputs, "near": args.outputs, "shared": args.outputs // 3,
                  "template": args.outputs // 3, "novel": args.outputs}
        cases = [(kind, *plant(kind, gen, tokenizer, rng, texts, tokens, shared)) for kind in kinds
                 for _ in range(counts[kind])]
        results = {}
        for label in ("before", "after"):
            stats = {k: {"tp": 0, "fp": 0, "fn": 0} for k in kinds}
            moved, l1_errors, latencies, found, total = 0, [], [], 0, 0
            for _ in range(3):
                attributor.attribute(entry, cases[0][1])
                baseline.attribute_output(cases[0][1], old_indexes, 8)
            for kind, output, truth, pieces in cases:
                # Best of 3 per output: the 2 CI cores are shared with other jobs, whose bursts are not ours.
                runs = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    if label == "after":
                        attributor.attribute(entry, output)
                    else:
                        baseline_attribute(baseline, output, old_indexes)
                    runs.append(time.perf_counter() - t0)
                latency = min(runs)
                if label == "after":
                    result = attributor.attribute(entry, output)
                    weights = dict(zip(result.vector.datanet_ids, result.vector.weights_bps, strict=True))
                    spans = result.spans
                    # The records and the tokens that earned credit (in a kept span, not generic): the same search
                    # again, for what the receipt does not carry.
                    detail = attribute_output(output, list(new_indexes.values()), reference=reference)
                    records = detail.records
                    credited = set(np.flatnonzero(detail.credited).tolist())
                else:
                    weights, spans, records, covered = baseline_attribute(baseline, output, old_indexes)
                    credited = covered
                latencies.append(latency * 1e3)
                planted = {i for i, owners in enumerate(truth) if owners}
                stats[kind]["tp"] += len(credited & planted)
                stats[kind]["fp"] += len(credited - planted)
                stats[kind]["fn"] += len(planted - credited)
                if kind == "novel" and weights != REGISTRY:
                    moved += 1
                l1_errors.append(l1(weights, truth_vector(truth)))
                if kind in ("13+", "8-12", "template"):
                    f, t = exact_records(pieces, truth, spans, records)
                    found += f
                    total += t
            index_bytes = (sum(i.nbytes for i in new_indexes.values()) if label == "after"
                           else sum(old_index_bytes(i) for i in old_indexes))
            results[label] = {
                "stats": stats, "moved": moved, "novel": counts["novel"], "l1_mean": statistics.fmean(l1_errors),
                "l1_p95": float(np.percentile(l1_errors, 95)), "found": found, "found_total": total,
                "p50": statistics.median(latencies), "p99": float(np.percentile(latencies, 99)),
                "bytes_per_token": index_bytes / token_count,
                "build_s": build_new if label == "after" else build_old,
            }
    return token_count, results


def pr(stats) -> str:
    tp, fp, fn = stats["tp"], stats["fp"], stats["fn"]
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return f"{precision:.3f} / {recall:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", default="1000,10000,100000")
    parser.add_argument("--outputs", type=int, default=60, help="outputs per kind (shared, templated: a third)")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--reference-home", default=None,
                        help="where the reference corpus index lives (default: the node's, $LONGTAIL_HOME/reference)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    t0 = time.perf_counter()
    from longtail.serving.base_models import longtail_home

    home = Path(args.reference_home) if args.reference_home else longtail_home() / "reference"
    reference = ensure_reference(home / tokenizer_fingerprint(tokenizer).split(":")[-1], tokenizer)
    print(f"reference corpus: {reference.index.size:,} positions ({time.perf_counter() - t0:.1f} s)", flush=True)
    baseline = load_baseline(args.baseline_rev)
    gen = Generator(tokenizer, args.seed)
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        t0 = time.perf_counter()
        tokens, results = run_scale(scale, args, tokenizer, reference, baseline, gen)
        print(f"{scale} records, {tokens:,} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
        for label in ("before", "after"):
            r = results[label]
            s = r["stats"]
            row = (f"| {scale:,} ({tokens / 1e6:.2f} M tokens) | {label} | {pr(s['8-12'])} | {pr(s['13+'])} | "
                   f"{pr(s['near'])} | {pr(s['shared'])} | {r['moved']} / {r['novel']} | "
                   f"{r['stats']['novel']['fp']} | {r['l1_mean']:.3f} / {r['l1_p95']:.3f} | "
                   f"{r['found'] / max(1, r['found_total']):.3f} | {r['p50']:.2f} / {r['p99']:.2f} | "
                   f"{r['bytes_per_token']:.1f} | {r['build_s']:.1f} |")
            print(row, flush=True)
            rows.append(row)
    table = "\n".join([
        f"`python scripts/bench_attribution_eval.py --scales {args.scales} --outputs {args.outputs}` "
        f"(before: attribution/spans.py at {args.baseline_rev[:10]} with the 50/50 blend; after: this tree's "
        f"`Attributor`; 256-token outputs, {args.outputs} per kind, a third for shared and templated; latency: the "
        f"whole attribution of one output, best of 3, on the 2-core CI CPU shared with other jobs).",
        "",
        "| records | | P / R 8-12 tok | P / R ≥13 tok | P / R near-verbatim | P / R shared | novel outputs moved "
        "| novel tokens credited | L1 mean / p95 | exact record | ms per 256 tok p50 / p99 | index B/token "
        "| build s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])
    print(table)
    if not args.no_docs:
        write_section(REPO / "docs" / "attribution.md", "attribution_eval", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
