"""How the engine gets adapters onto the device: the protocol between the engine and its adapter tiers.

The engine never blocks on an adapter: a request whose adapter is not ready
waits in its queue while others run; `prefetch` starts the move, `poll` (called
once per step on the engine's thread) finishes it and reports what became
ready or failed, `slot_of` says when it is ready. `serving.adapter_tiers`
(`TieredAdapters`: device, host, disk and peers under byte budgets) is the one
implementation the engine builds; the protocol is what the engine relies on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol, runtime_checkable

from longtail.serving.adapter_metrics import AdapterMetrics


@dataclasses.dataclass(frozen=True)
class PollResult:
    """What changed in one `poll`: adapters that became usable and adapters whose load failed."""

    ready: tuple[str, ...] = ()
    failed: dict[str, Exception] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One stored adapter as GET /v1/adapters shows it (plain values: it crosses the engine process's pipe)."""

    adapter_id: str
    names: tuple[str, ...]
    tier: str               # "device", "host" or "disk": the fastest tier holding it now
    nbytes: int             # bytes of its factors in the engine's dtype (what the budgets count)
    file_bytes: int
    max_rank: int
    targets: tuple[str, ...]
    loads: int              # times it was brought to the device
    hits: int               # requests admitted while it was already on the device
    evictions: int          # times it left the device to make room
    tokens_served: int
    running: int            # requests using it now

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"names": list(self.names), "targets": list(self.targets)}


@runtime_checkable
class AdapterProvider(Protocol):
    metrics: AdapterMetrics

    def add(self, path: Path | str, name: str | None = None) -> str: ...
    def remove(self, name_or_id: str) -> str: ...
    def knows(self, adapter_id: str) -> bool: ...
    def prefetch(self, adapter_id: str) -> None: ...
    def slot_of(self, adapter_id: str) -> int | None: ...
    def pin(self, adapter_id: str) -> None: ...
    def unpin(self, adapter_id: str) -> None: ...
    def poll(self, demand: dict[str, int] | None = None) -> PollResult: ...
    def describe(self, tokens_served: dict[str, int]) -> list[AdapterInfo]: ...
    def close(self) -> None: ...
