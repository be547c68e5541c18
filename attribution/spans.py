"""Span attribution: which Datanet records an output repeats verbatim, found through a suffix array.

The OLMoTrace / infini-gram idea at the scale of one node. Each Datanet's
records, in the base model's token ids, are concatenated with a separator and
indexed once, ahead of time, by a suffix array (libdivsufsort through
pydivsufsort). The index is one binary file (`span_index.lti`) that is
memory-mapped, never copied into the heap: the text in 2-byte codes, the suffix
array in 4-byte ranks, a 1-byte-per-token Bloom filter of the Datanet's 8-grams,
the record tables; about 8 bytes per token in all (docs/attribution.md). Its
header binds the tokenizer that produced the ids and the manifest's records
root; a load that names another one is refused.

Search is binary search over the suffix array: the Bloom filter drops the
output positions that cannot start a match, the longest match at the rest is
the LCP with the insertion point's neighbours, and each span's occurrence
interval gives its records. Short outputs take a scalar search (Python's bisect
over the mapped text as big-endian bytes), long ones a vectorized numpy search;
each is tested against the other and against the brute-force definition.

Selecting and weighing spans (`attribute_output`) follows OLMoTrace: spans are
trimmed to whole words and cut at delimiters, spans found in a reference corpus
that is no Datanet are generic and earn nothing, very frequent spans are capped
out, spans generic English would write anyway (under the reference's trigram
counts) are no evidence, the rest are ranked by uniqueness (sum of unigram
log-probabilities) under a budget proportional to the output's length, a copy
is followed across a changed word, and each matched token is split evenly among
every Datanet holding a kept span over it (docs/attribution.md).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from pydivsufsort import divsufsort

from longtail.attribution.receipts import TOTAL_BPS, AttributionVector, MatchedSpan, RecordCredit

SEPARATOR = 0  # the compact alphabet's code between records; real tokens are 1..V
UNKNOWN = -1  # query tokens absent from a Datanet, and query padding: equal to nothing
MAX_SPAN = 1024  # longest span reported in one piece (longer ones are truncated)
DEFAULT_MIN_SPAN = 8
# Span selection (docs/attribution.md, "Which spans count").
MIN_WORDS = 4  # a span holds at least this many whole words as well as min_span tokens
FREQUENCY_CAP = 4  # a span found more often than this in all the adapter's Datanets together is boilerplate
# ...unless all its occurrences sit in one Datanet, which chance would do with probability under this (rule 4b).
CONCENTRATION_P = 1e-4
SPAN_BUDGET_PER_TOKEN = 0.05  # at most ceil(0.05 * output tokens) distinct spans, the most unique first
# Near-verbatim copies (docs/attribution.md, "Across a changed word"): past a kept span's end (or before its start),
# the output and the record holding the span may differ by up to GAP_TOKENS tokens each (a word swapped) and then agree
# again for at least MIN_GAP_PIECE tokens, in place; such a piece pays as the span does, if it carries the surprisal
# floor's rate per token.
GAP_TOKENS = 3
MIN_GAP_PIECE = 4
# A span counts only if its tokens that are not generic carry this much surprisal in context: -sum of log P(token |
# the tokens before it in the span) under the reference corpus's n-gram model, nats (docs/attribution.md, rule 6).
# 70 = a minimum-length span (8 tokens) at 8.75 nats a token, each about 1 in 6,300 given its context: fluent generic
# English runs at 3-6 nats a token under that model, text no generic model predicts at 8-11.
MIN_SURPRISAL = 70.0
# The n-gram model: the lexicon's bigram model (Witten-Bell), then up to NGRAM_ORDER - 1 tokens of context counted in
# the reference's own suffix array, each longer context interpolated over the shorter one with a Dirichlet prior of
# NGRAM_PRIOR pseudo-counts. A stock sentence is predictable a few words at a time, which pairs alone do not see; a
# context the reference holds but never followed by the token makes the token more surprising, not less.
NGRAM_ORDER = 3
NGRAM_PRIOR = 1.0
PLAIN_LOG_PROB = -math.log(50_000)  # every token alike when no lexicon is given (token-level rules)
# Up to this many output positions that passed the k-gram filter, the scalar search: with the skip over covered
# starts it beats the vectorized one at every answer length measured (docs/attribution.md).
SCALAR_SEARCH_MAX_HITS = 2048
_HASH_MASK = (1 << 64) - 1
INDEX_MAGIC = b"LTSPAN02"
INDEX_VERSION = 2
LEXICON_VERSION = 5  # 2: with the reference's bigram model; 3: with the base model's generic answers;
# 4: with its stock parts and the packages' descriptions and licences; 5: those descriptions read as UTF-8
_ALIGN = 64


class SpanIndexError(ValueError):
    """An index file is missing, malformed, or built for another Datanet, tokenizer or records root."""


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


class _Strings:
    """A read-only column of strings kept as one UTF-8 blob and end offsets (mapped, decoded on access)."""

    def __init__(self, blob, ends: np.ndarray) -> None:
        self._blob = blob
        self._ends = ends

    @classmethod
    def of(cls, values: Sequence[str]) -> _Strings:
        encoded = [v.encode("utf-8") for v in values]
        ends = np.cumsum([len(e) for e in encoded], dtype=np.uint64) if encoded else np.zeros(0, np.uint64)
        return cls(b"".join(encoded), ends)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i) -> str:
        i = int(i)
        if i < 0:
            i += len(self)
        start = int(self._ends[i - 1]) if i else 0
        return bytes(self._blob[start:int(self._ends[i])]).decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tolist(self) -> list[str]:
        return list(self)


class _Coded:
    """A column of strings with few distinct values (contributors): a table of them and a 4-byte code per row."""

    def __init__(self, table: _Strings, codes: np.ndarray) -> None:
        self.table = table
        self.codes = codes

    @classmethod
    def of(cls, values: Sequence[str]) -> _Coded:
        distinct: dict[str, int] = {}
        codes = np.fromiter((distinct.setdefault(v, len(distinct)) for v in values), np.uint32, count=len(values))
        return cls(_Strings.of(list(distinct)), codes)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i) -> str:
        return self.table[self.codes[int(i)]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.table._ends.nbytes + len(self.table._blob)


class SpanIndex:
    """A suffix array over one Datanet's records in token ids, with a position → record map and a k-gram filter."""

    def __init__(self, datanet_id: str, vocabulary: np.ndarray, text: np.ndarray, suffix_array: np.ndarray,
                 record_starts: np.ndarray, record_ids: Sequence[str] | _Strings, contributors: Sequence[str] | _Coded,
                 gram_filter: np.ndarray, filter_k: int, tokenizer_id: str = "", records_root: str = "",
                 text_buffer=None, text_offset: int = 0, repeated_hashes: np.ndarray | None = None,
                 repeated_counts: np.ndarray | None = None) -> None:
        self.datanet_id = datanet_id.lower()
        self.vocabulary = np.asarray(vocabulary, dtype="<i4")  # token ids fit 31 bits; 4 bytes per distinct token
        self.size = len(suffix_array)
        # `text` is the codes, big-endian, followed by MAX_SPAN separators so any window of a suffix can be read.
        self._text = text
        self.tokens = text[:self.size]
        self.suffix_array = suffix_array
        self.record_starts = record_starts
        self.record_ids = record_ids if isinstance(record_ids, _Strings) else _Strings.of(list(record_ids))
        self.contributors = contributors if isinstance(contributors, _Coded) else _Coded.of(list(contributors))
        # The filter_k-grams found more than once in this Datanet, sorted, and how often (saturating at 65535).
        self.repeated_hashes = np.zeros(0, np.uint64) if repeated_hashes is None else repeated_hashes
        self.repeated_counts = np.zeros(0, np.uint16) if repeated_counts is None else repeated_counts
        self.gram_filter = gram_filter
        self.filter_k = filter_k
        self._filter_bits = (len(gram_filter) * 8).bit_length() - 1
        self.tokenizer_id = tokenizer_id
        self.records_root = records_root.lower()
        self._steps = max(1, self.size.bit_length())
        self._code_bytes = text.dtype.itemsize
        # The scalar search compares suffixes as byte strings: big-endian codes of one width sort as the codes do.
        self._text_bytes = text_buffer if text_buffer is not None else text.tobytes()
        self._text_offset = text_offset
        self._suffix_starts = memoryview(np.ascontiguousarray(suffix_array)).cast("B").cast(
            "I" if suffix_array.dtype.itemsize == 4 else "Q")

    # --- building and storage -------------------------------------------------------------------

    @classmethod
    def build(cls, datanet_id: str, records: Iterable[IndexedRecord], tokenizer_id: str = "", records_root: str = "",
              filter_k: int = DEFAULT_MIN_SPAN) -> SpanIndex:
        records = list(records)
        if not records:
            raise SpanIndexError(f"datanet {datanet_id} has no records to index")
        lengths = np.array([len(r.token_ids) + 1 for r in records], dtype=np.int64)
        flat = np.fromiter((t for r in records for t in (*r.token_ids, -1)), dtype=np.int64, count=int(lengths.sum()))
        real = flat >= 0
        vocabulary = np.unique(flat[real])
        codes = np.zeros(len(flat), dtype=np.int64)
        codes[real] = np.searchsorted(vocabulary, flat[real]) + 1
        wide = len(vocabulary) >= 2**16 - 1
        native = codes.astype(np.uint32 if wide else np.uint16)
        # pydivsufsort sorts wider integers as big-endian byte strings: token order is preserved.
        sa_dtype = np.uint32 if len(codes) < 2**32 else np.uint64
        suffix_array = np.asarray(divsufsort(native))
        grams, clean = _clean_grams(flat + 1, filter_k)
        repeated_hashes, repeated_counts = _repeated_grams(native, suffix_array, grams, clean, filter_k)
        suffix_array = suffix_array.astype(sa_dtype)
        text = np.concatenate([native, np.zeros(MAX_SPAN, native.dtype)]).astype(">u4" if wide else ">u2")
        record_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(sa_dtype)
        return cls(datanet_id, vocabulary, text, suffix_array, record_starts,
                   [r.record_id for r in records], [r.contributor for r in records],
                   _bloom(grams[clean]), filter_k, tokenizer_id, records_root,
                   repeated_hashes=repeated_hashes, repeated_counts=repeated_counts)

    def save(self, path: Path) -> None:
        """One file: magic, header length, JSON header, then each array at a 64-byte aligned offset."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "vocabulary": np.ascontiguousarray(self.vocabulary, "<i4"),
            "text": np.ascontiguousarray(self._text),
            "suffix_array": np.ascontiguousarray(self.suffix_array),
            "record_starts": np.ascontiguousarray(self.record_starts),
            "gram_filter": np.ascontiguousarray(self.gram_filter, np.uint8),
            "record_id_ends": np.ascontiguousarray(self.record_ids._ends,
                                                   "<u4" if len(self.record_ids._blob) < 2**32 else "<u8"),
            "record_id_blob": np.frombuffer(bytes(self.record_ids._blob), np.uint8),
            "contributor_codes": np.ascontiguousarray(self.contributors.codes, "<u4"),
            "contributor_ends": np.ascontiguousarray(self.contributors.table._ends, "<u8"),
            "contributor_blob": np.frombuffer(bytes(self.contributors.table._blob), np.uint8),
            "repeated_hashes": np.ascontiguousarray(self.repeated_hashes, "<u8"),
            "repeated_counts": np.ascontiguousarray(self.repeated_counts, "<u2"),
        }
        sections, offset = {}, 0
        for name, array in arrays.items():
            sections[name] = [offset, len(array), array.dtype.str]
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
        header = json.dumps({"version": INDEX_VERSION, "datanetId": self.datanet_id, "tokenizerId": self.tokenizer_id,
                             "recordsRoot": self.records_root, "positions": self.size, "filterK": self.filter_k,
                             "sections": sections}, sort_keys=True).encode()
        start = -(-(len(INDEX_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as out:
            out.write(INDEX_MAGIC + len(header).to_bytes(8, "little") + header)
            for name, array in arrays.items():
                out.seek(start + sections[name][0])
                out.write(array.tobytes())
            out.truncate(start + offset)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # a reader never maps a half-written index

    @classmethod
    def load(cls, path: Path, datanet_id: str | None = None, tokenizer_id: str | None = None,
             records_root: str | None = None) -> SpanIndex:
        """Map an index file; refuse one for another Datanet, tokenizer or records root than the caller names."""
        try:
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if mapped[:len(INDEX_MAGIC)] != INDEX_MAGIC:
                raise ValueError("not a span index (bad magic)")
            length = int.from_bytes(mapped[len(INDEX_MAGIC):len(INDEX_MAGIC) + 8], "little")
            if length > 1 << 20:
                raise ValueError("header too long")
            header = json.loads(mapped[len(INDEX_MAGIC) + 8:len(INDEX_MAGIC) + 8 + length])
            if header.get("version") != INDEX_VERSION:
                raise ValueError(f"index version {header.get('version')}, this node reads {INDEX_VERSION}")
            start = -(-(len(INDEX_MAGIC) + 8 + length) // _ALIGN) * _ALIGN
            arrays = {}
            for name, (offset, count, dtype) in header["sections"].items():
                arrays[name] = np.frombuffer(mapped, np.dtype(dtype), int(count), start + int(offset))
            positions = int(header["positions"])
            if len(arrays["suffix_array"]) != positions or len(arrays["text"]) != positions + MAX_SPAN:
                raise ValueError("section sizes disagree with the header")
            index = cls(str(header["datanetId"]), arrays["vocabulary"], arrays["text"], arrays["suffix_array"],
                        arrays["record_starts"], _Strings(arrays["record_id_blob"], arrays["record_id_ends"]),
                        _Coded(_Strings(arrays["contributor_blob"], arrays["contributor_ends"]),
                               arrays["contributor_codes"]), arrays["gram_filter"],
                        int(header["filterK"]), str(header["tokenizerId"]), str(header["recordsRoot"]),
                        text_buffer=mapped, text_offset=start + int(header["sections"]["text"][0]),
                        repeated_hashes=arrays["repeated_hashes"], repeated_counts=arrays["repeated_counts"])
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise SpanIndexError(f"cannot load span index {path}: {error}") from error
        if datanet_id is not None and index.datanet_id != datanet_id.lower():
            raise SpanIndexError(f"{path} indexes datanet {index.datanet_id}, not {datanet_id}")
        if tokenizer_id is not None and index.tokenizer_id != tokenizer_id:
            raise SpanIndexError(f"{path} was built with tokenizer {index.tokenizer_id!r}, not {tokenizer_id!r}")
        if records_root is not None and index.records_root != records_root.lower():
            raise SpanIndexError(f"{path} covers records root {index.records_root}, the manifest says {records_root}")
        return index

    @property
    def nbytes(self) -> int:
        """Bytes the index occupies when mapped (the whole file is the in-memory form)."""
        return sum(a.nbytes for a in (self.vocabulary, self._text, self.suffix_array, self.record_starts,
                                      self.gram_filter, self.record_ids._ends, self.repeated_hashes,
                                      self.repeated_counts)) + len(self.record_ids._blob) + self.contributors.nbytes

    def gram_counts(self, token_ids: Sequence[int], hashes: np.ndarray | None = None) -> np.ndarray:
        """How often each filter_k-gram of the output occurs in this Datanet: the repeated-gram table's count, 1
        for one the Bloom filter holds (or a false positive of it), 0 otherwise; one entry per start position.
        `hashes`: `gram_hashes(token_ids, filter_k)`, computed once for every index of a query."""
        hashes = gram_hashes(token_ids, self.filter_k) if hashes is None else hashes
        counts = _bloom_contains(self.gram_filter, self._filter_bits, hashes).astype(np.int64)
        if len(self.repeated_hashes) and len(hashes):
            at = np.minimum(np.searchsorted(self.repeated_hashes, hashes), len(self.repeated_hashes) - 1)
            repeated = self.repeated_hashes[at] == hashes
            counts[repeated] = self.repeated_counts[at[repeated]]
        return counts

    # --- search ---------------------------------------------------------------------------------

    def encode(self, token_ids: Sequence[int]) -> np.ndarray:
        """Map token ids to this index's compact codes; ids the Datanet never uses become UNKNOWN."""
        ids = np.asarray(token_ids, dtype=np.int64)
        position = np.searchsorted(self.vocabulary, ids)
        clipped = np.minimum(position, len(self.vocabulary) - 1)
        known = (position < len(self.vocabulary)) & (self.vocabulary[clipped] == ids)
        return np.where(known, position + 1, UNKNOWN).astype(np.int32)

    def _windows(self, suffix_ranks: np.ndarray, width: int) -> np.ndarray:
        starts = self.suffix_array[np.minimum(suffix_ranks, self.size - 1)].astype(np.int64)
        return self._text[starts[:, None] + np.arange(width)].astype(np.int32)

    def _bound(self, patterns: np.ndarray, lengths: np.ndarray | None, upper: bool | np.ndarray) -> np.ndarray:
        """Vectorized binary search: first suffix rank whose prefix is >= (or > when `upper`) each pattern.

        Only the first `lengths[i]` columns of pattern i are compared (all when None).
        """
        count, width = patterns.shape
        lo = np.zeros(count, np.int64)
        hi = np.full(count, self.size, np.int64)
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

    def find_spans(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN,
                   hashes: np.ndarray | None = None, codes: np.ndarray | None = None,
                   starts: np.ndarray | None = None) -> list[SpanHit]:
        """Maximal spans of the output, at least `min_span` tokens long, that occur in this Datanet.

        The search takes whichever of the scalar and the vectorized search is faster at its size
        (docs/attribution.md). `hashes` (`gram_hashes(token_ids, filter_k)`) and `codes` (`encode(token_ids)`) may
        be passed when the caller has them. `starts` (bool per output position): search only matches starting
        there (a match starting elsewhere is found from its first allowed position on, shortened).
        """
        query = self.encode(token_ids) if codes is None else codes
        if len(query) < min_span:
            return []
        hits = self._gram_hits(query, min_span, hashes, token_ids)
        if starts is not None:
            hits = [h for h in hits if starts[h]]
        if len(hits) <= SCALAR_SEARCH_MAX_HITS:
            return self._spans_scalar(query, hits, min_span)
        return self._spans_vectorized(query, np.asarray(hits, np.int64), min_span)

    def find_spans_vectorized(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN) -> list[SpanHit]:
        """`find_spans` with every stage in numpy, all positions at once."""
        query = self.encode(token_ids)
        if len(query) < min_span:
            return []
        return self._spans_vectorized(query, np.asarray(self._gram_hits(query, min_span, None, token_ids), np.int64),
                                      min_span)

    def find_spans_scalar(self, token_ids: Sequence[int], min_span: int = DEFAULT_MIN_SPAN) -> list[SpanHit]:
        """`find_spans` with every stage in Python, one position at a time (bisect over byte strings)."""
        query = self.encode(token_ids)
        if len(query) < min_span:
            return []
        return self._spans_scalar(query, self._gram_hits(query, min_span, None, token_ids), min_span)

    # Stage 1: which positions can start a match: their min_span window holds no unknown token and, when the
    # filter's k is at most min_span, the k-gram there is in the Datanet's Bloom filter. Most of an output usually
    # fails, and is dropped here without touching the suffix array.

    def _gram_hits(self, query: np.ndarray, min_span: int, hashes: np.ndarray | None, token_ids) -> list[int]:
        count = len(query) - min_span + 1
        unknown = np.concatenate([[0], np.cumsum(query <= 0)])
        clean = np.flatnonzero(unknown[min_span:min_span + count] - unknown[:count] == 0)
        if not len(clean) or self.filter_k > min_span:
            return clean.tolist()
        hashes = gram_hashes(token_ids, self.filter_k) if hashes is None else hashes
        return clean[_bloom_contains(self.gram_filter, self._filter_bits, hashes[clean])].tolist()

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
        real = longest >= min_span  # filter false positives end here
        hits, longest = hits[real], longest[real]
        if not len(hits):
            return []
        ends = hits + longest
        keep = np.ones(len(hits), bool)
        keep[1:] = ~((hits[1:] - 1 == hits[:-1]) & (ends[:-1] >= ends[1:]))
        hits, longest = hits[keep], longest[keep]
        span_width = int(longest.max())
        lo, hi = self._intervals(padded[hits[:, None] + np.arange(span_width)], longest)
        return [SpanHit(int(s), int(s + n), int(a), int(b)) for s, n, a, b in zip(hits, longest, lo, hi, strict=True)]

    def _intervals(self, patterns: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) suffix-array interval of each pattern's first lengths[i] codes, both bounds in one search."""
        both = self._bound(np.concatenate([patterns, patterns]), np.concatenate([lengths, lengths]),
                           upper=np.repeat([False, True], len(patterns)))
        return both[:len(patterns)], both[len(patterns):]

    def _packed(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """Codes, one array per position, packed into one integer each, the first position most significant (so
        packed values sort as the code sequences do)."""
        bits = 8 * self._code_bytes
        packed = np.zeros(len(columns[0]), np.int64)
        for column in columns:
            packed = (packed << bits) | column.astype(np.int64)
        return packed

    def prefix_keys(self, width: int) -> np.ndarray | None:
        """Each suffix's first `width` codes packed into one integer, in suffix-array order (so sorted): counting a
        pattern of up to `width` codes is then two `searchsorted` calls. None when the codes do not fit 63 bits."""
        if width * 8 * self._code_bytes > 63:
            return None
        starts = self.suffix_array.astype(np.int64)
        return self._packed([self._text[starts + j] for j in range(width)])

    def counts(self, patterns: np.ndarray, lengths: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """How often each pattern occurs: row i's first lengths[i] codes (this index's codes, all known). `keys`:
        this index's `prefix_keys(patterns.shape[1])`, for the fast path."""
        if not len(patterns):
            return np.zeros(0, np.int64)
        if keys is None:
            lo, hi = self._intervals(patterns, lengths)
            return hi - lo
        width = patterns.shape[1]
        kept = np.arange(width)[None, :] < lengths[:, None]
        # Codes past a pattern's length are 0 (below every real code): the first key holding the pattern; the
        # pattern's last code plus one, at its place, is the first key past it.
        packed = self._packed([np.where(kept[:, j], patterns[:, j], 0) for j in range(width)])
        above = packed + (np.int64(1) << (8 * self._code_bytes * (width - lengths)))
        return np.searchsorted(keys, above) - np.searchsorted(keys, packed)

    def _query_bytes(self, codes) -> bytes:
        width = self._code_bytes
        # Unknown tokens are never inside a searched window (stage 1), so their bytes are never compared.
        return np.maximum(np.asarray(codes, np.int64), 0).astype(">u4" if width == 4 else ">u2").tobytes()

    def _spans_scalar(self, codes: np.ndarray, hits: list[int], min_span: int) -> list[SpanHit]:
        if not hits:
            return []
        width = self._code_bytes
        query = self._query_bytes(codes)
        run_ends: list[int] = []
        for index in range(len(hits) - 1, -1, -1):
            last_of_run = index == len(hits) - 1 or hits[index + 1] != hits[index] + 1
            run_ends.append(hits[index] + min_span if last_of_run else run_ends[-1])
        run_ends.reverse()
        matches: list[tuple[int, int]] = []
        hit_set = set(hits)
        skip_through = -1
        for start, run_end in zip(hits, run_ends, strict=True):
            if start <= skip_through:
                continue
            pattern = query[width * start:width * (start + min(run_end - start, MAX_SPAN))]
            rank = self._lower_bound(pattern)
            before, at = self._common_codes(rank - 1, pattern), self._common_codes(rank, pattern)
            longest = max(before, at)
            if longest >= min_span:  # filter false positives end here
                matches.append((start, longest, rank - 1 if before > at else rank))
                # A later start reaches past this match's end only through the min_span-gram ending one token
                # beyond it; when that gram is no hit, every start up to it is covered by this match: not searched.
                last_gram = start + longest + 1 - min_span
                if last_gram not in hit_set:
                    skip_through = last_gram
        spans: list[SpanHit] = []
        reached = -1
        for start, longest, found in matches:
            # Not maximal when an earlier match covers it (equivalently, the match one token earlier does).
            if start + longest <= reached:
                continue
            reached = start + longest
            spans.append(SpanHit(start, start + longest,
                                 *self._interval_around(query[width * start:width * (start + longest)], found)))
        return spans

    def _interval_around(self, pattern: bytes, rank: int) -> tuple[int, int]:
        """[lo, hi) of the suffixes starting with `pattern`, given a rank among them: galloping out from it, then
        bisecting the last step, O(log occurrences) probes instead of two searches of the whole array (a kept span
        occurs a few times at most)."""
        key = self._suffix_key(len(pattern))
        low, step = rank, 1
        while low - step >= 0 and key(low - step) == pattern:
            low -= step
            step *= 2
        lo = bisect.bisect_left(range(self.size), pattern, max(0, low - step + 1), low, key=key)
        high, step = rank, 1
        while high + step < self.size and key(high + step) == pattern:
            high += step
            step *= 2
        hi = bisect.bisect_right(range(self.size), pattern, high + 1, min(self.size, high + step), key=key)
        return lo, hi

    def interval(self, codes: Sequence[int]) -> tuple[int, int]:
        """Suffix-array interval [lo, hi) of the suffixes starting with `codes` (this index's codes, all known)."""
        pattern = self._query_bytes(codes)
        return self._lower_bound(pattern), self._upper_bound(pattern)

    def _suffix_key(self, length: int):
        text, starts, width, base = self._text_bytes, self._suffix_starts, self._code_bytes, self._text_offset
        return lambda rank: text[base + width * starts[rank]:base + width * starts[rank] + length]

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
        offset = self._text_offset + width * self._suffix_starts[rank]
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

    def records_of(self, hit: SpanHit, max_occurrences: int = 256) -> np.ndarray:
        """Record numbers holding the span (an evenly spaced sample when it occurs very often)."""
        ranks = np.arange(hit.lo, hit.hi)
        if len(ranks) > max_occurrences:
            ranks = ranks[np.linspace(0, len(ranks) - 1, max_occurrences).astype(np.int64)]
        positions = self.suffix_array[ranks].astype(np.int64)
        return np.unique(np.searchsorted(self.record_starts.astype(np.int64), positions, side="right") - 1)


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def _rolling_hashes(codes: np.ndarray, k: int) -> np.ndarray:
    """A 64-bit polynomial hash of each k-gram of `codes` (wrapping arithmetic), one per start."""
    count = len(codes) - k + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    values = np.asarray(codes).astype(np.int64).astype(np.uint64)
    hashes = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            hashes = hashes * _HASH_MULTIPLIER + values[j:j + count] + np.uint64(1)
    return hashes


def gram_hashes(token_ids: Sequence[int], k: int) -> np.ndarray:
    """The hash of each k-gram of token ids (ids + 1, so that the index's separators, 0, match no token), one per
    start: the same for every index, so computed once per query."""
    return _rolling_hashes(np.asarray(token_ids, np.int64) + 1, k)


def _bloom_probes(hashes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(over="ignore"):
        first = hashes >> np.uint64(64 - bits)
        second = ((hashes ^ (hashes >> np.uint64(31))) * _MIX) >> np.uint64(64 - bits)
    return first, second


def _clean_grams(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The hash of the k-gram at each position and whether it holds no separator."""
    grams = _rolling_hashes(codes, k)
    count = len(codes) - k + 1
    if count <= 0:
        return grams, np.zeros(0, bool)
    minimum = codes[:count].copy()
    for j in range(1, k):
        np.minimum(minimum, codes[j:j + count], out=minimum)
    return grams, minimum > 0


def _repeated_grams(native: np.ndarray, suffix_array: np.ndarray, grams: np.ndarray, clean: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-grams occurring at least twice and their counts, from the LCP array (Kasai): a run of suffixes sharing
    k codes is one k-gram's occurrences."""
    from pydivsufsort import kasai

    if len(grams) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint16)
    lcp = np.asarray(kasai(native, suffix_array))
    starts = np.concatenate([[True], lcp[:-1] < k])
    sizes = np.bincount(np.cumsum(starts) - 1)
    repeated = sizes >= 2
    positions = suffix_array[np.flatnonzero(starts)[repeated]].astype(np.int64)
    counts = sizes[repeated]
    valid = positions < len(clean)
    valid[valid] = clean[positions[valid]]  # a run of suffixes sharing k codes that hold a separator is no k-gram
    hashes, counts = grams[positions[valid]], counts[valid]
    order = np.argsort(hashes, kind="stable")
    return hashes[order], np.minimum(counts[order], 65535).astype(np.uint16)


def _bloom(grams: np.ndarray) -> np.ndarray:
    """A Bloom filter (2 probes, 6-12 bits per k-gram) of the given k-gram hashes."""
    bits = max(9, int(math.ceil(math.log2(max(1, 6 * len(grams))))))
    table = np.zeros(1 << (bits - 3), np.uint8)
    for probe in _bloom_probes(grams, bits):
        probe = np.unique(probe)
        np.bitwise_or.at(table, (probe >> np.uint64(3)).astype(np.int64), (1 << (probe & np.uint64(7))).astype(np.uint8))
    return table


def _bloom_contains(table: np.ndarray, bits: int, hashes: np.ndarray) -> np.ndarray:
    found = np.ones(len(hashes), bool)
    for probe in _bloom_probes(hashes, bits):
        found &= (table[(probe >> np.uint64(3)).astype(np.int64)] >> (probe & np.uint64(7)).astype(np.uint8)) & 1 == 1
    return found


# --- what a token is: words, delimiters, how common -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """Per token id: whether it begins / ends inside a word, whether it is a delimiter, its unigram log-probability.

    Built from the tokenizer's vocabulary and the reference corpus's counts. Without one (`Lexicon.plain`), every
    token is a word of its own, nothing is a delimiter and every token is equally likely: the token-level rules.
    """

    begins_word: np.ndarray  # bool: the token's first character is a letter or digit (it glues to a word before it)
    ends_word: np.ndarray  # bool: its last character is
    delimiter: np.ndarray  # bool: holds a newline (spans may not cross it)
    log_prob: np.ndarray  # float32, natural log, add-one smoothed counts
    starts_word: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))  # letter/digit after spaces
    # The reference corpus's bigram model (Witten-Bell): pair keys `a * vocabulary + b`, sorted, with their counts,
    # and per token a: how often it is followed by a token, and by how many distinct ones. Empty: no bigram model,
    # a token's surprisal is its unigram one.
    pair_keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint64))
    pair_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint32))
    followed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint32))
    followers: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint32))

    @classmethod
    def plain(cls) -> Lexicon:
        return cls(np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, np.float32))

    @classmethod
    def from_tokenizer(cls, tokenizer, counts: np.ndarray | None = None,
                       records: Sequence[Sequence[int]] = ()) -> Lexicon:
        """The tokenizer's word and delimiter tables; unigram counts (`counts`) and the bigram model of `records`
        (the reference corpus in token ids; pairs never cross a record's end)."""
        size = len(tokenizer)
        texts = [_token_text(tokenizer, i) for i in range(size)]

        def wordy(ch: str) -> bool:
            return ch.isalnum() or ch == "\ufffd"  # a piece of a multi-byte character continues its word

        begins = np.array([bool(t) and wordy(t[0]) for t in texts])
        ends = np.array([bool(t) and wordy(t[-1]) for t in texts])
        starts = np.array([bool(t.lstrip()) and wordy(t.lstrip()[0]) for t in texts])
        delimiter = np.array(["\n" in t for t in texts])
        counts = np.zeros(size, np.int64) if counts is None else np.asarray(counts[:size], np.int64)
        log_prob = np.log((counts + 1) / (counts.sum() + size)).astype(np.float32)
        return cls(begins, ends, delimiter, log_prob, starts).with_bigrams(records)

    def with_bigrams(self, records: Sequence[Sequence[int]]) -> Lexicon:
        """This lexicon with the bigram model of `records` (token ids; pairs never cross a record's end)."""
        size = len(self.log_prob)
        pairs = [np.asarray(r, np.int64) for r in records if len(r) > 1]
        if not pairs or not size:
            return self
        first = np.concatenate([r[:-1] for r in pairs])
        keys = first.astype(np.uint64) * np.uint64(size) + np.concatenate([r[1:] for r in pairs]).astype(np.uint64)
        pair_keys, pair_counts = np.unique(keys, return_counts=True)
        followed = np.bincount(first, minlength=size)[:size].astype(np.uint32)
        followers = np.bincount((pair_keys // np.uint64(size)).astype(np.int64), minlength=size)[:size]
        return dataclasses.replace(self, pair_keys=pair_keys, pair_counts=pair_counts.astype(np.uint32),
                                   followed=followed, followers=followers.astype(np.uint32))

    def _lookup(self, table: np.ndarray, ids: np.ndarray, default) -> np.ndarray:
        inside = (ids >= 0) & (ids < len(table))
        out = np.full(len(ids), default, dtype=table.dtype if len(table) else type(default))
        out[inside] = table[ids[inside]]
        return out

    def boundaries(self, ids: np.ndarray) -> np.ndarray:
        """boundary[i]: a word may start at token i (i in 0..n); a word continues where two letters/digits meet."""
        begins = self._lookup(self.begins_word, ids, False)
        ends = self._lookup(self.ends_word, ids, False)
        inside = np.concatenate([[False], ends[:-1] & begins[1:], [False]]) if len(ids) else np.array([False])
        return ~inside

    def words(self, ids: np.ndarray) -> np.ndarray:
        """word_start[i]: token i begins a word of letters/digits (cumulated, it counts whole words in a span)."""
        starts = self._lookup(self.starts_word, ids, True)
        return starts & self.boundaries(ids)[:-1]

    def delimiters(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup(self.delimiter, ids, False)

    def log_probs(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup(self.log_prob, ids, np.float32(PLAIN_LOG_PROB))

    def next_log_probs(self, ids: np.ndarray) -> np.ndarray:
        """log P(ids[i] | ids[i-1]) under the reference's bigram model, Witten-Bell smoothed toward the unigram
        (entry 0, which has no token before it: the unigram log-probability). Without a bigram model: unigram."""
        unigram = self.log_probs(ids).astype(np.float64)
        size = len(self.followed)
        if not size or len(ids) < 2:
            return unigram
        before, after = ids[:-1], ids[1:]
        inside = (before >= 0) & (before < size) & (after >= 0) & (after < size)
        keys = np.where(inside, before, 0).astype(np.uint64) * np.uint64(size) + np.where(inside, after, 0).astype(
            np.uint64)
        at = np.minimum(np.searchsorted(self.pair_keys, keys), len(self.pair_keys) - 1)
        pair = np.where(inside & (self.pair_keys[at] == keys), self.pair_counts[at], 0).astype(np.float64)
        seen = self._lookup(self.followed, before, np.uint32(0)).astype(np.float64)
        distinct = self._lookup(self.followers, before, np.uint32(0)).astype(np.float64)
        # Witten-Bell: of a context seen c times with t distinct followers, a share t/(c+t) of the mass is left for
        # the unigram model; a context never seen leaves all of it.
        conditional = (pair + distinct * np.exp(unigram[1:])) / np.maximum(seen + distinct, 1.0)
        conditional = np.where(seen > 0, conditional, np.exp(unigram[1:]))
        return np.concatenate([unigram[:1], np.log(conditional)])

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as out:
            np.savez(out, begins_word=self.begins_word, ends_word=self.ends_word, delimiter=self.delimiter,
                     log_prob=self.log_prob, starts_word=self.starts_word, pair_keys=self.pair_keys,
                     pair_counts=self.pair_counts, followed=self.followed, followers=self.followers,
                     version=np.array([LEXICON_VERSION]))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Lexicon:
        try:
            with np.load(path, allow_pickle=False) as data:
                if "version" not in data or int(data["version"][0]) != LEXICON_VERSION:
                    raise ValueError(f"lexicon version {data['version'][0] if 'version' in data else 1}, "
                                     f"this node reads {LEXICON_VERSION}")
                return cls(data["begins_word"], data["ends_word"], data["delimiter"], data["log_prob"],
                           data["starts_word"], data["pair_keys"], data["pair_counts"], data["followed"],
                           data["followers"])
        except (OSError, KeyError, ValueError) as error:
            raise SpanIndexError(f"cannot load lexicon {path}: {error}") from error


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: which byte each printable stand-in character means."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapped, extra = list(visible), 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            mapped.append(256 + extra)
            extra += 1
    return {chr(m): b for b, m in zip(visible, mapped, strict=True)}


_BYTES = _byte_decoder()


def _token_text(tokenizer, token_id: int) -> str:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return ""
    if all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece).decode("utf-8", errors="replace")
    return piece.replace("▁", " ")


def tokenizer_fingerprint(tokenizer) -> str:
    """What binds an index to the tokenizer that made its ids: SHA-256 of the vocabulary (token → id), sorted."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:sha256:{digest[:32]}"


# --- the reference corpus: generic text that is no Datanet ----------------------------------------


@dataclasses.dataclass
class Reference:
    """Text that belongs to nobody (docs/attribution.md): its index marks generic spans, its counts give the lexicon."""

    index: SpanIndex | None
    lexicon: Lexicon
    gram_keys: np.ndarray | None = dataclasses.field(default=None, repr=False)  # index.prefix_keys(NGRAM_ORDER)

    def __post_init__(self) -> None:
        if self.gram_keys is None and self.index is not None:
            self.gram_keys = self.index.prefix_keys(NGRAM_ORDER)

    @classmethod
    def plain(cls) -> Reference:
        return cls(None, Lexicon.plain())


# What the embedded base model writes unaided (scripts/generate_reference.py made it; shipped, so every node builds
# the same reference without running a model).
# Its everyday answers, then the stock parts of answers (openings, closings, caveats, notices).
REFERENCE_GENERATED = tuple(Path(__file__).resolve().parent / "reference" / name
                            for name in ("generic_answers.txt.gz", "generic_stock_parts.txt.gz"))
REFERENCE_INDEX = "reference.lti"
REFERENCE_LEXICON = "lexicon.npz"
REFERENCE_SOURCE_BYTES = 4_000_000  # of the standard library's sources
REFERENCE_PROSE_BYTES = 10_000_000  # of documentation prose
MIN_DOCSTRING_CHARS = 80


def reference_texts(source_bytes: int = REFERENCE_SOURCE_BYTES, prose_bytes: int = REFERENCE_PROSE_BYTES,
                    generated: Sequence[Path] = REFERENCE_GENERATED, packages: bool = True) -> list[str]:
    """The reference corpus, text that belongs to no Datanet and that every node has with its interpreter and its
    dependencies; deterministic for one installation:

    - what the embedded base model writes unaided (`generated_answers`, shipped with the package);
    - generated number lists and dates;
    - the Python standard library's sources (code, docstrings and comments), up to `source_bytes`;
    - English prose: Python's own reference manual as `pydoc` ships it (`pydoc_data.topics`), the installed
      packages' descriptions (their READMEs, in the metadata) and licence texts (each distinct text once), then
      their docstrings (site-packages in path order, read with `ast`), up to `prose_bytes` in all. Code says
      little about how English runs; documentation does, and it holds the stock phrases an answer reuses ("it is
      important to note that", "for more information, please refer to", "all rights reserved").

    `generated` and `packages` choose the parts (scripts/bench_generic_text.py builds the earlier reference, the
    everyday answers without the packages' descriptions and licences, as its baseline).
    """
    import sysconfig

    texts = generated_answers(generated)
    texts += [", ".join(str(i * step) for i in range(start, start + 40))
             for step in (1, 2, 3, 4, 5, 10, 20, 25, 50, 100, 1000) for start in (0, 1)]
    texts += [f"{year}-{month:02d}-{day:02d}" + f" {day} {name} {year}"
              for year in range(1990, 2031) for month, name in enumerate(
                  ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                   "October", "November", "December"), start=1) for day in (1, 15, 28)]
    total = sum(map(len, texts))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if total >= source_bytes:
            break
        if path.parent != stdlib and "test" in path.parent.name:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
    prose = 0
    try:
        from pydoc_data.topics import topics
    except ImportError:  # an interpreter built without its docs
        topics = {}
    for name in sorted(topics):
        if prose >= prose_bytes:
            break
        texts.append(topics[name])
        prose += len(topics[name])
    site = Path(sysconfig.get_paths()["purelib"])
    for text in package_prose(site) if packages else []:
        if prose >= prose_bytes:
            break
        texts.append(text)
        prose += len(text)
    last = None
    for path, docstring in package_docstrings(site):
        if path != last and prose >= prose_bytes:  # whole files: the cap is checked between them
            break
        last = path
        if len(docstring) >= MIN_DOCSTRING_CHARS:  # one-liners are mostly names
            texts.append(docstring)
            prose += len(docstring)
    return texts


def package_docstrings(site: Path) -> Iterator[tuple[Path, str]]:
    """(file, docstring) of every module, class and function of the installed packages, in path order.

    Not tests (their strings are data, not prose), and not this project when it is installed as a package: its
    own text (the Datanet generators, the held-out evaluation) must not define what is generic."""
    import ast

    for path in sorted(site.glob("*/**/*.py")):
        folders = path.relative_to(site).parts[:-1]
        if folders[0] == "longtail" or any(part in ("test", "tests", "testing") for part in folders):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (OSError, SyntaxError, ValueError, MemoryError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=True)
                if docstring:
                    yield path, docstring


def package_prose(site: Path) -> list[str]:
    """The installed distributions' descriptions and licence texts, in path order, each distinct text once (most
    packages ship one of a few licences). This project's own distribution is left out, as its docstrings are."""
    import email

    seen: set[str] = set()
    texts: list[str] = []
    for folder in sorted(site.glob("*.dist-info")):
        if folder.name.startswith("longtail-"):
            continue
        files = [folder / "METADATA"] + sorted(path for path in folder.rglob("*")
                                                if path.is_file() and path.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")))
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            if path.name == "METADATA":
                # Decoded first: METADATA is UTF-8 without a charset header, and the email parser would read
                # every non-ASCII byte as its own replacement character.
                message = email.message_from_string(raw.decode("utf-8", "replace"))
                body = message.get_payload()
                text = body if isinstance(body, str) and body.strip() else str(message.get("Description") or "")
            else:
                text = raw.decode("utf-8", "replace")
            text = text.strip()
            if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


def generated_answers(paths: str | Path | Sequence[Path] = REFERENCE_GENERATED) -> list[str]:
    """The shipped answers of the base model, one per line with `\\n` and `\\\\` escaped."""
    import gzip
    import re

    unescape = re.compile(r"\\(.)")
    answers = []
    for path in [Path(paths)] if isinstance(paths, (str, Path)) else paths:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
        answers += [unescape.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), line) for line in lines if line]
    return answers


def build_reference(folder: Path, tokenizer, source_bytes: int = REFERENCE_SOURCE_BYTES,
                    prose_bytes: int = REFERENCE_PROSE_BYTES, generated: Sequence[Path] = REFERENCE_GENERATED,
                    packages: bool = True) -> Reference:
    """Tokenize and index the reference corpus, count its tokens and token pairs for the lexicon; write both into
    `folder`."""
    texts = reference_texts(source_bytes, prose_bytes, generated, packages)
    token_ids = tokenize_records(texts, tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    root = "0x" + hashlib.sha256(b"\0".join(t.encode() for t in texts)).hexdigest()
    index = SpanIndex.build("reference", (IndexedRecord(f"ref-{i}", "0x" + "00" * 20, ids)
                                          for i, ids in enumerate(token_ids)), fingerprint, root)
    counts = np.bincount(np.fromiter((t for ids in token_ids for t in ids), np.int64), minlength=len(tokenizer))
    lexicon = Lexicon.from_tokenizer(tokenizer, counts, token_ids)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index.save(folder / REFERENCE_INDEX)
    lexicon.save(folder / REFERENCE_LEXICON)
    return Reference(SpanIndex.load(folder / REFERENCE_INDEX), lexicon)


def load_reference(folder: Path, tokenizer_id: str | None = None) -> Reference:
    folder = Path(folder)
    return Reference(SpanIndex.load(folder / REFERENCE_INDEX, "reference", tokenizer_id),
                     Lexicon.load(folder / REFERENCE_LEXICON))


def ensure_reference(folder: Path, tokenizer) -> Reference:
    """The reference for this tokenizer, built once ahead of time (never on a request)."""
    try:
        return load_reference(folder, tokenizer_fingerprint(tokenizer))
    except SpanIndexError:
        return build_reference(folder, tokenizer)


# --- weighing ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordWeight:
    """A record's share of the output's span credit (fractions of the whole output's credit)."""

    datanet_id: str
    record_id: str
    contributor: str
    weight: float


@dataclasses.dataclass(frozen=True)
class SpanAttribution:
    """The result of matching one output: Datanet weights, the spans, and credit down to records.

    `matched_tokens` counts the output tokens that earned credit (inside a kept span or a piece across a changed
    word, not generic);
    the payment rule weighs the span vector by matched_tokens / output_tokens (node/attributor.py).
    """

    vector: AttributionVector
    spans: tuple[MatchedSpan, ...]
    records: tuple[RecordWeight, ...]
    contributors: tuple[tuple[str, str, float], ...]
    matched_tokens: int
    output_tokens: int
    generic_tokens: int = 0
    credited: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)  # bool per output token

    @property
    def token_credit(self) -> np.ndarray | None:
        return self.credited

    def to_json(self) -> dict:
        return {"attribution": self.vector.to_json(), "spans": [s.to_json() for s in self.spans],
                "records": [dataclasses.asdict(r) for r in self.records],
                "contributors": [{"datanetId": d, "contributor": c, "weight": w} for d, c, w in self.contributors],
                "matchedTokens": self.matched_tokens, "outputTokens": self.output_tokens,
                "genericTokens": self.generic_tokens}


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


def _pieces(start: int, end: int, boundaries: np.ndarray, delimiters: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) cut at delimiter tokens (which belong to no piece), each piece trimmed to whole words."""
    pieces, s = [], start
    for i in [*np.flatnonzero(delimiters[start:end]) + start, end]:
        lo, hi = s, int(i)
        while lo < hi and not boundaries[lo]:
            lo += 1
        while hi > lo and not boundaries[hi]:
            hi -= 1
        if hi > lo:
            pieces.append((lo, hi))
        s = int(i) + 1
    return pieces


@dataclasses.dataclass
class OutputLexicon:
    """One output's per-token values under the reference's lexicon, each computed once for every rule that reads
    them (span selection, the surprisal floor, the pieces across a changed word). The word marks are plain
    lookups, made at once; the bigram model and each index's codes when first read."""

    ids: np.ndarray  # int64 token ids
    reference: Reference
    boundaries: np.ndarray = dataclasses.field(init=False)
    delimiters: np.ndarray = dataclasses.field(init=False)
    word_starts: np.ndarray = dataclasses.field(init=False)  # word_starts[e] - word_starts[s]: whole words in [s, e)
    log_probs: np.ndarray = dataclasses.field(init=False)
    _codes: dict[SpanIndex, np.ndarray] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        lexicon = self.reference.lexicon
        self.boundaries, self.delimiters = lexicon.boundaries(self.ids), lexicon.delimiters(self.ids)
        self.word_starts = np.concatenate([[0], np.cumsum(lexicon.words(self.ids))])
        self.log_probs = lexicon.log_probs(self.ids)

    @classmethod
    def of(cls, token_ids: Sequence[int] | np.ndarray, reference: Reference | None) -> OutputLexicon:
        return cls(np.asarray(token_ids, np.int64), reference or Reference.plain())

    @functools.cached_property
    def next_log_probs(self) -> np.ndarray:
        return self.reference.lexicon.next_log_probs(self.ids)

    def codes(self, index: SpanIndex) -> np.ndarray:
        """The output in `index`'s codes, encoded once per index: the span search, the reference's n-gram counts and
        the walk across a changed word all read them."""
        if index not in self._codes:
            self._codes[index] = index.encode(self.ids)
        return self._codes[index]


def span_log_probs(reference: Reference, ids: Sequence[int] | np.ndarray, segments: Sequence[tuple[int, int]],
                   order: int = NGRAM_ORDER, prior: float = NGRAM_PRIOR,
                   lexicon_values: OutputLexicon | None = None) -> list[np.ndarray]:
    """log P(token | the tokens before it inside its segment) for each [start, end) of `ids`, under the reference.

    A segment is scored on its own (its first token by the unigram model): the text before a copied span in the
    output is not the text before it in the record. The lexicon's bigram model gives the first step; each longer
    context seen in the reference's text then moves the estimate toward what followed it there:
    P_k = (count(context, token) + prior * P_{k-1}) / (count(context) + prior), up to `order` tokens in all, and
    stops at the first context the reference never holds. `lexicon_values`: the output's, when the caller has them
    (for `ids` under `reference`).
    """
    values = lexicon_values or OutputLexicon.of(ids, reference)
    ids = values.ids
    if not segments:
        return []
    unigram = values.log_probs.astype(np.float64)
    bigram = values.next_log_probs
    # Every segment's positions, concatenated, with the start of the segment each belongs to.
    sizes = np.array([end - start for start, end in segments], np.int64)
    at = np.concatenate([np.arange(start, end) for start, end in segments]).astype(np.int64)
    begins = np.repeat(np.array([start for start, _ in segments], np.int64), sizes)
    scored = np.where(at == begins, unigram[at], bigram[at])
    index = reference.index
    if index is not None and order >= 3:
        # Every n-gram (2 <= n <= order) of known tokens ending at a position some segment covers and starting
        # inside one: all counted in one vectorized search of the reference's suffix array.
        codes = values.codes(index)
        length = len(ids)
        earliest = np.full(length, length, np.int64)  # the earliest start of the segments covering each position
        np.minimum.at(earliest, at, begins)
        position = np.arange(length)
        known = codes != UNKNOWN
        run = np.where(known, position - np.maximum.accumulate(np.where(known, -1, position)), 0)  # known in a row
        asked = [position[(run >= n) & (position - n + 1 >= earliest)] for n in range(order + 1)]
        patterns = np.zeros((sum(len(asked[n]) for n in range(2, order + 1)), order), np.int32)
        lengths = np.repeat(np.arange(2, order + 1), [len(asked[n]) for n in range(2, order + 1)])
        row = 0
        for n in range(2, order + 1):
            for j in range(n):
                patterns[row:row + len(asked[n]), j] = codes[asked[n] - n + 1 + j]
            row += len(asked[n])
        found = index.counts(patterns, lengths, reference.gram_keys if order == NGRAM_ORDER else None)
        counts = np.zeros((order + 1, length))
        row = 0
        for n in range(2, order + 1):
            counts[n, asked[n]] = found[row:row + len(asked[n])]
            row += len(asked[n])
        probability = np.exp(scored)
        for n in range(3, order + 1):
            # A context the reference never holds stops the walk: no longer one holds it either.
            context = np.where(at > begins, counts[n - 1, at - 1], 0.0)
            use = (at - n + 1 >= begins) & (run[at] >= n) & (context > 0)
            probability = np.where(use, (counts[n, at] + prior * probability) / np.maximum(context + prior, 1e-300),
                                   probability)
        scored = np.log(probability)
    return np.split(scored, np.cumsum(sizes)[:-1])


@dataclasses.dataclass
class _Candidate:
    start: int
    end: int
    holders: list[tuple[int, int, int]]  # (index number, lo, hi) of each Datanet holding the piece


def select_spans(token_ids: Sequence[int], indexes: Sequence[SpanIndex], reference: Reference | None = None,
                 min_span: int = DEFAULT_MIN_SPAN, min_words: int = MIN_WORDS, frequency_cap: int = FREQUENCY_CAP,
                 budget_per_token: float = SPAN_BUDGET_PER_TOKEN,
                 min_surprisal: float = MIN_SURPRISAL, ngram_order: int = NGRAM_ORDER,
                 lexicon_values: OutputLexicon | None = None) -> tuple[list[_Candidate], np.ndarray]:
    """The spans that count (docs/attribution.md, "Which spans count") and the mask of generic tokens.
    `lexicon_values`: the output's, when the caller has them (for `token_ids` under `reference`)."""
    values = lexicon_values or OutputLexicon.of(token_ids, reference)
    reference, ids = values.reference, values.ids
    length = len(ids)
    boundaries, delimiters, word_starts = values.boundaries, values.delimiters, values.word_starts
    generic = np.zeros(length, bool)
    hashes: dict[int, np.ndarray] = {}

    def grams(k: int) -> np.ndarray:
        if k not in hashes:
            hashes[k] = gram_hashes(token_ids, k)
        return hashes[k]

    pieces: dict[tuple[int, int], _Candidate] = {}
    for number, index in enumerate(indexes):
        codes = values.codes(index)
        for hit in index.find_spans(token_ids, min_span, grams(index.filter_k), codes):
            for s, e in _pieces(hit.start, hit.end, boundaries, delimiters):
                if e - s < min_span or word_starts[e] - word_starts[s] < min_words:
                    continue
                if (s, e) == (hit.start, hit.end):
                    lo, hi = hit.lo, hit.hi
                else:
                    lo, hi = index.interval(codes[s:e])
                pieces.setdefault((s, e), _Candidate(s, e, [])).holders.append((number, lo, hi))
    if not pieces:
        return [], generic
    if reference.index is not None:
        # Generic marks matter only over candidates: the reference (the largest index) is searched only where a
        # match could reach one, so an answer pays for reference probes only around Datanet matches.
        near = np.zeros(length, bool)
        for candidate in pieces.values():
            near[max(0, candidate.start - min_span + 1):candidate.end] = True
        for hit in reference.index.find_spans(token_ids, min_span, grams(reference.index.filter_k),
                                              values.codes(reference.index), starts=near):
            for s, e in _pieces(hit.start, hit.end, boundaries, delimiters):
                generic[s:e] = True
    if all(index.filter_k == min_span for index in indexes):
        # A min_span-gram the adapter's Datanets hold more than frequency_cap times is boilerplate wherever it
        # sits: a rare span made of one plus a word or two of chance extension earns nothing for it.
        # Unless one Datanet holds the occurrences, more of them than generic text spread over the Datanets in
        # proportion to their sizes would put there by chance (share^count < CONCENTRATION_P), and every other
        # Datanet at most one (a count of one is also what a Bloom filter's false positive reads as): that is the
        # Datanet's own boilerplate (a template, a house style), evidence for it though not for one record.
        per_index = [index.gram_counts(token_ids, grams(min_span)) for index in indexes]
        counts = sum(per_index)
        frequent = counts > frequency_cap
        if len(indexes) > 1 and frequent.any():
            sizes = np.array([index.size for index in indexes], np.float64)
            widest = np.max(per_index, axis=0)
            spread = np.sum([held > 1 for held in per_index], axis=0)  # Datanets holding it more than once
            for held, share in zip(per_index, sizes / sizes.sum(), strict=True):
                alone = (held == widest) & (spread <= 1) & (held * math.log(share) < math.log(CONCENTRATION_P))
                frequent &= ~alone
        for j in np.flatnonzero(frequent):
            generic[j:j + min_span] = True
    log_probs = values.log_probs
    rare = [c for c in pieces.values() if sum(hi - lo for _, lo, hi in c.holders) <= frequency_cap]
    in_span = span_log_probs(reference, ids, [(c.start, c.end) for c in rare], ngram_order, lexicon_values=values)
    kept = []
    for candidate, token_log_probs in zip(rare, in_span, strict=True):
        segment = slice(candidate.start, candidate.end)
        if -float(token_log_probs[~generic[segment]].sum()) >= min_surprisal:
            kept.append(candidate)
    kept.sort(key=lambda c: (float(log_probs[c.start:c.end].sum()), c.start, c.end))
    budget = max(1, math.ceil(budget_per_token * length))
    return kept[:budget], generic


def gap_pieces(codes: list[int], index: SpanIndex, lo: int, hi: int, start: int, end: int, stop: list[bool],
               gap: int = GAP_TOKENS, min_piece: int = MIN_GAP_PIECE) -> list[tuple[int, int]]:
    """Output pieces [s, e) outside [start, end) that a record holding that span (its suffix-array interval [lo, hi)
    in `index`) continues with after a gap of up to `gap` tokens on each side, in place: the copy goes on across
    a changed word. `codes`: the output in `index`'s codes; `stop`: its delimiters. Walks outward from the span,
    piece by piece, on each of the span's occurrences; a gap never crosses a record's end or an output delimiter,
    and a piece stops at either."""
    pieces: set[tuple[int, int]] = set()
    for occurrence in index.suffix_array[lo:hi].tolist():
        # The record's text around the occurrence, as far as a walk over this output could reach.
        first = max(0, occurrence - 2 * start - gap - 1)
        text = index._text[first:occurrence + (end - start) + 2 * (len(codes) - end) + gap + 1].tolist()
        for step in (1, -1):
            # The first output position and text position past the span, walking by `step`.
            at, from_ = (end, occurrence + end - start - first) if step == 1 else (start - 1, occurrence - 1 - first)
            while True:
                best_o, best_t, best = 0, 0, 0
                for skip_out in range(gap + 1):
                    o = at + step * skip_out
                    if not 0 <= o < len(codes) or (skip_out and stop[o - step]):
                        break
                    if codes[o] == UNKNOWN or stop[o]:
                        continue
                    for skip_text in range(gap + 1):
                        t = from_ + step * skip_text
                        if not 0 <= t < len(text) or (skip_text and text[t - step] == SEPARATOR):
                            break
                        if text[t] != codes[o]:
                            continue  # most pairings disagree at once
                        agree = 0
                        # (An UNKNOWN output code, -1, never equals a text code.)
                        while (0 <= o + step * agree < len(codes) and 0 <= t + step * agree < len(text)
                               and not stop[o + step * agree]
                               and codes[o + step * agree] == text[t + step * agree] != SEPARATOR):
                            agree += 1
                        if agree > best:
                            best_o, best_t, best = o, t, agree
                if best < min_piece:
                    break
                pieces.add((best_o, best_o + best) if step == 1 else (best_o - best + 1, best_o + 1))
                at, from_ = best_o + step * best, best_t + step * best
    return sorted(pieces)


def near_verbatim_pieces(token_ids: Sequence[int], kept: Sequence[_Candidate], indexes: Sequence[SpanIndex],
                         reference: Reference | None, generic: np.ndarray, min_rate: float,
                         lexicon_values: OutputLexicon | None = None) -> list[tuple[int, int, int, int]]:
    """(kept span number, index number, start, end) of every whole-word piece of `gap_pieces` around each kept span
    and Datanet holding it, MIN_GAP_PIECE tokens or more, whose tokens that are not generic carry `min_rate` nats
    of surprisal each on average (the floor's rate: a piece is too short to carry the floor itself)."""
    values = lexicon_values or OutputLexicon.of(token_ids, reference)
    reference, ids = values.reference, values.ids
    boundaries, delimiters = values.boundaries, values.delimiters
    in_spans = np.zeros((len(indexes), len(ids)), bool)  # each Datanet's kept spans: a piece adds only beyond them
    for candidate in kept:
        for number, _, _ in candidate.holders:
            in_spans[number, candidate.start:candidate.end] = True
    first: dict[tuple[int, int, int], int] = {}  # (index number, start, end) -> the first kept span reaching it
    codes: dict[int, list[int]] = {}
    stop = delimiters.tolist()
    for c, candidate in enumerate(kept):
        for number, lo, hi in candidate.holders:
            if number not in codes:
                codes[number] = values.codes(indexes[number]).tolist()
            for start, end in gap_pieces(codes[number], indexes[number], lo, hi, candidate.start, candidate.end, stop):
                for s, e in _pieces(start, end, boundaries, delimiters):
                    free = np.concatenate([[0], (~in_spans[number, s:e]).astype(np.int8), [0]])
                    edges = np.flatnonzero(np.diff(free))  # the runs outside the Datanet's kept spans
                    for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                        if b - a >= MIN_GAP_PIECE:
                            first.setdefault((number, s + a, s + b), c)
    found = [(c, number, s, e) for (number, s, e), c in first.items()]
    if not found:
        return []
    scored = span_log_probs(reference, ids, [(s, e) for _, _, s, e in found], lexicon_values=values)
    return [(c, number, s, e) for (c, number, s, e), log_probs in zip(found, scored, strict=True)
            if -float(log_probs[~generic[s:e]].sum()) >= min_rate * (e - s)]


def attribute_output(token_ids: Sequence[int], indexes: Sequence[SpanIndex], min_span: int = DEFAULT_MIN_SPAN,
                     min_weight_bps: int = 100, max_records_per_span: int = 8, max_records: int = 32,
                     max_occurrences: int = 256, reference: Reference | None = None, min_words: int = MIN_WORDS,
                     frequency_cap: int = FREQUENCY_CAP,
                     budget_per_token: float = SPAN_BUDGET_PER_TOKEN) -> SpanAttribution:
    """Attribute an output (token ids) to the Datanets behind `indexes`.

    Each matched token (inside a kept span or a piece continuing one across a changed
    word, not generic) is worth 1, split evenly among every Datanet holding a kept
    span (or such a piece) over it. Within a Datanet, the token's
    share goes to the records holding that Datanet's longest kept span over it,
    split evenly among them (an evenly spaced sample of `max_occurrences` when very
    many). Datanets whose share falls under `min_weight_bps` are dropped as noise
    and the rest renormalized.
    """
    length = len(token_ids)
    empty = SpanAttribution(AttributionVector(), (), (), (), 0, length)
    if length == 0 or not indexes:
        return empty
    values = OutputLexicon.of(token_ids, reference)  # computed once, read by every rule below
    kept, generic = select_spans(token_ids, indexes, values.reference, min_span, min_words, frequency_cap,
                                 budget_per_token, lexicon_values=values)
    if not kept:
        return dataclasses.replace(empty, generic_tokens=int(generic.sum()))
    extensions = near_verbatim_pieces(token_ids, kept, indexes, values.reference, generic, MIN_SURPRISAL / min_span,
                                      lexicon_values=values)
    holds = np.zeros((len(indexes), length), bool)
    longest = np.full((len(indexes), length), -1, np.int64)  # which kept span of each Datanet is longest over a token
    span_length = np.zeros((len(indexes), length), np.int64)
    for c, candidate in enumerate(kept):
        segment = slice(candidate.start, candidate.end)
        for number, _, _ in candidate.holders:
            holds[number, segment] = True
            longer = span_length[number, segment] < candidate.end - candidate.start
            longest[number, segment] = np.where(longer, c, longest[number, segment])
            span_length[number, segment] = np.maximum(span_length[number, segment], candidate.end - candidate.start)
    for c, number, start, end in extensions:  # only where no kept span of that Datanet lies: a span outranks a piece
        segment = slice(start, end)
        free = span_length[number, segment] == 0
        holds[number, segment] |= free
        longest[number, segment] = np.where(free, c, longest[number, segment])
        span_length[number, segment] = np.where(free, 1, span_length[number, segment])
    holds &= ~generic[None, :]
    sharing = holds.sum(axis=0)
    token_credit = np.where(sharing > 0, 1.0 / np.maximum(sharing, 1), 0.0)
    matched = int((sharing > 0).sum())
    datanet_credit = {indexes[d].datanet_id: float((holds[d] * token_credit).sum()) for d in range(len(indexes))}
    datanet_credit = {k: v for k, v in datanet_credit.items() if v > 0}
    total = sum(datanet_credit.values())
    kept_datanets = {k: v for k, v in datanet_credit.items() if total and v * TOTAL_BPS / total >= min_weight_bps}
    vector = AttributionVector.from_weights(to_basis_points(kept_datanets))
    kept_total = sum(kept_datanets.values())

    spans: list[MatchedSpan] = []
    record_credit: dict[tuple[str, str, str], float] = defaultdict(float)
    for c, candidate in enumerate(kept):
        for number, lo, hi in candidate.holders:
            index = indexes[number]
            if index.datanet_id not in kept_datanets:
                continue
            credited = holds[number] & (longest[number] == c)
            credit = float(token_credit[credited].sum()) / kept_total
            hit = SpanHit(candidate.start, candidate.end, lo, hi)
            records = index.records_of(hit, max_occurrences)
            for r in records:
                record_credit[(index.datanet_id, index.record_ids[r], index.contributors[r])] += credit / len(records)
            listed = tuple(RecordCredit(index.record_ids[r], index.contributors[r])
                           for r in records[:max_records_per_span])
            spans.append(MatchedSpan(candidate.start, candidate.end, index.datanet_id, hi - lo, listed))
            spans.extend(MatchedSpan(start, end, index.datanet_id, hi - lo, listed)
                         for kept_number, holder, start, end in extensions if (kept_number, holder) == (c, number))
    spans.sort(key=lambda s: (s.start, s.end, s.datanet_id))
    ranked = sorted(((k, w) for k, w in record_credit.items() if w > 0), key=lambda item: (-item[1], item[0]))
    records = tuple(RecordWeight(d, r, c, w) for (d, r, c), w in ranked[:max_records])
    by_contributor: dict[tuple[str, str], float] = defaultdict(float)
    for (d, _, c), w in record_credit.items():
        by_contributor[(d, c)] += w
    contributors = tuple((d, c, w) for (d, c), w in sorted(by_contributor.items(), key=lambda i: (-i[1], i[0])) if w > 0)
    return SpanAttribution(vector, tuple(spans), records, contributors, matched, length, int(generic.sum()),
                           sharing > 0)


# --- Datanet folders ------------------------------------------------------------------------------

INDEX_FILE = "span_index.lti"


def tokenize_records(texts: Sequence[str], tokenizer, batch_size: int = 512) -> list[list[int]]:
    """Token ids of each text with the base model's tokenizer, without special tokens."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        out.extend(tokenizer(list(texts[i:i + batch_size]), add_special_tokens=False)["input_ids"])
    return out


def build_datanet_index(folder: Path, tokenizer, out: Path | None = None) -> Path:
    """Tokenize a Datanet folder's records and write its span index (default `<folder>/span_index.lti`)."""
    from longtail.attribution.datanets import read_records, verify_datanet

    folder = Path(folder)
    manifest = verify_datanet(folder)
    records = read_records(folder)
    token_ids = tokenize_records([r.text for r in records], tokenizer)
    index = SpanIndex.build(manifest.datanet_id, (IndexedRecord(r.id, r.contributor, t)
                                                  for r, t in zip(records, token_ids, strict=True)),
                            tokenizer_fingerprint(tokenizer), manifest.records_root)
    path = Path(out) if out else folder / INDEX_FILE
    index.save(path)
    return path


def ensure_datanet_index(folder: Path, tokenizer) -> Path:
    """The folder's index, (re)built ahead of time when missing or bound to another tokenizer or records root."""
    try:
        load_datanet_index(folder, tokenizer_fingerprint(tokenizer))
    except SpanIndexError:
        build_datanet_index(folder, tokenizer)
    return Path(folder) / INDEX_FILE


def index_summary(index: SpanIndex) -> dict:
    """What `longtail datanet index` prints about an index."""
    return {"datanetId": index.datanet_id, "records": len(index.record_ids), "positions": index.size,
            "vocabulary": len(index.vocabulary), "tokenDtype": str(index.tokens.dtype),
            "tokenizerId": index.tokenizer_id, "recordsRoot": index.records_root,
            "bytesPerToken": round(index.nbytes / max(1, index.size - len(index.record_ids)), 2)}


def load_datanet_index(folder: Path, tokenizer_id: str | None = None) -> SpanIndex:
    """The index saved beside a Datanet, checked against its manifest's id and records root (and the tokenizer)."""
    from longtail.attribution.datanets import load_manifest

    manifest = load_manifest(Path(folder))
    return SpanIndex.load(Path(folder) / INDEX_FILE, manifest.datanet_id, tokenizer_id, manifest.records_root)


def spans_to_json(hits: Sequence[SpanHit]) -> str:
    return json.dumps([dataclasses.asdict(h) for h in hits])
