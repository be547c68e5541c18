"""The engine gives the same tokens through the Triton kernels (interpreted on CPU) as through torch."""

from __future__ import annotations

from longtail.serving.engine import Engine
from longtail.serving.sampling import SamplingParams


def test_engine_tokens_equal_with_triton_kernels(tiny_llama, monkeypatch):
    engine = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=4 * 2**20)
    ids = [engine.add_adapter(tiny_llama.adapter_dirs[name]) for name in ("r4-attn", "r16-mlp-rslora")]
    prompts, adapters = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [ids[0], ids[1], None]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    reference = [o.token_ids for o in engine.generate(prompts, adapters, params)]
    monkeypatch.setenv("LONGTAIL_KERNELS", "triton")
    assert [o.token_ids for o in engine.generate(prompts, adapters, params)] == reference
