"""Span attribution: which Datanet records an output repeats verbatim, found through a suffix array.

The OLMoTrace / infini-gram idea at the scale of one node: each Datanet's
records, in the base model's token ids, are concatenated with a separator and
indexed once by a suffix array (libdivsufsort through pydivsufsort), saved as
`.npz`. For an output we find the maximal spans of at least `min_span` tokens
that occur in each of the adapter's Datanets, credit each output token to the
Datanets holding the longest span over it, and discount tokens whose longest
span several Datanets share.

Search is binary search over the suffix array: one pass finds which k-grams of
the output occur at all, a second finds the longest match at those positions
(the classic "LCP with the neighbours of the insertion point"), a third finds
each span's occurrence interval, hence its records. Long outputs take the
vectorized numpy search, every query at once; short ones (a node's typical
answer) take the scalar one, Python's bisect over the text as big-endian bytes,
because the numpy path's ~100 array calls cost more than the search itself at
that size (docs/attribution.md). Each is tested against the other and against
the brute-force definition.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydivsufsort import divsufsort

from longtail.attribution.receipts import TOTAL_BPS, AttributionVector, MatchedSpan, RecordCredit

SEPARATOR = 0  # the compact alphabet's code between records; real tokens are 1..V
UNKNOWN = -1  # query tokens absent from a Datanet, and query padding: equal to nothing
MAX_SPAN = 1024  # longest span reported in one piece (longer ones are truncated)
DEFAULT_MIN_SPAN = 8
# Where the scalar search beats the vectorized one (measured, docs/attribution.md): the k-gram filter up to this many
# output tokens, the search itself up to this many k-grams that passed the filter.
SCALAR_FILTER_MAX_TOKENS = 256
SCALAR_SEARCH_MAX_HITS = 64
_HASH_MASK = (1 << 64) - 1


class SpanIndexError(ValueError):
    """An index file is missing, malformed, or built for another Datanet."""


@dataclasses.dataclass(frozen=True)
class IndexedRecord:
    """One record's tokens and provenance, the unit the index is built from."""

    record_id: str
    contributor: str
    token_ids: Sequence[int]


@dataclasses.dataclass(frozen=True)
class SpanHit:
    """A maximal span of the output found in one Datanet: output tokens [start, end), SA interval [lo, hi)."""

    start: int
    end: int
    lo: int
    hi: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def occurrences(self) -> int:
        return self.hi - self.lo


class SpanIndex:
    """A suffix array over one Datanet's records in token ids, with a position → record map."""

    def __init__(self, datanet_id: str, vocabulary: np.ndarray, tokens: np.ndarray, suffix_array: np.ndarray,
                 record_starts: np.ndarray, record_ids: np.ndarray, contributors: np.ndarray) -> None:
        self.datanet_id = datanet_id
        self.vocabulary = vocabulary.astype(np.int64, copy=False)
        self.tokens = tokens
        self.suffix_array = suffix_array.astype(np.int64, copy=False)
        self.record_starts = record_starts.astype(np.int64, copy=False)
        self.record_ids = record_ids
        self.contributors = contributors
        # int32 with MAX_SPAN separators after the end, so any window of a suffix can be gathered.
        self._text = np.concatenate([tokens.astype(np.int32), np.full(MAX_SPAN, SEPARATOR, np.int32)])
        self._steps = max(1, len(self.suffix_array).bit_length())
        # The first few codes of every suffix packed into one integer, in suffix-array order: numpy's
        # searchsorted on it narrows each binary search to the suffixes sharing that prefix, in C.
        self._prefix_tokens = 4 if len(self.vocabulary) < 2**16 - 1 else 2
        shift = 64 // self._prefix_tokens
        prefix = np.zeros(self.size, np.uint64)
        for j in range(self._prefix_tokens):
            prefix |= self._text[self.suffix_array + j].astype(np.uint64) << np.uint64(shift * (self._prefix_tokens - 1 - j))
        self._prefix = prefix
        self._gram_hashes: dict[int, np.ndarray] = {}
        # The scalar search compares suffixes as byte strings: codes big-endian and of one width sort as the
        # codes do, and the padding separators sort below every real code, as in the arrays above.
        self._code_bytes = 2 if len(self.vocabulary) < 2**16 - 1 else 4
        self._text_bytes = self._text.astype(f">u{self._code_bytes}").tobytes()
        self._suffix_starts = memoryview(np.ascontiguousarray(self.suffix_array))

    @property
    def size(self) -> int:
        """Number of indexed positions (tokens plus one separator per record)."""
        return len(self.suffix_array)

    # --- building and storage -------------------------------------------------------------------

    @classmethod
    def build(cls, datanet_id: str, records: Iterable[IndexedRecord]) -> SpanIndex:
        records = list(records)
        if not records:
            raise SpanIndexError(f"datanet {datanet_id} has no records to index")
        lengths = np.array([len(r.token_ids) + 1 for r in records], dtype=np.int64)
        flat = np.fromiter((t for r in records for t in (*r.token_ids, -1)), dtype=np.int64, count=int(lengths.sum()))
        real = flat >= 0
        vocabulary = np.unique(flat[real])
        codes = np.zeros(len(flat), dtype=np.int64)
        codes[real] = np.searchsorted(vocabulary, flat[real]) + 1
        dtype = np.uint16 if len(vocabulary) < 2**16 - 1 else np.uint32
        tokens = codes.astype(dtype)
        # pydivsufsort sorts wider integers as big-endian byte strings: token order is preserved.
        suffix_array = np.asarray(divsufsort(tokens), dtype=np.int64)
        record_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return cls(datanet_id, vocabulary, tokens, suffix_array, record_starts,
                   np.array([r.record_id for r in records]), np.array([r.contributor for r in records]))

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            np.savez(out, datanet_id=np.array(self.datanet_id), vocabulary=self.vocabulary, tokens=self.tokens,
                     suffix_array=self.suffix_array.astype(np.int32 if self.size < 2**31 else np.int64),
                     record_starts=self.record_starts, record_ids=self.record_ids, contributors=self.contributors)

    @classmethod
    def load(cls, path: Path, datanet_id: str | None = None) -> SpanIndex:
        try:
            with np.load(path, allow_pickle=False) as data:
                index = cls(str(data["datanet_id"]), data["vocabulary"], data["tokens"], data["suffix_array"],
                            data["record_starts"], data["record_ids"], data["contributors"])
        except (OSError, KeyError, ValueError) as error:
            raise SpanIndexError(f"cannot load span index {path}: {error}") from error
        if datanet_id is not None and index.datanet_id != datanet_id.lower():
            raise SpanIndexError(f"{path} indexes datanet {index.datanet_id}, not {datanet_id}")
        return index

    # --- search ---------------------------------------------------------------------------------

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        """Map token ids to this index's compact codes; ids the Datanet never uses become UNKNOWN."""
        ids = np.asarray(token_ids, dtype=np.int64)
        position = np.searchsorted(self.vocabulary, ids)
        clipped = np.minimum(position, len(self.vocabulary) - 1)
        known = (position < len(self.vocabulary)) & (self.vocabulary[clipped] == ids)
        return np.where(known, position + 1, UNKNOWN).astype(np.int32)

    def _windows(self, suffix_ranks: np.ndarray, width: int) -> np.ndarray:
        starts = self.suffix_array[np.minimum(suffix_ranks, self.size - 1)]
        return self._text[starts[:, None] + np.arange(width)]

    def _prefix_range(self, patterns: np.ndarray, lengths: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Suffix ranks [lo, hi) sharing each pattern's first known codes, found with searchsorted.

        A column past the pattern's length, or holding UNKNOWN, leaves the rest free:
        zeros from there on give the lowest key, all ones the highest.
        """
        tokens = self._prefix_tokens
        shift = 64 // tokens
        columns = patterns[:, :tokens].astype(np.int64)
        usable = columns >= 0
        if lengths is not None:
            usable &= np.arange(columns.shape[1])[None, :] < lengths[:, None]
        usable = np.cumprod(usable, axis=1).astype(bool)
        low = np.zeros(len(patterns), np.uint64)
        high = np.zeros(len(patterns), np.uint64)
        field_max = np.uint64((1 << shift) - 1)
        for j in range(columns.shape[1]):
            place = np.uint64(shift * (tokens - 1 - j))
            value = np.where(usable[:, j], columns[:, j], 0).astype(np.uint64)
            low |= value << place
            high |= np.where(usable[:, j], value, field_max) << place
        for j in range(columns.shape[1], tokens):
            high |= field_max << np.uint64(shift * (tokens - 1 - j))
        return (np.searchsorted(self._prefix, low, side="left").astype(np.int64),
                np.searchsorted(self._prefix, high, side="right").astype(np.int64))

    def _bound(self, patterns: np.ndarray, lengths: np.ndarray | None, upper: bool | np.ndarray) -> np.ndarray:
        """Vectorized binary search: first suffix rank whose prefix is >= (or > when `upper`) each pattern.

        Only the first `lengths[i]` columns of pattern i are compared (all when None).
        """
        count, width = patterns.shape
        lo, hi = self._prefix_range(patterns, lengths)
        rows = np.arange(count)
        mask = None if lengths is None else np.arange(width)[None, :] < lengths[:, None]
        for _ in range(self._steps + 1):
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) >> 1
            text = self._windows(mid, width)
            differs = text != patterns
            if mask is not None:
                differs &= mask
            has_difference = differs.any(axis=1)
            first = differs.argmax(axis=1)
            text_smaller = text[rows, first] < patterns[rows, first]
            go_right = np.where(upper, ~has_difference | text_smaller, has_difference & text_smaller)
            lo = np.where(active & go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
        return lo

    def _common_prefix(self, ranks: np.ndarray, patterns: np.ndarray) -> np.ndarray:
        valid = (ranks >= 0) & (ranks < self.size)
        text = self._windows(np.clip(ranks, 0, self.size - 1), patterns.shape[1])
        differs = text != patterns
        lcp = np.where(differs.any(axis=1), differs.argmax(axis=1), patterns.shape[1])
        return np.where(valid, lcp, 0)

    def find_spans(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN) -> list[SpanHit]:
        """Maximal spans of the output, at least `min_span` tokens long, that occur in this Datanet.

        Each stage takes whichever of the scalar and the vectorized search is faster at its size (docs/attribution.md).
        """
        query = self.encode(token_ids)
        if len(query) < min_span:
            return []
        codes = query.tolist()
        if len(query) <= SCALAR_FILTER_MAX_TOKENS:
            hits = self._gram_hits_scalar(codes, min_span)
        else:
            hits = self._gram_hits_vectorized(query, min_span).tolist()
        if len(hits) <= SCALAR_SEARCH_MAX_HITS:
            return self._spans_scalar(codes, hits, min_span)
        return self._spans_vectorized(query, np.asarray(hits, np.int64), min_span)

    def find_spans_vectorized(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN) -> list[SpanHit]:
        """`find_spans` with every stage in numpy, all positions at once."""
        query = self.encode(token_ids)
        if len(query) < min_span:
            return []
        return self._spans_vectorized(query, self._gram_hits_vectorized(query, min_span), min_span)

    def find_spans_scalar(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN) -> list[SpanHit]:
        """`find_spans` with every stage in Python, one position at a time (bisect over byte strings)."""
        codes = self.encode(token_ids).tolist()
        if len(codes) < min_span:
            return []
        return self._spans_scalar(codes, self._gram_hits_scalar(codes, min_span), min_span)

    # Stage 1: which k-grams occur at all (a hash set, exact after stage 2). Most of an output usually does not,
    # and is dropped here without touching the suffix array.

    def _gram_hits_vectorized(self, query: np.ndarray, min_span: int) -> np.ndarray:
        found = self._known_grams(_rolling_hashes(query, min_span), min_span)
        return np.flatnonzero(found & (_rolling_min(query, min_span) > 0))

    def _gram_hits_scalar(self, codes: list[int], min_span: int) -> list[int]:
        """The same hashes as `_rolling_hashes`, rolled in Python: one multiply-add per token."""
        multiplier = int(_HASH_MULTIPLIER)
        leading = pow(multiplier, min_span - 1, 1 << 64)
        starts, hashes = [], []
        value, clean_from = 0, 0
        for position, code in enumerate(codes):
            if code <= 0:
                clean_from = position + 1
            if position >= min_span:
                value -= (codes[position - min_span] + 1) * leading
            value = (value * multiplier + code + 1) & _HASH_MASK
            start = position - min_span + 1
            if start >= clean_from:  # a k-gram with no unknown token
                starts.append(start)
                hashes.append(value)
        if not starts:
            return []
        found = self._known_grams(np.array(hashes, np.uint64), min_span)
        return [start for start, present in zip(starts, found.tolist(), strict=True) if present]

    def _known_grams(self, hashes: np.ndarray, k: int) -> np.ndarray:
        """Whether each k-gram hash is one of the text's (sorted-array membership by searchsorted)."""
        known = self._gram_set(k)
        return known[np.minimum(np.searchsorted(known, hashes), len(known) - 1)] == hashes

    # Stages 2 and 3: the longest match at each hit (a run of consecutive hits bounds how far it can reach), then
    # the maximal spans (a span is not maximal when the one starting a token earlier covers it) and their
    # suffix-array intervals.

    def _spans_vectorized(self, query: np.ndarray, hits: np.ndarray, min_span: int) -> list[SpanHit]:
        if not len(hits):
            return []
        padded = np.concatenate([query, np.full(MAX_SPAN, UNKNOWN, np.int32)])
        run_id = np.concatenate([[0], np.cumsum(np.diff(hits) != 1)])
        run_end = np.zeros(run_id[-1] + 1, np.int64)
        np.maximum.at(run_end, run_id, hits + min_span)
        reach = np.minimum(run_end[run_id] - hits, MAX_SPAN)
        width = int(reach.max())
        windows = padded[hits[:, None] + np.arange(width)]
        windows[np.arange(width)[None, :] >= reach[:, None]] = UNKNOWN
        insertion = self._bound(windows, None, upper=False)
        longest = np.maximum(self._common_prefix(insertion - 1, windows), self._common_prefix(insertion, windows))
        real = longest >= min_span  # hash collisions end here
        hits, longest = hits[real], longest[real]
        if not len(hits):
            return []
        ends = hits + longest
        keep = np.ones(len(hits), bool)
        keep[1:] = ~((hits[1:] - 1 == hits[:-1]) & (ends[:-1] >= ends[1:]))
        hits, longest = hits[keep], longest[keep]
        span_width = int(longest.max())
        patterns = padded[hits[:, None] + np.arange(span_width)]
        both = self._bound(np.concatenate([patterns, patterns]), np.concatenate([longest, longest]),
                           upper=np.repeat([False, True], len(hits)))
        lo, hi = both[:len(hits)], both[len(hits):]
        return [SpanHit(int(s), int(s + n), int(a), int(b)) for s, n, a, b in zip(hits, longest, lo, hi, strict=True)]

    def _spans_scalar(self, codes: list[int], hits: list[int], min_span: int) -> list[SpanHit]:
        if not hits:
            return []
        width = self._code_bytes
        # A hit's window never holds an unknown token (each of its k-grams is clean), so their bytes are never read.
        query = b"".join(code.to_bytes(width, "big") if code > 0 else bytes(width) for code in codes)
        run_ends: list[int] = []
        for index in range(len(hits) - 1, -1, -1):
            last_of_run = index == len(hits) - 1 or hits[index + 1] != hits[index] + 1
            run_ends.append(hits[index] + min_span if last_of_run else run_ends[-1])
        run_ends.reverse()
        matches: list[tuple[int, int]] = []
        for start, run_end in zip(hits, run_ends, strict=True):
            pattern = query[width * start:width * (start + min(run_end - start, MAX_SPAN))]
            rank = self._lower_bound(pattern)
            longest = max(self._common_codes(rank - 1, pattern), self._common_codes(rank, pattern))
            if longest >= min_span:  # hash collisions end here
                matches.append((start, longest))
        spans: list[SpanHit] = []
        for index, (start, longest) in enumerate(matches):
            if index and matches[index - 1][0] == start - 1 and sum(matches[index - 1]) >= start + longest:
                continue
            pattern = query[width * start:width * (start + longest)]
            spans.append(SpanHit(start, start + longest, self._lower_bound(pattern), self._upper_bound(pattern)))
        return spans

    def _suffix_key(self, length: int):
        text, starts, width = self._text_bytes, self._suffix_starts, self._code_bytes
        return lambda rank: text[width * starts[rank]:width * starts[rank] + length]

    def _lower_bound(self, pattern: bytes) -> int:
        """First suffix rank whose first len(pattern) bytes are >= pattern."""
        return bisect.bisect_left(range(self.size), pattern, key=self._suffix_key(len(pattern)))

    def _upper_bound(self, pattern: bytes) -> int:
        """First suffix rank whose first len(pattern) bytes are > pattern."""
        return bisect.bisect_right(range(self.size), pattern, key=self._suffix_key(len(pattern)))

    def _common_codes(self, rank: int, pattern: bytes) -> int:
        """How many leading codes of `pattern` the suffix at `rank` shares (0 outside the array)."""
        if not 0 <= rank < self.size:
            return 0
        width = self._code_bytes
        offset = width * self._suffix_starts[rank]
        text = self._text_bytes
        # Binary search on the prefix length: each probe is one bytes comparison in C.
        shared, longest = 0, len(pattern) // width
        while shared < longest:
            middle = (shared + longest + 1) // 2
            if text[offset:offset + width * middle] == pattern[:width * middle]:
                shared = middle
            else:
                longest = middle - 1
        return shared

    def _gram_set(self, k: int) -> np.ndarray:
        """Sorted hashes of every k-gram of the text that holds no separator, built once per k."""
        if k not in self._gram_hashes:
            text = self._text[:len(self.tokens)]
            hashes = _rolling_hashes(text, k)
            self._gram_hashes[k] = np.unique(hashes[_rolling_min(text, k) > 0])
        return self._gram_hashes[k]

    def records_of(self, hit: SpanHit, max_occurrences: int = 256) -> np.ndarray:
        """Record numbers holding the span (an evenly spaced sample when it occurs very often)."""
        ranks = np.arange(hit.lo, hit.hi)
        if len(ranks) > max_occurrences:
            ranks = ranks[np.linspace(0, len(ranks) - 1, max_occurrences).astype(np.int64)]
        positions = self.suffix_array[ranks]
        return np.unique(np.searchsorted(self.record_starts, positions, side="right") - 1)


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def _rolling_hashes(codes: np.ndarray, k: int) -> np.ndarray:
    """A 64-bit polynomial hash of each k-gram of `codes` (wrapping arithmetic), one per start."""
    count = len(codes) - k + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    values = codes.astype(np.int64).astype(np.uint64)
    hashes = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            hashes = hashes * _HASH_MULTIPLIER + values[j:j + count] + np.uint64(1)
    return hashes


def _rolling_min(codes: np.ndarray, k: int) -> np.ndarray:
    """Minimum code in each k-gram: > 0 means no separator and no unknown token inside."""
    count = len(codes) - k + 1
    if count <= 0:
        return np.zeros(0, np.int64)
    minimum = codes[:count].astype(np.int64)
    for j in range(1, k):
        minimum = np.minimum(minimum, codes[j:j + count])
    return minimum


@dataclasses.dataclass(frozen=True)
class RecordWeight:
    """A record's share of the output's span credit (fractions of the whole output's credit)."""

    datanet_id: str
    record_id: str
    contributor: str
    weight: float


@dataclasses.dataclass(frozen=True)
class SpanAttribution:
    """The result of matching one output: Datanet weights, the spans, and credit down to records."""

    vector: AttributionVector
    spans: tuple[MatchedSpan, ...]
    records: tuple[RecordWeight, ...]
    contributors: tuple[tuple[str, str, float], ...]
    matched_tokens: int
    output_tokens: int

    def to_json(self) -> dict:
        return {"attribution": self.vector.to_json(), "spans": [s.to_json() for s in self.spans],
                "records": [dataclasses.asdict(r) for r in self.records],
                "contributors": [{"datanetId": d, "contributor": c, "weight": w} for d, c, w in self.contributors],
                "matchedTokens": self.matched_tokens, "outputTokens": self.output_tokens}


def to_basis_points(weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of positive weights to integers summing to exactly 10000."""
    total = sum(weights.values())
    if total <= 0:
        return {}
    exact = {key: value * TOTAL_BPS / total for key, value in weights.items()}
    rounded = {key: math.floor(value) for key, value in exact.items()}
    short = TOTAL_BPS - sum(rounded.values())
    for key in sorted(exact, key=lambda k: (rounded[k] - exact[k], k))[:short]:
        rounded[key] += 1
    return {key: value for key, value in rounded.items() if value > 0}


def attribute_output(token_ids: Sequence[int], indexes: Sequence[SpanIndex], min_span: int = DEFAULT_MIN_SPAN,
                     min_weight_bps: int = 100, max_records_per_span: int = 8, max_records: int = 32,
                     max_occurrences: int = 256) -> SpanAttribution:
    """Attribute an output (token ids) to the Datanets behind `indexes`.

    Each output token goes to the Datanets whose longest span over it is longest
    (ties share it); a token whose longest span `m` Datanets share gives each
    `1/m²`, so text common to many Datanets counts for less in total (`1/m`) and
    is split. Datanets whose share falls under `min_weight_bps` are dropped as
    noise and the rest renormalized. Within a Datanet, a span's credit is split
    evenly over the records that contain it.
    """
    length = len(token_ids)
    if length == 0 or not indexes:
        return SpanAttribution(AttributionVector(), (), (), (), 0, length)
    per_datanet = {index.datanet_id: index.find_spans(token_ids, min_span) for index in indexes}
    if not any(per_datanet.values()):  # most answers: no verbatim span, nothing to weigh
        return SpanAttribution(AttributionVector(), (), (), (), 0, length)
    best = np.zeros((len(indexes), length), np.int64)  # longest span of each Datanet over each token
    owner = np.full((len(indexes), length), -1, np.int64)  # which of that Datanet's spans it is
    for d, index in enumerate(indexes):
        for h, hit in enumerate(per_datanet[index.datanet_id]):
            segment = slice(hit.start, hit.end)
            longer = best[d, segment] < hit.length
            owner[d, segment] = np.where(longer, h, owner[d, segment])
            best[d, segment] = np.maximum(best[d, segment], hit.length)
    top = best.max(axis=0)
    winners = (best == top[None, :]) & (top[None, :] > 0)
    sharing = winners.sum(axis=0)
    token_credit = np.where(sharing > 0, 1.0 / np.maximum(sharing, 1) ** 2, 0.0)
    datanet_credit = {index.datanet_id: float((winners[d] * token_credit).sum()) for d, index in enumerate(indexes)}
    datanet_credit = {k: v for k, v in datanet_credit.items() if v > 0}
    total = sum(datanet_credit.values())
    kept = {k: v for k, v in datanet_credit.items() if total and v * TOTAL_BPS / total >= min_weight_bps}
    vector = AttributionVector.from_weights(to_basis_points(kept))
    kept_total = sum(kept.values())

    spans: list[MatchedSpan] = []
    record_credit: dict[tuple[str, str, str], float] = defaultdict(float)
    for d, index in enumerate(indexes):
        if index.datanet_id not in kept:
            continue
        for h, hit in enumerate(per_datanet[index.datanet_id]):
            credited = (owner[d] == h) & winners[d]
            credit = float(token_credit[credited].sum()) / kept_total
            if credit <= 0:
                continue
            records = index.records_of(hit, max_occurrences)
            for r in records:
                record_credit[(index.datanet_id, str(index.record_ids[r]), str(index.contributors[r]))] += \
                    credit / len(records)
            listed = tuple(RecordCredit(str(index.record_ids[r]), str(index.contributors[r]))
                           for r in records[:max_records_per_span])
            spans.append(MatchedSpan(hit.start, hit.end, index.datanet_id, hit.occurrences, listed))
    spans.sort(key=lambda s: (s.start, s.datanet_id))
    ranked = sorted(record_credit.items(), key=lambda item: (-item[1], item[0]))
    records = tuple(RecordWeight(d, r, c, w) for (d, r, c), w in ranked[:max_records])
    by_contributor: dict[tuple[str, str], float] = defaultdict(float)
    for (d, _, c), w in record_credit.items():
        by_contributor[(d, c)] += w
    contributors = tuple((d, c, w) for (d, c), w in sorted(by_contributor.items(), key=lambda i: (-i[1], i[0])))
    return SpanAttribution(vector, tuple(spans), records, contributors, int((top > 0).sum()), length)


# --- Datanet folders ------------------------------------------------------------------------------

INDEX_FILE = "span_index.npz"


def tokenize_records(texts: Sequence[str], tokenizer, batch_size: int = 512) -> list[list[int]]:
    """Token ids of each text with the base model's tokenizer, without special tokens."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        out.extend(tokenizer(list(texts[i:i + batch_size]), add_special_tokens=False)["input_ids"])
    return out


def build_datanet_index(folder: Path, tokenizer, out: Path | None = None) -> Path:
    """Tokenize a Datanet folder's records and write its span index (default `<folder>/span_index.npz`)."""
    from longtail.attribution.datanets import load_manifest, read_records

    folder = Path(folder)
    manifest = load_manifest(folder)
    records = read_records(folder)
    token_ids = tokenize_records([r.text for r in records], tokenizer)
    index = SpanIndex.build(manifest.datanet_id, (IndexedRecord(r.id, r.contributor, t)
                                                  for r, t in zip(records, token_ids, strict=True)))
    path = Path(out) if out else folder / INDEX_FILE
    index.save(path)
    return path


def index_summary(index: SpanIndex) -> dict:
    """What `longtail datanet index` prints about an index."""
    return {"datanetId": index.datanet_id, "records": len(index.record_ids), "positions": index.size,
            "vocabulary": len(index.vocabulary), "tokenDtype": str(index.tokens.dtype)}


def load_datanet_index(folder: Path) -> SpanIndex:
    """The index saved beside a Datanet, checked against its manifest's id."""
    from longtail.attribution.datanets import load_manifest

    manifest = load_manifest(Path(folder))
    return SpanIndex.load(Path(folder) / INDEX_FILE, manifest.datanet_id)


def spans_to_json(hits: Sequence[SpanHit]) -> str:
    return json.dumps([dataclasses.asdict(h) for h in hits])
