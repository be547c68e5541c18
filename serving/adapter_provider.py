"""How the engine gets adapters onto the device: a small protocol and the default, all-resident provider.

The engine never blocks on an adapter: a request whose adapter is not ready
waits in its queue while others run; `prefetch` starts the move, `poll` (called
once per step on the engine's thread) finishes it, `slot_of` says when it is
ready. The tiered store (`serving.adapter_tiers`) implements the same protocol
with disk, host and device tiers under byte budgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from longtail.serving.errors import AdapterInUse, UnknownAdapter
from longtail.serving.lora_slots import LoraSlots
from longtail.serving.peft_format import AdapterWeights, load_adapter


@runtime_checkable
class AdapterProvider(Protocol):
    def knows(self, adapter_id: str) -> bool: ...
    def prefetch(self, adapter_id: str) -> None: ...
    def slot_of(self, adapter_id: str) -> int | None: ...
    def pin(self, adapter_id: str) -> None: ...
    def unpin(self, adapter_id: str) -> None: ...
    def poll(self) -> None: ...


class ResidentAdapters:
    """Every added adapter lives on the device until removed (the simple default): add = parse + load now."""

    def __init__(self, slots: LoraSlots, max_rank: int = 256) -> None:
        self.slots = slots
        self.max_rank = max_rank
        self._pins: dict[str, int] = {}

    def add(self, path: Path | str) -> str:
        weights = load_adapter(path, self.slots.config.module_shapes(), max_rank=self.max_rank)
        return self.add_weights(weights)

    def add_weights(self, weights: AdapterWeights) -> str:
        self.slots.load(weights)
        return weights.adapter_id

    def remove(self, adapter_id: str) -> None:
        if adapter_id not in self.slots:
            raise UnknownAdapter(adapter_id)
        if self._pins.get(adapter_id):
            raise AdapterInUse(adapter_id, self._pins[adapter_id])
        self.slots.free(adapter_id)

    def knows(self, adapter_id: str) -> bool:
        return adapter_id in self.slots

    def prefetch(self, adapter_id: str) -> None:
        return None

    def slot_of(self, adapter_id: str) -> int | None:
        return self.slots.slot_of.get(adapter_id)

    def pin(self, adapter_id: str) -> None:
        self._pins[adapter_id] = self._pins.get(adapter_id, 0) + 1

    def unpin(self, adapter_id: str) -> None:
        self._pins[adapter_id] -= 1

    def poll(self) -> None:
        return None
