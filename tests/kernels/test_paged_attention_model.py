"""The model's CUDA attention wiring (`LlamaModel.paged_kernels`) run on a CPU under the Triton interpreter.

The flag is set by hand here (on a GPU it is on by default): the same steps through the paged
kernels and through the gather + SDPA path give the same logits, for whole prompts, later prompt
chunks and decode rows in one batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from longtail.kernels import paged_attention
from longtail.serving.kv_cache import PagedKVCache
from longtail.serving.lora_slots import LoraSlots
from longtail.serving.model import LlamaModel
from longtail.serving.model_runner import ModelRunner, SequenceChunk


def steps(model: LlamaModel, paged: bool, block_size: int) -> list[torch.Tensor]:
    model.cpu_attention = False  # the C kernel would take the decode rows before either path
    model.paged_kernels = paged
    model._extend_meta = None
    cache = PagedKVCache(model.config, 2**20, block_size=block_size, dtype=model.dtype)
    runner = ModelRunner(model, cache, LoraSlots(model.config, dtype=model.dtype))
    generator = random.Random(11)
    blocks = {name: cache.pool.allocate(cache.blocks_for(40)) for name in "abc"}
    for table in blocks.values():
        generator.shuffle(table)
    prompt = {name: [generator.randrange(3, 384) for _ in range(30)] for name in "abc"}
    first = [SequenceChunk(prompt["a"][:21], 0, blocks["a"]),
             SequenceChunk(prompt["b"][:10], 0, blocks["b"], logits_from=0)]
    second = [SequenceChunk([prompt["a"][21]], 21, blocks["a"]),                     # a decode row
              SequenceChunk(prompt["b"][10:17], 10, blocks["b"], logits_from=0),   # a later chunk
              SequenceChunk(prompt["c"][:5], 0, blocks["c"], logits_from=2)]       # a whole prompt
    third = [SequenceChunk([prompt["c"][5]], 5, blocks["c"]), SequenceChunk([prompt["b"][17]], 17, blocks["b"]),
             SequenceChunk([prompt["a"][22]], 22, blocks["a"])]
    return [runner.run(chunks) for chunks in (first, second, third)]


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_kernels_match_the_sdpa_path(tiny_llama, monkeypatch, block_size):
    model = LlamaModel.from_pretrained(tiny_llama.base_dir, dtype=torch.float32)
    calls = {"decode": 0, "extend": 0}
    for name, kind in (("paged_decode_attention_triton", "decode"), ("paged_extend_attention_triton", "extend")):
        original = getattr(paged_attention, name)

        def counted(*args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(paged_attention, name, counted)
    expected = steps(model, paged=False, block_size=block_size)
    assert calls == {"decode": 0, "extend": 0}
    got = steps(model, paged=True, block_size=block_size)
    layers = model.config.num_layers
    # Steps 1 and 2 have prefill segments, steps 2 and 3 decode rows: one launch per layer each.
    assert calls == {"decode": 2 * layers, "extend": 2 * layers}
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)
