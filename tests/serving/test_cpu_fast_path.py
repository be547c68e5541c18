"""The CPU engine's fast path (oneDNN-packed weights, C RoPE/cache write and paged decode attention) against
the plain torch path, and the bf16 option against fp32, in one mixed batch with chunked prompts."""

from __future__ import annotations

import pytest
import torch

from longtail.kernels.attention_cpu import available
from longtail.serving.engine import Engine
from longtail.serving.model import amx_available, packing_available
from longtail.serving.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the CPU attention kernel cannot be built")


def run(kit, monkeypatch, fast: bool, dtype=torch.float32):
    monkeypatch.setenv("LONGTAIL_PACKED_WEIGHTS", "1" if fast else "0")
    # max_batch_tokens 8 splits the longer prompts into chunks: prefill with context, then decode.
    engine = Engine.from_pretrained(kit.base_dir, dtype=dtype, kv_cache_bytes=8 * 2**20, max_batch_tokens=24,
                                    min_prefill_chunk=8)
    # bf16 packing needs oneDNN's AVX-512 bf16 path; on an AVX2-only CPU bf16 weights stay plain (and must work).
    assert engine.model.packed == (fast and packing_available(torch.device("cpu"), dtype))
    if dtype == torch.bfloat16:
        assert engine.model.packed == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        # with AMX every bf16 matmul goes to oneDNN; without it our kernel takes 2-32 rows
        assert engine.model.small_linear_from in ((0,) if engine.model.packed and amx_available() else (0, 2))
    engine.model.cpu_attention = fast and engine.model.cpu_attention
    ids = {name: engine.add_adapter(path) for name, path in kit.adapter_dirs.items()}
    generator = torch.Generator().manual_seed(5)
    names = [*kit.adapter_dirs, None, None]
    prompts = [torch.randint(3, 384, (length,), generator=generator).tolist() for length in (5, 19, 3, 30, 8, 1)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
    return engine.generate(prompts, [ids[n] if n else None for n in names], params)


def test_fast_path_equals_the_torch_path(sharp_llama, monkeypatch):
    plain = run(sharp_llama, monkeypatch, fast=False)
    fast = run(sharp_llama, monkeypatch, fast=True)
    for a, b in zip(plain, fast, strict=True):
        assert a.finish_reason == b.finish_reason == "length"
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)


def test_bf16_option_stays_near_fp32(sharp_llama, monkeypatch):
    from longtail.kernels import lora_cpu
    from longtail.serving import model

    fp32 = run(sharp_llama, monkeypatch, fast=True)
    served = []
    kernel = model.add_lora_runs_native
    monkeypatch.setattr(model, "add_lora_runs_native", lambda out, *rest: served.append(out.dtype) or kernel(out, *rest))
    bf16 = run(sharp_llama, monkeypatch, fast=True, dtype=torch.bfloat16)
    # the adapters' decode runs went through the C LoRA kernel in bf16 (not torch's per-run matmuls)
    assert set(served) == ({torch.bfloat16} if lora_cpu.native_available() else set())
    first = torch.tensor([o.logprobs[0] for o in fp32])
    first_bf16 = torch.tensor([o.logprobs[0] for o in bf16])
    # bf16 keeps 8 bits of mantissa: the first token's log-probability moves by a few hundredths, not more.
    torch.testing.assert_close(first_bf16, first, atol=0.15, rtol=0)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 20 for o in bf16)


def test_packed_copies_take_the_large_matmuls_and_the_plain_weights_stay(sharp_llama, monkeypatch):
    """With the small-row C kernel on, packing adds copies for more than `MAX_ROWS` rows and keeps the plain
    weights it reads; without the kernel the packed copies replace them (one copy of the weights)."""
    from longtail.kernels import linear_cpu

    monkeypatch.setenv("LONGTAIL_PACKED_WEIGHTS", "1")
    model = Engine.from_pretrained(sharp_llama.base_dir, dtype=torch.float32, kv_cache_bytes=8 * 2**20).model
    assert model.packed and model.small_linear_from == (1 if linear_cpu.available() else 0)
    if model.small_linear_from:
        assert not model.layers[0].qkv.is_mkldnn
        assert len(model._packed) == 4 * len(model.layers) + 1
        assert all(w.is_mkldnn for w in model._packed.values())
    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    model = Engine.from_pretrained(sharp_llama.base_dir, dtype=torch.float32, kv_cache_bytes=8 * 2**20).model
    assert model.small_linear_from == 0 and model.layers[0].qkv.is_mkldnn and not model._packed
