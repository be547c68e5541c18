"""The CPU engine's fast path (packed weights: our GEMM's panels in fp32, oneDNN's layout in bf16; C RoPE/cache
write and paged decode attention) against the plain torch path, and the bf16 option against fp32, in one mixed
batch with chunked prompts."""

from __future__ import annotations

import pytest
import torch

from longtail.kernels import gemm_cpu, linear_cpu
from longtail.kernels.attention_cpu import available
from longtail.serving.engine import Engine
from longtail.serving.model import weight_format
from longtail.serving.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the CPU attention kernel cannot be built")


def run(kit, monkeypatch, fast: bool, dtype=torch.float32):
    monkeypatch.setenv("LONGTAIL_PACKED_WEIGHTS", "1" if fast else "0")
    # max_batch_tokens 8 splits the longer prompts into chunks: prefill with context, then decode.
    engine = Engine.from_pretrained(kit.base_dir, dtype=dtype, kv_cache_bytes=8 * 2**20, max_batch_tokens=24,
                                    min_prefill_chunk=8)
    # bf16 packing needs oneDNN's AVX-512 bf16 path; on an AVX2-only CPU bf16 weights stay plain (and must work).
    assert engine.model.weight_format == weight_format(torch.device("cpu"), dtype)
    assert engine.model.packed == (fast and engine.model.weight_format != "plain")
    if dtype == torch.float32 and fast and gemm_cpu.available():
        assert engine.model.weight_format == "panels"
    if dtype == torch.bfloat16 and fast:
        assert engine.model.packed == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        # oneDNN's packed bf16 takes every row count; our small-row kernel only serves plain bf16 weights (an
        # AVX2-only CPU, where oneDNN has no bf16 path), from 2 rows
        assert engine.model.small_linear_from == (2 if not engine.model.packed and linear_cpu.available() else 0)
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


def test_fp32_weights_are_packed_once_into_panels(sharp_llama, monkeypatch):
    """fp32 on a CPU keeps one copy of each projection, in our GEMM's panels (the plain tensors are not kept);
    without the C kernels the weights are oneDNN-packed or plain, never both."""
    monkeypatch.delenv("LONGTAIL_PACKED_WEIGHTS", raising=False)
    model = Engine.from_pretrained(sharp_llama.base_dir, dtype=torch.float32, kv_cache_bytes=8 * 2**20).model
    if gemm_cpu.available():
        assert model.weight_format == "panels" and model.small_linear_from == 0
        layer = model.layers[0]
        assert all(isinstance(w, gemm_cpu.PackedWeight) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        assert isinstance(model.lm_head, gemm_cpu.PackedWeight) and not isinstance(model.embed, gemm_cpu.PackedWeight)
    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    model = Engine.from_pretrained(sharp_llama.base_dir, dtype=torch.float32, kv_cache_bytes=8 * 2**20).model
    assert model.weight_format in ("onednn", "plain") and model.small_linear_from == 0
    assert model.layers[0].qkv.is_mkldnn == (model.weight_format == "onednn")
