"""How a node attributes one output to Datanets: the adapter's declared shares, refined by span matching.

Policy (docs/node.md): the receipt's vector is half the adapter's registry
shares and half the span-matching weights when the output matched any span of
the adapter's own Datanets; the registry shares alone otherwise. Half and half
keeps every Datanet that trained the adapter paid while letting verbatim
evidence move money toward the data the answer actually used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from longtail.attribution.receipts import AttributionVector, MatchedSpan
from longtail.attribution.spans import SpanIndex, attribute_output, load_datanet_index, to_basis_points
from longtail.node.catalog import CatalogEntry

SPAN_WEIGHT = 0.5


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


class Attributor:
    """Holds the span indexes of the Datanets this node's adapters were trained on."""

    def __init__(self, indexes: dict[str, SpanIndex] | None = None, min_span: int = 8) -> None:
        self.indexes = dict(indexes or {})
        self.min_span = min_span

    @classmethod
    def from_folders(cls, folders: Sequence[Path], min_span: int = 8) -> Attributor:
        indexes = {}
        for folder in folders:
            index = load_datanet_index(folder)
            indexes[index.datanet_id.lower()] = index
        return cls(indexes, min_span)

    def add_folders(self, folders: Sequence[Path]) -> None:
        for folder in folders:
            index = load_datanet_index(folder)
            self.indexes.setdefault(index.datanet_id.lower(), index)

    def attribute(self, entry: CatalogEntry, output_token_ids: Sequence[int]) -> Attribution:
        if not entry.datanets:
            return Attribution(AttributionVector(), (), 0)
        registry = {d.datanet_id: d.share_bps / 10_000 for d in entry.datanets}
        indexes = [self.indexes[d] for d in registry if d in self.indexes]
        matched = attribute_output(list(output_token_ids), indexes, self.min_span) if indexes else None
        if matched is None or not matched.vector.datanet_ids:
            return Attribution(AttributionVector.from_weights(to_basis_points(registry)), (), 0)
        span_weights = dict(zip(matched.vector.datanet_ids, (w / 10_000 for w in matched.vector.weights_bps),
                                strict=True))
        blended = {d: (1 - SPAN_WEIGHT) * share + SPAN_WEIGHT * span_weights.get(d, 0.0)
                   for d, share in registry.items()}
        return Attribution(AttributionVector.from_weights(to_basis_points(blended)), matched.spans,
                           matched.matched_tokens)
