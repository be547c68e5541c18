"""How a node attributes one output to Datanets: the adapter's prior, moved by span evidence as far as it reaches.

Rule (docs/attribution.md, "Payment weight"), all in integers so an auditor
recomputes it from the receipt body's `attribution.evidence`:

- prior: the adapter's registry shares in basis points; when the adapter has a
  data credit for every Datanet it declares and some gain is positive, the
  shares weighted by each Datanet's held-out gain (micro-nats per token,
  negative counted as 0), rounded to basis points by largest remainder;
- span vector: `attribute_output`'s weights over the matched tokens;
- span weight λ = floor(10000 · matchedTokens / outputTokens) basis points: the
  fraction of the output that verbatim evidence covers. No match moves nothing;
  a few chance-matched tokens move a few basis points;
- weights: largest remainder of prior·(10000 − λ) + span·λ over 10000², ties by
  ascending id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from longtail.attribution.adapter_credit import (
    DataCredit,
    DataCreditStore,
    held_out_token_ids,
    score_adapter_async,
)
from longtail.attribution.receipts import TOTAL_BPS, AttributionVector, MatchedSpan
from longtail.attribution.spans import (
    DEFAULT_MIN_SPAN,
    Reference,
    SpanIndex,
    attribute_output,
    ensure_reference,
    load_datanet_index,
    tokenizer_fingerprint,
)
from longtail.node.catalog import CatalogEntry

EVIDENCE_RULE = "longtail-attribution-2"
log = logging.getLogger("longtail.node")


@dataclasses.dataclass(frozen=True)
class Attribution:
    vector: AttributionVector
    spans: tuple[MatchedSpan, ...]
    matched_tokens: int

    @property
    def top_datanet(self) -> str | None:
        if not self.vector.datanet_ids:
            return None
        return max(zip(self.vector.weights_bps, self.vector.datanet_ids, strict=True))[1]


def largest_remainder(numerators: dict[str, int]) -> dict[str, int]:
    """Non-negative integers rescaled to basis points summing to exactly 10000: floors of 10000·n/total, then one
    more to the largest remainders, ties to the smaller id."""
    total = sum(numerators.values())
    if total <= 0:
        return {}
    scaled = {k: v * TOTAL_BPS for k, v in numerators.items()}
    floors = {k: v // total for k, v in scaled.items()}
    short = TOTAL_BPS - sum(floors.values())
    for key in sorted(scaled, key=lambda k: (-(scaled[k] % total), k))[:short]:
        floors[key] += 1
    return {k: v for k, v in floors.items() if v > 0}


def span_weight_bps(matched_tokens: int, output_tokens: int) -> int:
    return matched_tokens * TOTAL_BPS // output_tokens if output_tokens > 0 else 0


def prior_bps(registry_bps: dict[str, int], gains_micro: dict[str, int] | None) -> dict[str, int]:
    """Registry shares, weighted by held-out gain when every Datanet has one and some gain is positive."""
    if not gains_micro or any(d not in gains_micro for d in registry_bps):
        return dict(registry_bps)
    weighted = {d: share * max(0, gains_micro[d]) for d, share in registry_bps.items()}
    return largest_remainder(weighted) if sum(weighted.values()) > 0 else dict(registry_bps)


def blend(prior: dict[str, int], span: dict[str, int], weight_bps: int) -> dict[str, int]:
    keys = set(prior) | set(span)
    return largest_remainder({k: prior.get(k, 0) * (TOTAL_BPS - weight_bps) + span.get(k, 0) * weight_bps
                              for k in keys})


class Attributor:
    """Holds the span indexes of the Datanets this node's adapters were trained on, the reference corpus, and the
    adapters' data credits."""

    def __init__(self, indexes: dict[str, SpanIndex] | None = None, min_span: int = DEFAULT_MIN_SPAN,
                 reference: Reference | None = None, data_credits: dict[str, DataCredit] | None = None) -> None:
        self.indexes = dict(indexes or {})
        self.min_span = min_span
        self.reference = reference
        self.data_credits = dict(data_credits or {})
        self.folders: dict[str, Path] = {}
        self.credit_store: DataCreditStore | None = None
        self._tokenizer = None
        self._tokenizer_id: str | None = None
        self._reference_folder: Path | None = None
        self._scoring: dict[str, asyncio.Task] = {}
        self.score_data = True  # whether start_data_credit scores adapters (the node's adapter_credit setting)

    @classmethod
    def from_folders(cls, folders: Sequence[Path], min_span: int = DEFAULT_MIN_SPAN,
                     reference: Reference | None = None, tokenizer_id: str | None = None) -> Attributor:
        attributor = cls({}, min_span, reference)
        attributor.add_folders(folders, tokenizer_id)
        return attributor

    @classmethod
    def for_node(cls, folders: Sequence[Path], tokenizer, home: Path, score_data: bool = True,
                 reference_home: Path | None = None) -> Attributor:
        """Blocking (run it in a worker thread at start): indexes checked against the tokenizer, the reference
        corpus built once per tokenizer under `$LONGTAIL_HOME/reference` (shared by the nodes of one machine) when
        some Datanet is indexed, data credits in `$LONGTAIL_HOME/data_credit` (`home/data_credit` when
        `reference_home` is given, as tests do)."""
        from longtail.serving.base_models import longtail_home

        attributor = cls()
        attributor._tokenizer = tokenizer
        attributor._tokenizer_id = tokenizer_fingerprint(tokenizer)
        attributor._reference_folder = Path(reference_home or longtail_home() / "reference") / \
            attributor._tokenizer_id.split(":")[-1]
        # Keyed by adapter id (a content hash) and Datanet id (which binds the records root): a pure function of
        # those and the base model, so shared by the machine's nodes and kept across restarts.
        attributor.credit_store = DataCreditStore((longtail_home() if reference_home is None else Path(home))
                                                  / "data_credit")
        attributor.score_data = score_data
        attributor.add_folders(folders)
        return attributor

    def add_folders(self, folders: Sequence[Path], tokenizer_id: str | None = None) -> None:
        """Map each folder's index (checked against its manifest, and the tokenizer when known): blocking, call it
        from a worker thread."""
        folders = list(folders)
        if folders and self.reference is None and self._tokenizer is not None:
            self.reference = ensure_reference(self._reference_folder, self._tokenizer)
        for folder in folders:
            index = load_datanet_index(folder, tokenizer_id or self._tokenizer_id)
            self.indexes.setdefault(index.datanet_id.lower(), index)
            self.folders.setdefault(index.datanet_id.lower(), Path(folder))

    def set_data_credit(self, credit: DataCredit) -> None:
        self.data_credits[credit.adapter_id.lower()] = credit

    def start_data_credit(self, entry: CatalogEntry, engine) -> None:
        """Score the adapter's data credit once, in the background (the first serve); a stored one is reused."""
        adapter_id = (entry.adapter_id or "").lower()
        if not self.score_data or not adapter_id or not entry.datanets or adapter_id in self.data_credits \
                or adapter_id in self._scoring:
            return
        task = asyncio.create_task(self.ensure_data_credit(entry, engine), name=f"data-credit-{adapter_id[:10]}")
        self._scoring[adapter_id] = task
        task.add_done_callback(lambda _: self._scoring.pop(adapter_id, None))

    async def ensure_data_credit(self, entry: CatalogEntry, engine) -> DataCredit | None:
        """The adapter's held-out gain per Datanet: stored, or scored now through `engine.score` (background work)."""
        adapter_id = (entry.adapter_id or "").lower()
        try:
            stored = await asyncio.to_thread(self.credit_store.get, adapter_id) if self.credit_store else None
            if stored is not None and set(stored.gains) >= {d.datanet_id.lower() for d in entry.datanets}:
                self.set_data_credit(stored)
                return stored
            missing = [d.datanet_id for d in entry.datanets if d.datanet_id.lower() not in self.folders]
            if missing or self._tokenizer is None:
                log.info("data credit of adapter %s not scored: no local copy of Datanets %s", adapter_id, missing)
                return None
            held_out = {d.datanet_id.lower(): await asyncio.to_thread(
                held_out_token_ids, self.folders[d.datanet_id.lower()], d.datanet_id, self._tokenizer)
                for d in entry.datanets}

            async def score(prompt, output, adapter):
                return await engine.score(prompt, output, adapter, client="data-credit", background=True)

            credit = await score_adapter_async(score, adapter_id, held_out)
            if self.credit_store is not None:
                await asyncio.to_thread(self.credit_store.put, credit)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # credit refines the prior; without it the registry shares are used
            log.warning("data credit of adapter %s failed: %s", adapter_id, error)
            return None
        self.set_data_credit(credit)
        log.info("data credit of adapter %s: %s", adapter_id, credit.gains_micro())
        return credit

    async def close(self) -> None:
        """Cancel scorings still running (at shutdown, before the engine stops): the next start scores them."""
        tasks = list(self._scoring.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def searches(self, entry: CatalogEntry) -> bool:
        """Whether attributing an answer of this entry searches an index (work worth a worker thread)."""
        return any(d.datanet_id.lower() in self.indexes for d in entry.datanets)

    def attribute(self, entry: CatalogEntry, output_token_ids: Sequence[int]) -> Attribution:
        """Blocking (span search, ~1-5 ms): the node calls `attribute_async`, which runs it in a worker thread."""
        if not entry.datanets:
            return Attribution(AttributionVector(), (), 0)
        registry = {d.datanet_id.lower(): d.share_bps for d in entry.datanets}
        credit = self.data_credits.get((entry.adapter_id or "").lower())
        gains = credit.gains_micro() if credit else None
        prior = prior_bps(registry, gains)
        indexes = [self.indexes[d] for d in registry if d in self.indexes]
        output_tokens = len(output_token_ids)
        matched = attribute_output(list(output_token_ids), indexes, self.min_span, reference=self.reference) \
            if indexes else None
        span = dict(zip(matched.vector.datanet_ids, matched.vector.weights_bps, strict=True)) if matched else {}
        matched_tokens = matched.matched_tokens if matched and span else 0
        weight = span_weight_bps(matched_tokens, output_tokens)
        weights = blend(prior, span, weight) if weight else dict(prior)
        evidence = {
            "rule": EVIDENCE_RULE, "outputTokens": output_tokens, "matchedTokens": matched_tokens,
            "spanWeightBps": weight, "registryBps": registry, "dataGainMicroNatsPerToken": gains,
            "priorBps": prior, "spanBps": span,
        }
        spans = tuple(s for s in (matched.spans if matched and weight else ()) if weights.get(s.datanet_id, 0) > 0)
        return Attribution(AttributionVector.from_weights(weights, evidence), spans, matched_tokens)

    async def attribute_async(self, entry: CatalogEntry, output_token_ids: Sequence[int]) -> Attribution:
        return await asyncio.to_thread(self.attribute, entry, list(output_token_ids))


def recompute_weights(evidence: dict) -> dict[str, int]:
    """What an auditor does with a receipt body's `attribution.evidence`: the weights the rule gives."""
    if evidence.get("rule") != EVIDENCE_RULE:
        raise ValueError(f"unknown attribution rule {evidence.get('rule')!r}")
    registry = {k: int(v) for k, v in evidence["registryBps"].items()}
    gains = evidence.get("dataGainMicroNatsPerToken")
    prior = prior_bps(registry, {k: int(v) for k, v in gains.items()} if gains else None)
    weight = span_weight_bps(int(evidence["matchedTokens"]), int(evidence["outputTokens"]))
    if prior != {k: int(v) for k, v in evidence["priorBps"].items()} or weight != int(evidence["spanWeightBps"]):
        raise ValueError("the evidence's prior or span weight does not follow from its inputs")
    span = {k: int(v) for k, v in evidence["spanBps"].items()}
    return blend(prior, span, weight) if weight else prior
