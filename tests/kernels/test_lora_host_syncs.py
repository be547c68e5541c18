"""The Triton LoRA path reads nothing back from the device when the step's groups are known on the host.

Counted on a CPU (the interpreter), where a device read is the same Python call as on a GPU:
`Tensor.item`, `Tensor.tolist` and `int(tensor)` inside `add_lora`.
"""

from __future__ import annotations

import pytest
import torch

from longtail.kernels.lora import add_lora, lora_expand_ref, lora_shrink_ref, token_groups

from device_reads import DeviceReads


def test_sgmv_prefill_with_groups_reads_nothing_back(monkeypatch):
    monkeypatch.setenv("LONGTAIL_KERNELS", "triton")
    generator = torch.Generator().manual_seed(3)
    hidden, width, ranks = 24, 20, [8, 16, 4]
    offsets = torch.tensor([0, 8, 24])
    a_rows = torch.randn(28, hidden, generator=generator)
    b_rows = torch.randn(28, width, generator=generator)
    scales = torch.tensor([0.5, 1.0, 2.0])
    slots = torch.tensor([0] * 40 + [-1] * 10 + [2] * 30 + [1] * 16)  # 96 tokens in long runs: SGMV
    x = torch.randn(slots.shape[0], hidden, generator=generator)
    groups = token_groups(slots)  # the engine does this once per step, outside the layers
    out = torch.zeros(slots.shape[0], width)
    reads = DeviceReads(monkeypatch, ("item", "tolist", "__int__"))
    reads.active = True
    add_lora(out, x, a_rows, b_rows, slots, offsets, torch.tensor(ranks), scales, 16, groups=groups)
    reads.active = False
    counts = reads.counts
    assert counts == {"item": 0, "tolist": 0, "__int__": 0}
    assert groups.longest_segment == 40
    expected = torch.zeros_like(out)
    shrunk = lora_shrink_ref(x, a_rows, slots, offsets, torch.tensor(ranks), 16)
    lora_expand_ref(expected, shrunk, b_rows, slots, offsets, torch.tensor(ranks), scales)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_without_groups_the_launcher_still_sizes_itself(monkeypatch):
    """The fallback (no host knowledge) reads the longest segment once per launch, as before."""
    monkeypatch.setenv("LONGTAIL_KERNELS", "triton")
    from longtail.kernels.lora import LoraShapeError, segments_from_token_slots
    from longtail.kernels.lora_triton import lora_shrink_sgmv_triton

    slots = torch.tensor([0] * 5 + [1] * 70)
    starts, seg_slots = segments_from_token_slots(slots)
    x, a_rows = torch.randn(75, 8), torch.randn(8, 8)
    offsets, ranks = torch.tensor([0, 4]), torch.tensor([4, 4])
    full = lora_shrink_sgmv_triton(x, a_rows, starts, seg_slots, offsets, ranks, 4)
    given = lora_shrink_sgmv_triton(x, a_rows, starts, seg_slots, offsets, ranks, 4, longest=70)
    torch.testing.assert_close(full, given)
    with pytest.raises(LoraShapeError):
        lora_shrink_sgmv_triton(x, a_rows, starts, seg_slots, offsets, ranks, 4, longest=76)
