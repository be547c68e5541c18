"""Which spans count and who they pay: whole words, delimiters, the frequency cap, the reference corpus, the
uniqueness budget, shared spans split among all holders, templated records, and the payment rule."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from longtail.attribution.datanets import Record, build_manifest, write_datanet
from longtail.attribution.receipts import AttributionVector, ReceiptDomain, SignedReceipt
from longtail.attribution.spans import (
    MIN_SURPRISAL,
    IndexedRecord,
    Lexicon,
    Reference,
    SpanIndex,
    SpanIndexError,
    attribute_output,
    ensure_datanet_index,
    load_datanet_index,
    span_log_probs,
)
from longtail.node.attributor import Attributor, recompute_weights, span_weight_bps
from longtail.node.catalog import CatalogEntry, DatanetShare

A, B, C = ("0x" + c * 32 for c in ("0a", "0b", "0c"))
WORD = range(1000, 2000)  # "Ġword" tokens: start a word
PIECE = range(2000, 2100)  # word pieces glued to the token before
COMMA, SPACE, NEWLINE = 3000, 3001, 3002
DIGIT = range(3010, 3020)  # digits glue to each other


def lexicon(counts: dict[int, int] | None = None) -> Lexicon:
    size = 10_000  # an unseen token: 9.2 nats, so 8 of them clear the 70-nat floor
    begins = np.zeros(size, bool)
    ends = np.zeros(size, bool)
    starts = np.zeros(size, bool)
    for t in WORD:
        ends[t] = starts[t] = True
    for t in (*PIECE, *DIGIT):
        begins[t] = ends[t] = starts[t] = True
    delimiter = np.zeros(size, bool)
    delimiter[NEWLINE] = True
    count = np.zeros(size, np.int64)
    for t, c in (counts or {}).items():
        count[t] = c
    log_prob = np.log((count + 1) / (count.sum() + size)).astype(np.float32)
    return Lexicon(begins, ends, delimiter, log_prob, starts)


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(WORD) for _ in range(n)]


def filler(n: int) -> list[int]:
    return [1999 - (i % 7) for i in range(n)]  # words no record below uses


def test_spans_are_whole_words_and_never_cross_a_delimiter():
    rng = random.Random(1)
    record = words(rng, 6) + [2001] + words(rng, 10) + [NEWLINE] + words(rng, 10)
    index = SpanIndex.build(A, [IndexedRecord("r", "0x" + "01" * 20, record)])
    reference = Reference(None, lexicon())
    # The copy starts on the glued piece (mid-word): the piece and the word it belongs to are dropped.
    output = filler(5) + record[6:] + filler(5)
    result = attribute_output(output, [index], reference=reference)
    copy_start = 5
    spans = sorted((s.start - copy_start, s.end - copy_start) for s in result.spans)
    assert spans == [(1, 11), (12, 22)]  # after the piece; cut at the newline, which belongs to no span
    assert result.matched_tokens == 20
    # Token-level rules (no lexicon) count the piece and cross the newline.
    plain = attribute_output(output, [index])
    assert [(s.start - copy_start, s.end - copy_start) for s in plain.spans] == [(0, 22)]


def test_numbers_and_punctuation_are_not_enough_words():
    numbers = [COMMA, SPACE, 3015, COMMA, SPACE, 3011, 3010, COMMA, SPACE, 3011, 3015, COMMA]  # ", 5, 10, 15,"
    index = SpanIndex.build(A, [IndexedRecord("r", "0x" + "01" * 20, filler(3)[:0] + [1500] + numbers + [1501])])
    output = [1600] + numbers + [1601]
    assert attribute_output(output, [index], reference=Reference(None, lexicon())).matched_tokens == 0
    assert attribute_output(output, [index]).matched_tokens == len(numbers)  # 12 tokens, 12 "words" without one


def test_frequency_cap_and_reference_make_generic_text_earn_nothing():
    rng = random.Random(2)
    phrase = words(rng, 10)
    rare = words(rng, 12)
    records = [IndexedRecord(f"r{i}", "0x" + "01" * 20, words(rng, 5) + phrase + words(rng, 5)) for i in range(5)]
    records.append(IndexedRecord("rare", "0x" + "02" * 20, rare))
    index = SpanIndex.build(A, records)
    output = filler(20) + phrase + filler(20)
    reference = Reference(None, lexicon())
    assert attribute_output(output, [index], reference=reference).matched_tokens == 0  # 5 places > cap 4
    assert attribute_output(output, [index], reference=reference, frequency_cap=5).matched_tokens == 10
    # The same rare span is generic once the reference corpus holds it.
    generic = SpanIndex.build("reference", [IndexedRecord("ref", "0x" + "00" * 20, [1999] + rare[:11])])
    output = filler(20) + rare + filler(20)
    assert attribute_output(output, [index], reference=reference).matched_tokens == 12
    result = attribute_output(output, [index], reference=Reference(generic, lexicon()))
    assert result.matched_tokens == 0 and result.vector.datanet_ids == () and result.generic_tokens == 11


def test_budget_keeps_the_most_unique_spans():
    rng = random.Random(3)
    common = words(rng, 14)
    unique = words(rng, 14)
    counts = {t: 20 for t in common}  # the reference corpus says these words are everyday ones (6.2 nats each)
    index = SpanIndex.build(A, [IndexedRecord("c", "0x" + "01" * 20, common),
                                IndexedRecord("u", "0x" + "02" * 20, unique)])
    output = common + filler(3) + unique + filler(5)  # 36 tokens: budget ceil(0.05 * 36) = 2
    reference = Reference(None, lexicon(counts))
    assert attribute_output(output, [index], reference=reference).matched_tokens == 28
    tight = attribute_output(output, [index], reference=reference, budget_per_token=0.01)  # one span
    assert [(s.start, s.end) for s in tight.spans] == [(17, 31)] and tight.records[0].record_id == "u"


def test_text_the_reference_bigram_model_predicts_is_no_evidence():
    """A sentence of everyday words in their everyday order (each pair frequent in the reference corpus, the
    sentence itself never there) earns nothing, even held by one record only; the same words shuffled into an
    order the reference never shows still count."""
    rng = random.Random(7)
    vocabulary = words(rng, 20)
    counts = {t: 20 for t in vocabulary}  # 6.2 nats each: 14 of them pass the 70-nat floor as unigrams
    phrase = vocabulary[:14]
    # The reference holds every pair of the phrase many times, in short pieces: no 8-gram of it (the reference
    # index would mark that generic anyway), only how the words run.
    pieces = [phrase[i:i + 3] for i in range(len(phrase) - 2)] * 40
    fluent = Reference(None, lexicon(counts).with_bigrams(pieces))
    shuffled = [phrase[i] for i in (3, 11, 0, 7, 13, 5, 9, 1, 12, 2, 8, 4, 10, 6)]
    index = SpanIndex.build(A, [IndexedRecord("p", "0x" + "01" * 20, words(rng, 3) + phrase + words(rng, 3)),
                                IndexedRecord("s", "0x" + "02" * 20, words(rng, 3) + shuffled + words(rng, 3))])
    assert attribute_output(filler(20) + phrase + filler(20), [index], reference=fluent).matched_tokens == 0
    assert attribute_output(filler(20) + shuffled + filler(20), [index], reference=fluent).matched_tokens == 14
    # Without the bigram model the same sentence is 14 tokens of unigram surprisal: evidence.
    unigram = Reference(None, lexicon(counts))
    assert attribute_output(filler(20) + phrase + filler(20), [index], reference=unigram).matched_tokens == 14


def test_text_the_reference_holds_three_words_at_a_time_is_no_evidence():
    """A sentence the reference holds only in three-word pieces, whose word pairs it also shows with many other
    followers: the bigram model finds it surprising enough to pay, the reference's trigram counts do not; the same
    words in an order the reference never shows still count."""
    rng = random.Random(11)
    phrase = list(range(1000, 1014))
    others = list(range(1100, 1900))
    pieces = [phrase[i:i + 3] for i in range(len(phrase) - 2)] * 3
    noise = [[w, rng.choice(others)] for w in phrase for _ in range(1000)]  # every word of it, followed by anything
    records = pieces + noise
    reference_index = SpanIndex.build("reference", [IndexedRecord(f"ref-{i}", "0x" + "00" * 20, r)
                                                    for i, r in enumerate(records)])
    counts = {t: 20 for t in phrase + others}  # 6.2 nats each as unigrams
    trigrams = Reference(reference_index, lexicon(counts).with_bigrams(records))
    pairs_only = Reference(None, trigrams.lexicon)
    shuffled = [phrase[i] for i in (3, 11, 0, 7, 13, 5, 9, 1, 12, 2, 8, 4, 10, 6)]
    around = [1950, 1951, 1952]  # in no output below
    index = SpanIndex.build(A, [IndexedRecord("p", "0x" + "01" * 20, around + phrase + around),
                                IndexedRecord("s", "0x" + "02" * 20, around + shuffled + around)])
    output = np.array(filler(20) + phrase + filler(20))
    by_pairs = -span_log_probs(trigrams, output, [(20, 34)], order=2)[0].sum()
    by_triples = -span_log_probs(trigrams, output, [(20, 34)], order=3)[0].sum()
    assert by_pairs >= MIN_SURPRISAL > by_triples
    assert attribute_output(output.tolist(), [index], reference=pairs_only).matched_tokens == 14
    assert attribute_output(output.tolist(), [index], reference=trigrams).matched_tokens == 0
    assert attribute_output(filler(20) + shuffled + filler(20), [index], reference=trigrams).matched_tokens == 14


def test_counting_through_packed_prefixes_equals_the_suffix_array_search():
    rng = np.random.default_rng(5)
    records = [rng.integers(1000, 1030, rng.integers(1, 40)).tolist() for _ in range(300)]
    index = SpanIndex.build("reference", [IndexedRecord(f"r{i}", "0x" + "00" * 20, r) for i, r in enumerate(records)])
    keys = index.prefix_keys(3)
    assert keys is not None and np.all(np.diff(keys) >= 0)
    patterns = rng.integers(1, len(index.vocabulary) + 1, (2000, 3)).astype(np.int32)
    lengths = rng.integers(1, 4, 2000)
    slow, fast = index.counts(patterns, lengths), index.counts(patterns, lengths, keys)
    assert np.array_equal(slow, fast) and (fast > 0).mean() > 0.3
    text = [t for r in records for t in r]
    first = int(index.encode([text[0]])[0])
    assert fast[np.flatnonzero((patterns[:, 0] == first) & (lengths == 1))[:1]].tolist() in ([], [text.count(text[0])])


def test_a_copy_goes_on_across_changed_words():
    """A near-verbatim copy: a word swapped every few words leaves pieces too short to be spans; past a kept span
    the record's text goes on in place across each swapped word, so those pieces pay the span's record too."""
    rng = random.Random(13)
    record = words(rng, 40)
    index = SpanIndex.build(A, [IndexedRecord("r", "0x" + "01" * 20, record),
                                IndexedRecord("o", "0x" + "02" * 20, words(rng, 20))])
    plain = Reference(None, lexicon())
    copy = list(record[4:36])  # pieces of 10, 5, 5 and 9 tokens between the swapped words
    swapped = [10, 16, 22]
    for i in swapped:
        copy[i] = 1960 + i  # words no record holds
    output = filler(20) + copy + filler(20)
    result = attribute_output(output, [index], reference=plain)
    assert result.matched_tokens == 32 - 3
    assert result.credited[20:52].sum() == 29 and not result.credited[[20 + i for i in swapped]].any()
    assert [r.record_id for r in result.records] == ["r"]
    assert {(s.start, s.end) for s in result.spans} == {(20, 30), (31, 36), (37, 42), (43, 52)}
    # Not past a gap wider than GAP_TOKENS on the record's side (six of its tokens left out), nor across a newline.
    skipped = filler(20) + record[4:14] + [1960] + record[20:26] + filler(20)
    assert attribute_output(skipped, [index], reference=plain).matched_tokens == 10
    across_line = filler(20) + record[4:14] + [NEWLINE] + record[15:20] + filler(20)
    assert attribute_output(across_line, [index], reference=plain).matched_tokens == 10
    # A piece of everyday words (its tokens common in the reference) is too likely to be evidence of a copy.
    common = Reference(None, lexicon({t: 2000 for t in record[15:20]}))
    assert attribute_output(filler(20) + record[4:14] + [1960] + record[15:20] + filler(20), [index],
                            reference=common).matched_tokens == 10


def test_a_span_in_several_datanets_is_split_among_all_holders():
    """A holds S1 S2 back to back; B holds S1, C holds S2: A's longer match takes nothing from B and C."""
    rng = random.Random(4)
    s1, s2 = words(rng, 12), words(rng, 12)
    pad = lambda: words(rng, 4)  # noqa: E731
    indexes = [SpanIndex.build(A, [IndexedRecord("a", "0x" + "01" * 20, pad() + s1 + s2 + pad())]),
               SpanIndex.build(B, [IndexedRecord("b", "0x" + "02" * 20, pad() + s1 + pad())]),
               SpanIndex.build(C, [IndexedRecord("c", "0x" + "03" * 20, pad() + s2 + pad())])]
    result = attribute_output(filler(10) + s1 + s2 + filler(10), indexes, reference=Reference(None, lexicon()))
    assert dict(zip(result.vector.datanet_ids, result.vector.weights_bps, strict=True)) == {A: 5000, B: 2500, C: 2500}
    assert result.matched_tokens == 24
    assert {r.record_id: round(r.weight, 6) for r in result.records} == {"a": 0.5, "b": 0.25, "c": 0.25}


def test_templated_records_credit_the_exact_source():
    rng = random.Random(5)
    head, tail = words(rng, 10), words(rng, 10)
    # what the template is filled with: 8 tokens no other record repeats, 66 nats (8.3 each in the test's lexicon)
    slots = lambda i: [1000 + i, 1300 + i, 1600 + i, 1900 + i % 100, 1001 + i, 1301 + i, 1601 + i, 1901 + i % 98]  # noqa: E731
    records = [IndexedRecord(f"t{i}", f"0x{i + 1:040x}", head + slots(i) + tail) for i in range(300)]
    index = SpanIndex.build(A, records)
    result = attribute_output(filler(8) + list(records[217].token_ids) + filler(8), [index],
                              reference=Reference(None, lexicon()))
    assert result.records[0].record_id == "t217" and result.records[0].weight == pytest.approx(1.0)
    assert [r.record_id for s in result.spans for r in s.records] == ["t217"]
    # The template alone is boilerplate (300 places): nothing is paid for it.
    assert attribute_output(filler(8) + head + filler(8), [index], reference=Reference(None, lexicon())).spans == ()


def test_one_datanets_own_boilerplate_is_evidence_for_it():
    """A template that fills a fifth of A's records and none of B's is A's signature: copying a whole templated
    record pays A for the template's tokens too (the record for them all); spread over both, it is generic."""
    rng = random.Random(6)
    head, tail = words(rng, 10), words(rng, 10)
    slots = lambda i: [1000 + i, 1300 + i, 1600 + i, 1900 + i % 100, 1001 + i, 1301 + i, 1601 + i, 1901 + i % 98]  # noqa: E731
    plain = [IndexedRecord(f"p{i}", "0x" + "01" * 20, words(rng, 20)) for i in range(70)]
    templated = [IndexedRecord(f"t{i}", "0x" + "02" * 20, head + slots(i) + tail) for i in range(60)]
    # A holds 61% of the tokens: 60 occurrences all there has chance 0.61^60, far under CONCENTRATION_P.
    only_a = [SpanIndex.build(A, plain[:10] + templated), SpanIndex.build(B, plain[10:])]
    output = filler(8) + list(templated[7].token_ids) + filler(8)
    result = attribute_output(output, only_a, reference=Reference(None, lexicon()))
    assert result.matched_tokens == 28 and result.vector.datanet_ids == (A,)
    assert [r.record_id for r in result.records] == ["t7"]
    # The same template spread over both Datanets (30 records each), as generic text would be: only the slots pay.
    both = [SpanIndex.build(A, plain[:40] + templated[:30]), SpanIndex.build(B, plain[40:] + templated[30:])]
    assert attribute_output(output, both, reference=Reference(None, lexicon())).matched_tokens == 8


def entry(shares: dict[str, int]) -> CatalogEntry:
    return CatalogEntry(name="a", adapter_id="0x" + "ad" * 32, price_per_1k_tokens=1,
                        datanets=tuple(DatanetShare(d, d[:6], s) for d, s in shares.items()))


def test_payment_moves_with_the_matched_fraction_and_the_body_lets_an_auditor_recompute_it():
    rng = random.Random(6)
    copied = words(rng, 20)
    indexes = {A: SpanIndex.build(A, [IndexedRecord("a", "0x" + "01" * 20, words(rng, 3) + copied)]),
               B: SpanIndex.build(B, [IndexedRecord("b", "0x" + "02" * 20, words(rng, 30))])}
    attributor = Attributor(indexes, reference=Reference(None, lexicon()))
    shares = {A: 3000, B: 7000}
    novel = attributor.attribute(entry(shares), filler(200))
    assert dict(zip(novel.vector.datanet_ids, novel.vector.weights_bps, strict=True)) == shares
    assert novel.vector.evidence["spanWeightBps"] == 0 and novel.spans == ()
    one_copy = attributor.attribute(entry(shares), filler(90) + copied + filler(90))  # 20 of 200 tokens
    evidence = one_copy.vector.evidence
    assert evidence["matchedTokens"] == 20 and evidence["spanWeightBps"] == span_weight_bps(20, 200) == 1000
    # 0.9 * prior + 0.1 * (all of A)
    assert dict(zip(one_copy.vector.datanet_ids, one_copy.vector.weights_bps, strict=True)) == {A: 3700, B: 6300}
    assert recompute_weights(json.loads(json.dumps(evidence))) == {A: 3700, B: 6300}
    tampered = {**evidence, "spanWeightBps": 5000}
    with pytest.raises(ValueError, match="does not follow"):
        recompute_weights(tampered)
    # The evidence rides in the body, outside attributionHash (DESIGN.md's encoding).
    plain = AttributionVector(one_copy.vector.datanet_ids, one_copy.vector.weights_bps)
    assert plain.hash == one_copy.vector.hash and plain == one_copy.vector
    from longtail.attribution.receipts import ReceiptDraft, address_of, sign_receipt

    domain = ReceiptDomain(chain_id=31337, verifying_contract="0x" + "22" * 20)
    draft = ReceiptDraft(request_id="0x" + "01" * 32, client="0x" + "33" * 20, channel_id="0x" + "02" * 32,
                         base_model_id="0x" + "03" * 32, adapter_id="0x" + "ad" * 32, prompt_hash="0x" + "04" * 32,
                         output_hash="0x" + "05" * 32, prompt_tokens=1, output_tokens=200, price=7, timestamp=1,
                         attribution=one_copy.vector, spans=one_copy.spans)
    signed = sign_receipt(draft.to_receipt(address_of("0x" + "55" * 32), 0), "0x" + "55" * 32, domain, one_copy.vector,
                          one_copy.spans)
    body = json.loads(signed.to_canonical_json())
    assert recompute_weights(body["attribution"]["evidence"]) == dict(zip(body["attribution"]["datanetIds"],
                                                                        body["attribution"]["weightsBps"], strict=True))
    assert SignedReceipt.from_json(body).attribution.evidence == evidence


def test_a_few_chance_tokens_move_a_few_basis_points():
    rng = random.Random(7)
    chance = words(rng, 8)
    indexes = {A: SpanIndex.build(A, [IndexedRecord("a", "0x" + "01" * 20, chance + words(rng, 5))])}
    attributor = Attributor(indexes, reference=Reference(None, lexicon()))
    result = attributor.attribute(entry({A: 5000, B: 5000}), filler(124) + chance + filler(124))
    assert result.vector.evidence["spanWeightBps"] == 312  # 8 of 256 tokens
    assert dict(zip(result.vector.datanet_ids, result.vector.weights_bps, strict=True)) == {A: 5156, B: 4844}


def test_datanet_index_is_bound_to_its_tokenizer_and_records_root(tmp_path):
    class Tokenizer:
        def __init__(self, offset: int) -> None:
            self.offset = offset

        def __len__(self) -> int:
            return 300

        def get_vocab(self) -> dict[str, int]:
            return {chr(65 + i): i + self.offset for i in range(26)}

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) + self.offset for c in t] for t in texts]}

    records = [Record(f"r{i}", "the quick brown fox number " + str(i) * 3, "0x" + "01" * 20) for i in range(10)]
    manifest = build_manifest("letters", "0x" + "02" * 20, records)
    write_datanet(tmp_path / "d", manifest, records)
    ensure_datanet_index(tmp_path / "d", Tokenizer(0))
    index = load_datanet_index(tmp_path / "d")
    assert index.records_root == manifest.records_root and index.datanet_id == manifest.datanet_id
    with pytest.raises(SpanIndexError, match="tokenizer"):
        load_datanet_index(tmp_path / "d", "another")
    ensure_datanet_index(tmp_path / "d", Tokenizer(100))  # another tokenizer: rebuilt ahead of time
    assert load_datanet_index(tmp_path / "d").vocabulary.min() >= 100
    # Records edited after indexing: the manifest's root (hence its datanetId) changes and the old index is refused.
    edited = records[:9] + [Record("r9", "edited", "0x" + "01" * 20)]
    write_datanet(tmp_path / "d", build_manifest("letters", "0x" + "02" * 20, edited), edited)
    with pytest.raises(SpanIndexError, match="indexes datanet"):
        load_datanet_index(tmp_path / "d")
    ensure_datanet_index(tmp_path / "d", Tokenizer(0))
    assert load_datanet_index(tmp_path / "d").records_root != manifest.records_root


def test_lexicon_keeps_its_bigram_model_and_refuses_an_older_file(tmp_path):
    rng = random.Random(8)
    text = words(rng, 30)
    fluent = lexicon().with_bigrams([text] * 5)
    fluent.save(tmp_path / "lexicon.npz")
    again = Lexicon.load(tmp_path / "lexicon.npz")
    ids = np.array(text[:12])
    assert np.array_equal(again.next_log_probs(ids), fluent.next_log_probs(ids))
    # Each pair seen 5 times and never followed otherwise: P = (5 + p) / 6 in context, against p = 1/4000 alone.
    assert -again.next_log_probs(ids)[1:].sum() < 0.05 * -again.log_probs(ids)[1:].sum()
    old = lexicon()
    np.savez(tmp_path / "old.npz", begins_word=old.begins_word, ends_word=old.ends_word, delimiter=old.delimiter,
             log_prob=old.log_prob, starts_word=old.starts_word)  # version 1: no bigram model, no version
    with pytest.raises(SpanIndexError, match="lexicon version"):
        Lexicon.load(tmp_path / "old.npz")
