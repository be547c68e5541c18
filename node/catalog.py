"""What a node serves: the base model and its adapters, by name and by id, with prices and Datanet shares.

The Datanet shares come from the adapter's own safetensors metadata
(`longtail.datanets`, written by `longtail train`), which is inside the bytes
the adapterId hashes, so the shares a receipt uses are bound to the adapter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from longtail.node.errors import UnknownModel

ZERO_ID = "0x" + "00" * 32
DATANETS_METADATA_KEY = "longtail.datanets"


@dataclasses.dataclass(frozen=True)
class DatanetShare:
    datanet_id: str
    name: str
    share_bps: int


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One servable model: an adapter, or the base model itself (adapter_id None)."""

    name: str
    adapter_id: str | None
    price_per_1k_tokens: int
    datanets: tuple[DatanetShare, ...] = ()
    path: Path | None = None

    @property
    def receipt_adapter_id(self) -> str:
        return self.adapter_id or ZERO_ID

    def to_json(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "owned_by": "longtail",
            "adapter_id": self.adapter_id,
            "price_per_1k_tokens": str(self.price_per_1k_tokens),
            "datanets": [dataclasses.asdict(d) for d in self.datanets],
        }


def read_datanet_shares(adapter_dir: Path) -> tuple[DatanetShare, ...]:
    """The `longtail.datanets` metadata of an adapter's safetensors file; empty when absent."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    raw = metadata.get(DATANETS_METADATA_KEY)
    if not raw:
        return ()
    shares = tuple(DatanetShare(str(d["datanet_id"]).lower(), str(d.get("name", "")), int(d["share_bps"]))
                   for d in json.loads(raw))
    if sum(s.share_bps for s in shares) != 10_000:
        raise ValueError(f"{path}: Datanet shares sum to {sum(s.share_bps for s in shares)}, not 10000")
    return shares


class Catalog:
    """Resolves the `model` field of a request to a catalog entry."""

    def __init__(self, base: CatalogEntry) -> None:
        self.base = base
        self._by_key: dict[str, CatalogEntry] = {base.name.lower(): base}
        self._entries: list[CatalogEntry] = [base]

    def add(self, entry: CatalogEntry) -> None:
        self._entries = [e for e in self._entries if e.adapter_id != entry.adapter_id or e.adapter_id is None]
        self._entries.append(entry)
        self._by_key[entry.name.lower()] = entry
        if entry.adapter_id:
            self._by_key[entry.adapter_id.lower()] = entry

    def remove(self, adapter_id: str) -> CatalogEntry | None:
        """Stop serving an adapter: its name and id resolve no more (the base model cannot be removed)."""
        entry = self._by_key.get(adapter_id.lower())
        if entry is None or entry.adapter_id is None:
            return None
        self._entries = [e for e in self._entries if e.adapter_id != entry.adapter_id]
        self._by_key = {key: e for key, e in self._by_key.items() if e.adapter_id != entry.adapter_id}
        return entry

    def resolve(self, model: str) -> CatalogEntry:
        entry = self._by_key.get(model.lower())
        if entry is None:
            raise UnknownModel(f"no model or adapter {model!r} on this node", param="model",
                               available=[e.name for e in self._entries])
        return entry

    def by_adapter_id(self, adapter_id: str) -> CatalogEntry | None:
        return self._by_key.get(adapter_id.lower())

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries)
