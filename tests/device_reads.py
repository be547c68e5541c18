"""Counting the Tensor calls that read device data back to the host (a sync on a GPU, the same call on a CPU)."""

from __future__ import annotations

import torch

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")


class DeviceReads:
    """Patches `names` on torch.Tensor (through `monkeypatch`) to count calls while `active` is True."""

    def __init__(self, monkeypatch, names: tuple[str, ...] = READS) -> None:
        self.counts = dict.fromkeys(names, 0)
        self.active = False
        for name in names:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    self.counts[_name] += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def total(self) -> int:
        return sum(self.counts.values())
