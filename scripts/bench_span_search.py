"""Scalar against vectorized span search, by output length: why `SpanIndex.find_spans` picks one per stage.

On the shipped legal-clauses Datanet's index, queries of 8–256 tokens that
repeat consecutive records verbatim (nearly every k-gram a hit), half a record then novel tokens,
or novel tokens only (no hit) are searched with `find_spans_vectorized` (the
baseline: numpy, all positions at once), `find_spans_scalar` (bisect over byte
strings, one position at a time) and `find_spans` (the node's choice per
stage). Prints the median ms of each and the ratio to the baseline, checks that
all three agree, and writes the table to docs/attribution.md between
`<!-- span_search:start -->` and `<!-- span_search:end -->`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "attribution.md"

from longtail.attribution.spans import (  # noqa: E402
    DEFAULT_MIN_SPAN,
    SCALAR_SEARCH_MAX_HITS,
    SpanIndex,
    load_datanet_index,
)
from longtail.scripts.docs_section import write_section  # noqa: E402

DATANET = ROOT / "data" / "datanets" / "legal-clauses"


def median_ms(search, query: list[int], repeats: int) -> float:
    search(query)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        search(query)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def record_tokens(index: SpanIndex, rng: random.Random, length: int) -> list[int]:
    """`length` token ids of consecutive records (separators dropped): almost every k-gram occurs verbatim."""
    codes = index.tokens[index.tokens > 0].astype(int)
    start = rng.randrange(len(codes) - length)
    return [int(index.vocabulary[code - 1]) for code in codes[start:start + length]]


def queries(index: SpanIndex, rng: random.Random, length: int) -> dict[str, list[int]]:
    unused = sorted(set(range(1, 49_000)) - set(index.vocabulary.tolist()))
    novel = [rng.choice(unused) for _ in range(length)]
    verbatim = record_tokens(index, rng, length)
    return {"verbatim": verbatim, "half verbatim": verbatim[:length // 2] + novel[length // 2:], "novel": novel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    index = load_datanet_index(DATANET)
    rng = random.Random(0)
    rows = []
    for length in (8, 16, 32, 64, 128, 256):
        for kind, query in queries(index, rng, length).items():
            spans = index.find_spans_vectorized(query)
            if not spans == index.find_spans_scalar(query) == index.find_spans(query):
                print(f"the searches disagree on a {length}-token {kind} query", file=sys.stderr)
                return 1
            vectorized = median_ms(index.find_spans_vectorized, query, args.repeats)
            scalar = median_ms(index.find_spans_scalar, query, args.repeats)
            chosen = median_ms(index.find_spans, query, args.repeats)
            rows.append(f"| {length} | {kind} | {len(spans)} | {vectorized:.3f} | {scalar:.3f} "
                        f"({vectorized / scalar:.1f}x) | {chosen:.3f} ({vectorized / chosen:.1f}x) |")
    table = "\n".join([
        f"`python scripts/bench_span_search.py` (the legal-clauses index, {index.size:,} positions, "
        f"min_span {DEFAULT_MIN_SPAN}; median of {args.repeats} searches; ratios against the vectorized search "
        f"in the same run). `find_spans` filters k-grams with the index's Bloom filter and "
        f"searches in Python up to {SCALAR_SEARCH_MAX_HITS} surviving k-grams.",
        "",
        "| output tokens | output | spans | vectorized ms (baseline) | scalar ms | find_spans ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    print(table)
    write_section(DOC, "span_search", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
