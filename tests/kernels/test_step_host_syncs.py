"""A step of the GPU configuration reads nothing back from the device between its inputs and its logits.

Run on a CPU with the GPU's choices made by hand (Triton LoRA kernels and paged attention under the
interpreter, no C kernels), where a device read is the same Python call as on a GPU: `Tensor.item`,
`.tolist`, `int(tensor)`, `float(tensor)`, `bool(tensor)`, `.cpu()`, `.numpy()`. Counted inside
`ModelRunner.run` (step inputs laid out, the forward); sampling's single transfer is counted in
tests/serving/test_sampling.py. The logits must equal the CPU path's.
"""

from __future__ import annotations

import pytest
import torch

from longtail.kernels import lora as lora_kernels
from longtail.kernels.lora import token_groups, token_groups_of
from longtail.serving.engine import Engine
from longtail.serving.sampling import SamplingParams

from device_reads import DeviceReads


def gpu_configured(engine: Engine) -> Engine:
    engine.model.cpu_attention = False  # the GPU has no C kernels: Triton paged attention instead
    engine.model.paged_kernels = True
    engine.model.packed = False
    return engine


@pytest.mark.parametrize("adapters", [0, 2])
def test_a_step_of_the_gpu_path_reads_nothing_back(tiny_llama, monkeypatch, adapters):
    monkeypatch.setenv("LONGTAIL_KERNELS", "triton")
    engine = gpu_configured(Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=2**20, block_size=4))
    ids = [engine.add_adapter(tiny_llama.adapter_dirs[name]) for name in ("r8-all", "r64-qko")][:adapters]
    reads = DeviceReads(monkeypatch)
    per_step: list[tuple[int, int]] = []  # (decode rows, reads) of each step
    run = engine.runner.run

    def counted_run(chunks):
        reads.active, before = True, reads.total()
        try:
            return run(chunks)
        finally:
            reads.active = False
            per_step.append((sum(c.is_decode for c in chunks), reads.total() - before))

    engine.runner.run = counted_run
    prompts = [[5, 9, 33, 2, 71, 12, 40], [7, 8, 9], [100, 3, 5, 7, 11, 13, 17, 19, 23, 29]]
    names = [ids[i % len(ids)] if ids else None for i in range(len(prompts))]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, names, params)
    assert all(o.finish_reason == "length" for o in outputs)
    assert any(rows for rows, _ in per_step), "no decode step ran"
    assert [count for _, count in per_step] == [0] * len(per_step), reads.counts

    cpu = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=2**20, block_size=4)
    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    cpu_ids = [cpu.add_adapter(tiny_llama.adapter_dirs[name]) for name in ("r8-all", "r64-qko")][:adapters]
    assert cpu_ids == ids
    expected = cpu.generate(prompts, names, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]


def test_host_groups_equal_the_device_grouping():
    slots = [2, 2, -1, 0, 3, 0, 0, -1, 3, 2]
    host = token_groups_of(slots)
    device = token_groups(torch.tensor(slots))
    assert [s for s, _ in host] == [s for s, _ in device]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(host, device, strict=True))
    assert host.ranges == device.ranges and host.token_count == device.token_count
    assert host.segments() is None  # slot 0's and 3's tokens are split
    contiguous = token_groups_of([1, 1, 1, -1, 0, 0])
    assert contiguous.segments() is not None and contiguous.longest_segment == 3
    assert lora_kernels.TokenGroups is type(contiguous)
