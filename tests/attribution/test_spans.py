"""Span attribution over small synthetic Datanets: spans, occurrences and weights checked by brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest

from longtail.attribution.receipts import TOTAL_BPS
from longtail.attribution.spans import (
    IndexedRecord,
    SpanIndex,
    SpanIndexError,
    attribute_output,
    to_basis_points,
)

A = "0x" + "0a" * 32
B = "0x" + "0b" * 32


def random_records(rng: random.Random, count: int, alphabet: range, prefix: str) -> list[IndexedRecord]:
    return [IndexedRecord(f"{prefix}-{i}", f"0x{i % 4 + 1:040x}",
                          [rng.choice(alphabet) for _ in range(rng.randrange(5, 60))]) for i in range(count)]


def occurrences(records: list[IndexedRecord], span: list[int]) -> int:
    total = 0
    for record in records:
        tokens = list(record.token_ids)
        total += sum(tokens[i:i + len(span)] == span for i in range(len(tokens) - len(span) + 1))
    return total


def brute_force_spans(records: list[IndexedRecord], query: list[int], k: int) -> list[tuple[int, int, int]]:
    """Maximal (start, end, occurrences) by definition: longest match at each start, drop covered ones."""
    longest = []
    for i in range(len(query)):
        n = 0
        while i + n < len(query) and occurrences(records, query[i:i + n + 1]):
            n += 1
        longest.append(n)
    spans = []
    for i, n in enumerate(longest):
        if n >= k and not (i > 0 and longest[i - 1] - 1 >= n):
            spans.append((i, i + n, occurrences(records, query[i:i + n])))
    return spans


SEARCHES = ("find_spans", "find_spans_scalar", "find_spans_vectorized")


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("seed, alphabet, k", [(1, range(3, 7), 3), (2, range(100, 104), 4), (3, range(50), 2),
                                               (4, range(70000, 70005), 3)])
def test_spans_equal_the_brute_force_definition(seed, alphabet, k, search):
    rng = random.Random(seed)
    records = random_records(rng, 40, alphabet, "r")
    index = SpanIndex.build(A, records)
    for _ in range(15):
        query = [rng.choice(alphabet) for _ in range(rng.randrange(0, 40))]
        if rng.random() < 0.5:
            source = rng.choice(records).token_ids
            cut = rng.randrange(len(source))
            query[len(query) // 2:len(query) // 2] = source[cut:cut + 20]
        hits = getattr(index, search)(query, k)
        assert [(h.start, h.end, h.occurrences) for h in hits] == brute_force_spans(records, query, k)
        for hit in hits:
            holders = {records[r].record_id for r in index.records_of(hit, max_occurrences=10_000)}
            expected = {r.record_id for r in records if occurrences([r], query[hit.start:hit.end])}
            assert holders == expected


@pytest.mark.parametrize("code_bytes", [2, 4])
def test_scalar_and_vectorized_searches_agree_at_every_size(code_bytes):
    """The node takes the scalar search for short answers and the vectorized one for long ones (or many hits):
    both give the same spans and suffix-array intervals, unknown tokens and hash-filter survivors included."""
    rng = random.Random(11)
    records = random_records(rng, 80, range(1, 9), "r")
    if code_bytes == 4:  # a Datanet with more distinct tokens than two bytes can code
        records.append(IndexedRecord("wide", "0x" + "05" * 20, rng.sample(range(100, 70_000), 66_000)))
    index = SpanIndex.build(A, records)
    assert index._code_bytes == code_bytes
    for length in (0, 3, 8, 9, 30, 120, 300):
        for _ in range(4):
            query = [rng.randrange(1, 9) if rng.random() < 0.9 else 99 for _ in range(length)]  # 99: unknown
            for record in rng.sample(records, 3):
                at = rng.randrange(len(query) + 1)
                query[at:at] = list(record.token_ids[:rng.randrange(min(len(record.token_ids), 80) + 1)])
            for k in (1, 4, 8):
                scalar = index.find_spans_scalar(query, k)
                assert scalar == index.find_spans_vectorized(query, k) == index.find_spans(query, k)


def test_spans_never_cross_record_boundaries():
    records = [IndexedRecord("first", "0x" + "01" * 20, [1, 2, 3, 4]), IndexedRecord("second", "0x" + "02" * 20, [5, 6, 7, 8])]
    index = SpanIndex.build(A, records)
    assert index.find_spans([1, 2, 3, 4, 5, 6, 7, 8], 3) == [
        hit for hit in index.find_spans([1, 2, 3, 4, 5, 6, 7, 8], 3) if hit.end <= 4 or hit.start >= 4]
    assert [(h.start, h.end) for h in index.find_spans([1, 2, 3, 4, 5, 6, 7, 8], 3)] == [(0, 4), (4, 8)]
    assert index.find_spans([3, 4, 5, 6], 3) == []


def two_datanets(rng: random.Random):
    legal = random_records(rng, 60, range(1000, 1400), "legal")
    recipes = random_records(rng, 60, range(2000, 2400), "recipe")
    shared = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    legal[3] = IndexedRecord("legal-3", legal[3].contributor, list(legal[3].token_ids) + shared)
    recipes[9] = IndexedRecord("recipe-9", recipes[9].contributor, shared + list(recipes[9].token_ids))
    return legal, recipes, shared


def test_weights_follow_matched_tokens_and_reach_the_records():
    rng = random.Random(5)
    legal, recipes, _ = two_datanets(rng)
    indexes = [SpanIndex.build(A, legal), SpanIndex.build(B, recipes)]
    filler = [rng.randrange(5000, 6000) for _ in range(200)]
    source = next(r for r in legal if len(r.token_ids) >= 30)
    from_legal = list(source.token_ids[:30])
    from_recipes = list(next(r for r in recipes if len(r.token_ids) >= 10).token_ids[:10])
    output = filler[:50] + from_legal + filler[50:120] + from_recipes + filler[120:]
    result = attribute_output(output, indexes, min_span=8)
    assert result.vector.datanet_ids == (A, B)
    assert result.vector.weights_bps == (7500, 2500)
    assert result.matched_tokens == 40
    assert [(s.start, s.end, s.datanet_id) for s in result.spans] == [(50, 80, A), (150, 160, B)]
    assert result.records[0].record_id == source.record_id and result.records[0].contributor == source.contributor
    assert result.records[0].weight == pytest.approx(0.75)
    assert sum(w for _, _, w in result.contributors) == pytest.approx(1.0)


def test_text_shared_by_datanets_is_split_among_all_holders():
    rng = random.Random(6)
    legal, recipes, shared = two_datanets(rng)
    indexes = [SpanIndex.build(A, legal), SpanIndex.build(B, recipes)]
    only_legal = list(next(r for r in legal if len(r.token_ids) >= 20).token_ids[:20])
    output = [9000] * 5 + only_legal + [9001] * 5 + shared + [9002] * 5
    result = attribute_output(output, indexes, min_span=8)
    # 20 tokens only in A; 10 tokens in both, each split evenly: A = 20 + 5, B = 5.
    assert dict(zip(result.vector.datanet_ids, result.vector.weights_bps, strict=True)) == {A: 8333, B: 1667}
    assert result.matched_tokens == 30
    assert attribute_output(shared, indexes, min_span=8).vector.weights_bps == (5000, 5000)
    # Below min_weight_bps a Datanet is dropped as noise and the rest renormalized.
    assert attribute_output(output, indexes, min_span=8, min_weight_bps=2000).vector.weights_bps == (10000,)


def test_nothing_matched_gives_the_empty_vector():
    rng = random.Random(7)
    legal, recipes, _ = two_datanets(rng)
    indexes = [SpanIndex.build(A, legal), SpanIndex.build(B, recipes)]
    for output in ([], [9000] * 300, list(legal[0].token_ids[:7])):
        result = attribute_output(output, indexes, min_span=8)
        assert result.vector.datanet_ids == () and result.spans == () and result.records == ()
    assert attribute_output(list(legal[0].token_ids[:20]), [], min_span=8).vector.weights_bps == ()


def test_index_file_is_mapped_and_binds_tokenizer_and_records_root(tmp_path):
    rng = random.Random(8)
    legal, _, _ = two_datanets(rng)
    index = SpanIndex.build(A, legal, tokenizer_id="tok:1", records_root="0x" + "ab" * 32)
    index.save(tmp_path / "legal.lti")
    loaded = SpanIndex.load(tmp_path / "legal.lti", A, "tok:1", "0x" + "AB" * 32)
    assert isinstance(loaded.suffix_array, np.ndarray) and not loaded.suffix_array.flags.owndata  # a view of the map
    assert np.array_equal(loaded.suffix_array, index.suffix_array) and list(loaded.record_ids) == list(index.record_ids)
    assert list(loaded.contributors) == [r.contributor for r in legal]
    query = [1] * 10 + list(next(r for r in legal if len(r.token_ids) >= 25).token_ids[2:25]) + [2] * 10
    assert loaded.find_spans(query) == index.find_spans(query) == loaded.find_spans_vectorized(query) != []
    with pytest.raises(SpanIndexError, match="indexes datanet"):
        SpanIndex.load(tmp_path / "legal.lti", B)
    with pytest.raises(SpanIndexError, match="tokenizer"):
        SpanIndex.load(tmp_path / "legal.lti", A, "tok:2")
    with pytest.raises(SpanIndexError, match="records root"):
        SpanIndex.load(tmp_path / "legal.lti", A, "tok:1", "0x" + "cd" * 32)
    with pytest.raises(SpanIndexError, match="cannot load"):
        SpanIndex.load(tmp_path / "missing.lti")
    blob = (tmp_path / "legal.lti").read_bytes()
    for hostile in (b"LTSPAN01" + blob[8:], blob[:200], blob[:8] + (2**40).to_bytes(8, "little") + blob[16:]):
        (tmp_path / "bad.lti").write_bytes(hostile)
        with pytest.raises(SpanIndexError, match="cannot load"):
            SpanIndex.load(tmp_path / "bad.lti")


def test_index_holds_at_most_10_bytes_per_token():
    rng = random.Random(12)
    common = [int(t) for t in np.random.default_rng(12).zipf(1.3, 200_000) if t < 40_000]  # word-like frequencies
    records = [IndexedRecord(f"r{i}", "0x" + "01" * 20, [rng.choice(common) for _ in range(rng.randrange(40, 200))])
               for i in range(1000)]
    index = SpanIndex.build(A, records)
    tokens = sum(len(r.token_ids) for r in records)
    assert index.nbytes / tokens <= 10


@pytest.mark.parametrize("weights", [{A: 1.0}, {A: 1.0, B: 2.0}, {A: 1 / 3, B: 1 / 3, "c": 1 / 3},
                                     {str(i): random.Random(i).random() for i in range(37)}])
def test_basis_points_always_sum_to_10000(weights):
    bps = to_basis_points(weights)
    assert sum(bps.values()) == TOTAL_BPS and all(v > 0 for v in bps.values())
    total = sum(weights.values())
    for key, value in bps.items():
        assert abs(value - weights[key] * TOTAL_BPS / total) < 1
