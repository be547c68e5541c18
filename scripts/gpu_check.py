"""One-shot GPU check: every kernel against its reference, the engine's correctness, and its decode speed.

Self-contained for a device machine's preinstalled Python (torch, triton; nothing installed, no
network, no base model): the models are random weights in the shapes of Llama-3.1-8B and
Llama-3.2-1B, in bf16. Sections, each a child process with its own time limit, so a crash, a
hang or an illegal memory access in one still leaves the others:

  device       name, versions, the measured device-to-device copy bandwidth (the roofline's bytes/s);
  kernels      the LoRA kernels (BGMV/SGMV, shrink/expand, add_lora) and the paged-attention kernels
               (decode, extend; fp32/bf16/fp16) against their torch references at serving shapes,
               plus paged decode attention timed against the gather + SDPA path it replaced;
  engine       a small random model: logits with the paged kernels equal the gather + SDPA path,
               the Triton LoRA path equals the torch one, and (when transformers and peft are
               importable) the engine's greedy steps equal HF + PEFT;
  decode-8b,   the engine's decode step (`ModelRunner.run` + greedy argmax) at batch 1/32/128 with
  decode-1b    0/1/32/128 distinct rank-16 adapters on all seven projections, each row's context
               `--context` tokens: ms per step, tokens/s, the HBM roofline (weight + KV + adapter
               bytes read per step ÷ measured copy bandwidth) and the LoRA overhead against none;
  pytest-gpu   `pytest -m gpu tests/kernels`, when pytest and hypothesis are importable.

Writes `$OUT/gpu_check.json` (every figure) and `$OUT/gpu_check.md` (the tables), each section's
log under `$OUT/logs/`; prints a summary of at most 40 lines. The whole run stays under
`--budget-seconds` (default 450). `--dry-run` runs every section on a CPU with tiny shapes and
the Triton interpreter (the fast test `tests/kernels/test_gpu_check_dry_run.py`), so the script
cannot rot between GPU loans.

    scripts/gpu_check.sh                      # on the device machine; results in $OUT
    python scripts/gpu_check.py --dry-run --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # The dry run's stand-in for both: every code path, seconds on a CPU under the interpreter.
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True, rope_theta=10000.0,
                 max_position_embeddings=4096, rms_norm_eps=1e-5),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
# Vendor peak memory bandwidth in bytes/s, for reference beside the measured copy; first substring wins.
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12),
                  ("GH200", 4.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB", 1.935e12), ("A100", 1.555e12),
                  ("L40S", 0.864e12), ("L40", 0.864e12), ("A10G", 0.6e12), ("L4", 0.3e12))
# Targets from issue 25 (H200, 8B shape).
TARGET_ROOFLINE = 0.50
TARGET_LORA_OVERHEAD = 0.15
TARGET_SINGLE_STREAM = 100.0
# Section name -> seconds; the order is the run order (the most informative first after the cheap ones).
SECTIONS = {"device": 40, "kernels": 100, "engine": 70, "decode-8b": 150, "decode-1b": 80, "pytest-gpu": 70}


# --------------------------------------------------------------------------------------------------
# Helpers shared by the sections (run inside the child processes).


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall ms of fn() with the device synchronised around each call (what a step costs the engine)."""
    for _ in range(warmup):
        fn()
    _sync()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(dry_run: bool) -> float:
    """Achieved bytes/s of a device-to-device copy (read + write): the practical ceiling of HBM traffic."""
    import torch

    device = _device()
    elements = 2**20 if dry_run else 2**29  # 1 GiB of bf16 on a GPU: far past L2
    source = torch.empty(elements, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    ms = _time_ms(lambda: target.copy_(source), repeats=3 if dry_run else 20)
    return 2 * source.numel() * source.element_size() / (ms / 1e3)


def peak_bandwidth(name: str) -> float | None:
    return next((value for key, value in PEAK_BANDWIDTH if key in name), None)


def _max_error(got, expected) -> float:
    return float((got.float() - expected.float()).abs().max()) if got.numel() else 0.0


def _check(results: list, name: str, got, expected, atol: float, rtol: float) -> None:
    import torch

    error = _max_error(got, expected)
    ok = bool(torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol)) and bool(torch.isfinite(got).all())
    results.append({"check": name, "max_abs_error": error, "atol": atol, "ok": ok})


# --------------------------------------------------------------------------------------------------
# Sections.


def section_device(args) -> dict:
    import torch
    import triton

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
    copy = copy_bandwidth(args.dry_run)
    peak = peak_bandwidth(name)
    free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
    return {"name": name, "torch": torch.__version__, "triton": triton.__version__,
            "python": sys.version.split()[0], "copy_bandwidth": copy, "peak_bandwidth": peak,
            "memory_free": free, "memory_total": total}


def _paged_case(lengths, heads, kv_heads, head_dim, block_size, dtype, device, seed):
    """A shuffled paged cache holding `lengths` positions per row, and the rows' block tables."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    blocks = sum(needed) + 2
    keys = torch.randn(blocks * block_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    values = torch.randn(blocks * block_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    order = torch.randperm(blocks, generator=generator).tolist()
    width = max(needed)
    tables = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, count in enumerate(needed):
        tables[row, :count] = torch.tensor([order.pop() for _ in range(count)])
        tables[row, count:] = tables[row, 0]
    return keys, values, tables.to(device)


def section_kernels(args) -> dict:
    import torch

    from longtail.kernels import lora as lora_ref
    from longtail.kernels import lora_triton
    from longtail.kernels.attention_cpu import paged_decode_attention_ref as gather_sdpa
    from longtail.kernels.paged_attention import (
        paged_decode_attention_ref,
        paged_decode_attention_triton,
        paged_extend_attention_ref,
        paged_extend_attention_triton,
    )

    device, results, timings = _device(), [], []
    tol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
    big = not args.dry_run
    # LoRA: the 8B hidden size, 64 slots of mixed ranks, bf16 (what the engine runs) and fp32.
    hidden, width = (4096, 14336) if big else (40, 56)
    tokens = (1, 37, 256) if big else (1, 5)
    # The interpreter's bf16 tl.dot is wrong (SGMV uses it), so the dry run checks the LoRA kernels in fp32 only.
    for dtype in (torch.bfloat16, torch.float32) if big else (torch.float32,):
        generator = torch.Generator().manual_seed(1)
        ranks = [(8, 16, 64, 0)[i % 4] for i in range(64 if big else 6)]
        offsets, total = [], 0
        for rank in ranks:
            offsets.append(total)
            total += rank
        a_rows = (torch.randn(total, hidden, generator=generator) * 0.05).to(device, dtype)
        b_rows = (torch.randn(total, width, generator=generator) * 0.05).to(device, dtype)
        offsets_t = torch.tensor(offsets, device=device)
        ranks_t = torch.tensor(ranks, device=device)
        scales = torch.rand(len(ranks), generator=generator).to(device)
        for count in tokens:
            x = torch.randn(count, hidden, generator=generator).to(device, dtype)
            slots = (torch.randint(-1, len(ranks), (count,), generator=generator)).to(device)
            label = f"{str(dtype)[6:]} T={count}"
            t = tol[dtype]
            shrunk = lora_triton.lora_shrink_triton(x, a_rows, slots, offsets_t, ranks_t, 64)
            expected = lora_ref.lora_shrink_ref(x, a_rows, slots, offsets_t, ranks_t, 64)
            _check(results, f"lora bgmv shrink {label}", shrunk, expected, *t)
            out, ref_out = torch.zeros(count, width, device=device, dtype=dtype), None
            ref_out = out.clone()
            lora_triton.lora_expand_triton(out, expected, b_rows, slots, offsets_t, ranks_t, scales)
            lora_ref.lora_expand_ref(ref_out, expected, b_rows, slots, offsets_t, ranks_t, scales)
            _check(results, f"lora bgmv expand {label}", out, ref_out, *t)
            sorted_slots = slots.sort().values
            seg_starts, seg_slots = lora_ref.segments_from_token_slots(sorted_slots)
            shrunk = lora_triton.lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, offsets_t, ranks_t, 64)
            expected = lora_ref.lora_shrink_sgmv_ref(x, a_rows, seg_starts, seg_slots, offsets_t, ranks_t, 64)
            _check(results, f"lora sgmv shrink {label}", shrunk, expected, *t)
            out, ref_out = torch.zeros(count, width, device=device, dtype=dtype), None
            ref_out = out.clone()
            lora_triton.lora_expand_sgmv_triton(out, expected, b_rows, seg_starts, seg_slots, offsets_t, ranks_t,
                                                scales)
            lora_ref.lora_expand_sgmv_ref(ref_out, expected, b_rows, seg_starts, seg_slots, offsets_t, ranks_t,
                                          scales)
            _check(results, f"lora sgmv expand {label}", out, ref_out, *t)
    # Paged attention at the 8B (H 32, KV 8, D 128) and 1B (D 64) head layouts; tiny in the dry run.
    layouts = [(32, 8, 128), (32, 8, 64)] if big else [(4, 2, 16), (6, 2, 8)]
    lengths = [1, 15, 16, 17, 300, 1023, 2048, 4000] if big else [1, 4, 5, 17, 40]
    for heads, kv_heads, head_dim in layouts:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            label = f"H{heads}/KV{kv_heads}/D{head_dim} {str(dtype)[6:]}"
            keys, values, tables = _paged_case(lengths, heads, kv_heads, head_dim, 16, dtype, device, 2)
            query = torch.randn(len(lengths), heads, head_dim).to(device, dtype)
            lens = torch.tensor(lengths, device=device)
            scale = head_dim ** -0.5
            out = torch.empty_like(query)
            paged_decode_attention_triton(out, query, keys, values, tables, lens, scale, 16)
            _check(results, f"paged decode {label}", out,
                   paged_decode_attention_ref(query, keys, values, tables, lens, scale, 16), *tol[dtype])
            prefixes = [0, 0, 16, 5, 100, 1000, 0, 3900] if big else [0, 0, 3, 5, 20]
            chunk = [1, 15, 33, 12, 200, 24, 2048, 100] if big else [1, 4, 2, 12, 20]
            totals = [p + c for p, c in zip(prefixes, chunk, strict=True)]
            keys, values, tables = _paged_case(totals, heads, kv_heads, head_dim, 16, dtype, device, 3)
            query = torch.randn(sum(chunk), heads, head_dim).to(device, dtype)
            starts = torch.tensor([0] + list(_cumulative(chunk)), device=device)
            prefix = torch.tensor(prefixes, device=device)
            out = torch.empty_like(query)
            paged_extend_attention_triton(out, query, keys, values, tables, starts, prefix, max(chunk), scale, 16)
            _check(results, f"paged extend {label}", out,
                   paged_extend_attention_ref(query, keys, values, tables, starts, prefix, scale, 16), *tol[dtype])
    # Decode attention speed: the Triton kernel against the gather + SDPA path the engine ran before.
    for batch, context in ((1, 4096), (32, 1024), (128, 1024)) if big else ((2, 40),):
        heads, kv_heads, head_dim = layouts[0]
        keys, values, tables = _paged_case([context] * batch, heads, kv_heads, head_dim, 16, torch.bfloat16,
                                           device, 4)
        query = torch.randn(batch, heads, head_dim).to(device, torch.bfloat16)
        lens = torch.full((batch,), context, device=device)
        out = torch.empty_like(query)
        scale = head_dim ** -0.5
        repeats = 20 if big else 1
        arguments = (query, keys, values, tables, lens, scale, 16)
        triton_ms = _time_ms(lambda a=arguments, o=out: paged_decode_attention_triton(o, *a), repeats)
        sdpa_ms = _time_ms(lambda a=arguments: gather_sdpa(*a), repeats)
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        timings.append({"batch": batch, "context": context, "triton_ms": triton_ms, "gather_sdpa_ms": sdpa_ms,
                        "kv_bytes": kv_bytes, "triton_bytes_per_s": kv_bytes / (triton_ms / 1e3)})
    return {"checks": results, "all_ok": all(r["ok"] for r in results), "decode_attention_timing": timings}


def _cumulative(values):
    total = 0
    for value in values:
        total += value
        yield total


def random_model(shape: str, device, dtype, seed: int = 0):
    """A LlamaModel with random weights in a published model's shapes (std 0.02, norms 1)."""
    import torch

    from longtail.serving.config import ModelConfig
    from longtail.serving.model import LlamaModel

    spec = dict(SHAPES[shape], model_type="llama")
    config = ModelConfig.from_dict(spec)
    torch.manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def normal(*size):
        return torch.randn(*size, device=device, dtype=dtype).mul_(0.02)

    weights = {"model.embed_tokens.weight": normal(config.vocab_size, hidden),
               "model.norm.weight": torch.ones(hidden, device=device, dtype=dtype)}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = normal(config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        for name, size in (("self_attn.q_proj", (q, hidden)), ("self_attn.k_proj", (kv, hidden)),
                           ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, q)),
                           ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                           ("mlp.down_proj", (hidden, inter))):
            weights[f"{prefix}.{name}.weight"] = normal(*size)
        for name in ("input_layernorm", "post_attention_layernorm"):
            weights[f"{prefix}.{name}.weight"] = torch.ones(hidden, device=device, dtype=dtype)
    return LlamaModel(config, weights, torch.device(device), dtype)


def random_adapters(config, count: int, slots, dtype, rank: int = RANK) -> list[int]:
    # The factors are made on the device (copies into the slots' rows are then device-to-device) and shared by
    # every layer of one adapter: the bytes a step reads are the same as with distinct values per layer.
    """`count` distinct rank-`rank` adapters on all seven projections of every layer, loaded into `slots`."""
    import torch

    from longtail.serving.peft_format import AdapterWeights, LoraModule

    shapes = config.module_shapes().shapes
    loaded = []
    for index in range(count):
        generator = torch.Generator().manual_seed(1000 + index)
        factors = {name: ((torch.randn(rank, shapes[name][0], generator=generator) * 0.02).to(slots.device, dtype),
                          (torch.randn(shapes[name][1], rank, generator=generator) * 0.02).to(slots.device, dtype))
                   for name in PROJECTIONS}
        modules = tuple(LoraModule(layer, name, factors[name][0], factors[name][1], 2.0)
                        for layer in range(config.num_layers) for name in PROJECTIONS)
        nbytes = sum(m.lora_a.nbytes + m.lora_b.nbytes for m in modules)
        loaded.append(slots.load(AdapterWeights(f"0x{index + 1:064x}", {"r": rank}, modules, nbytes)))
    return loaded


def _engine_steps(model, paged: bool, lora_slot: int, slots, block_size: int = 16, graphs: bool = False):
    """Logits of a mixed batch (two prompts, one in two chunks) then decode steps, on a fresh cache.

    `graphs`: decode steps replay CUDA graphs (on a CPU dry run, the function kept and called again).
    """
    import torch

    from longtail.serving.cuda_graphs import DecodeGraphs, cuda_capture
    from longtail.serving.kv_cache import PagedKVCache
    from longtail.serving.model_runner import ModelRunner, SequenceChunk

    model.paged_kernels = paged
    model._extend_meta = None
    cache = PagedKVCache(model.config, 4 * 2**20, block_size=block_size, device=model.device, dtype=model.dtype)
    runner = ModelRunner(model, cache, slots, graphs=None)
    runner.graphs = None  # eager unless asked: the comparisons below are of the kernels
    if graphs:
        runner.graphs = DecodeGraphs(model, cache, slots, max_running=8, max_context=128,
                                     capture=cuda_capture if model.device.type == "cuda" else (lambda f: f))
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (37, 21)]
    tables = [cache.pool.allocate(cache.blocks_for(64)) for _ in prompts]
    logits = [runner.run([SequenceChunk(prompts[0][:20], 0, tables[0], lora_slot, 0),
                          SequenceChunk(prompts[1], 0, tables[1], -1, 0)]),
              runner.run([SequenceChunk(prompts[0][20:], 20, tables[0], lora_slot, 0),
                          SequenceChunk([prompts[1][-1]], 21, tables[1], -1)])]
    logits.append(runner.run([SequenceChunk([prompts[0][-1]], 37, tables[0], lora_slot),
                              SequenceChunk([prompts[1][0]], 22, tables[1], -1)]))
    logits.append(runner.run([SequenceChunk([prompts[1][1]], 23, tables[1], -1),  # rows in another order
                              SequenceChunk([prompts[0][0]], 38, tables[0], lora_slot)]))
    logits.append(runner.run([SequenceChunk([prompts[0][1]], 39, tables[0], lora_slot)]))
    if graphs and runner.graphs.captures == 0:
        raise RuntimeError("no decode step went through a graph")
    return torch.cat(logits)


def section_engine(args) -> dict:
    import torch

    from longtail.serving.lora_slots import LoraSlots

    device, results, notes = _device(), [], []
    dtype = torch.float32
    model = random_model("tiny", device, dtype)
    model.cpu_attention = False  # on a CPU (dry run) the C kernel would take the decode rows
    slots = LoraSlots(model.config, device=device, dtype=dtype)
    slot = random_adapters(model.config, 1, slots, dtype, rank=8)[0]
    reference = _engine_steps(model, False, slot, slots)
    paged = _engine_steps(model, True, slot, slots)
    _check(results, "paged kernels vs gather+SDPA (logits, fp32)", paged, reference, 1e-4, 1e-4)
    previous = os.environ.get("LONGTAIL_KERNELS")
    try:
        os.environ["LONGTAIL_KERNELS"] = "torch"
        torch_lora = _engine_steps(model, True, slot, slots)
        os.environ["LONGTAIL_KERNELS"] = "triton"
        triton_lora = _engine_steps(model, True, slot, slots)
    finally:
        if previous is None:
            os.environ.pop("LONGTAIL_KERNELS", None)
        else:
            os.environ["LONGTAIL_KERNELS"] = previous
    _check(results, "Triton LoRA vs torch LoRA (logits, fp32)", triton_lora, torch_lora, 1e-4, 1e-4)
    if not args.dry_run:  # the engine's own dtype on a GPU
        bf16 = random_model("tiny", device, torch.bfloat16)
        bf16_slots = LoraSlots(bf16.config, device=device, dtype=torch.bfloat16)
        bf16_slot = random_adapters(bf16.config, 1, bf16_slots, torch.bfloat16, rank=8)[0]
        _check(results, "paged kernels vs gather+SDPA (logits, bf16)", _engine_steps(bf16, True, bf16_slot,
               bf16_slots), _engine_steps(bf16, False, bf16_slot, bf16_slots), 5e-2, 5e-2)
    _check(results, "CUDA graphs vs eager (decode logits, paged kernels, fp32)",
           _engine_steps(model, True, slot, slots, graphs=True), paged, 1e-4, 1e-4)
    try:
        results.append(_peft_check(device))
    except ImportError as error:
        notes.append(f"HF + PEFT check skipped: {error}")
    except Exception as error:  # a failure of this check must not hide the ones above
        results.append({"check": "engine vs HF+PEFT", "max_abs_error": float("nan"), "atol": 1e-3, "ok": False,
                        "error": f"{type(error).__name__}: {error}"[:300]})
    return {"checks": results, "all_ok": all(r["ok"] for r in results), "notes": notes}


def _peft_check(device) -> dict:
    """The engine (paged kernels, Triton LoRA on a GPU) against HF transformers + PEFT on one tiny model."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import peft  # noqa: F401  (ImportError: skipped)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtail.serving.kv_cache import PagedKVCache
    from longtail.serving.lora_slots import LoraSlots
    from longtail.serving.model import LlamaModel
    from longtail.serving.model_runner import ModelRunner, SequenceChunk
    from longtail.serving.peft_format import load_adapter

    from model_kit import TINY_ADAPTER_SPECS, build_peft_adapter, build_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        base_dir = build_tiny_model(Path(folder) / "base")
        spec = TINY_ADAPTER_SPECS[1]  # rank 8 on all seven projections, o_proj at rank 2 by rank_pattern
        name, adapter_dir = spec.name, build_peft_adapter(base_dir, spec, Path(folder) / "adapter", seed=101)
        model = LlamaModel.from_pretrained(base_dir, device=device, dtype=torch.float32)
        slots = LoraSlots(model.config, device=device, dtype=torch.float32)
        slot = slots.load(load_adapter(adapter_dir, model.config.module_shapes()))
        cache = PagedKVCache(model.config, 2**20, device=device, dtype=torch.float32)
        runner = ModelRunner(model, cache, slots)
        prompt = [5, 9, 33, 2, 71, 100, 7, 250, 19]
        table = cache.pool.allocate(cache.blocks_for(32))
        ours = [runner.run([SequenceChunk(prompt, 0, table, slot, 0)])]
        tokens = list(prompt)
        for _ in range(4):
            token = int(ours[-1][-1].argmax())
            ours.append(runner.run([SequenceChunk([token], len(tokens), table, slot)]))
            tokens.append(token)
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                       adapter_dir).eval()
        with torch.inference_mode():
            expected = hf(input_ids=torch.tensor([tokens])).logits[0].float()
        got = torch.cat(ours).cpu()
        error = float((got - expected).abs().max())
        return {"check": f"engine vs HF+PEFT (adapter {name}, prefill + 4 greedy steps)", "max_abs_error": error,
                "atol": 1e-3, "ok": error < 1e-3}


def roofline_bytes(model, slots_used: int, batch: int, context: int, rank: int = RANK) -> dict:
    """Bytes one decode step must read: every weight once, each row's KV, each distinct adapter's rows once."""
    config = model.config
    element = model.dtype.itemsize
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    weights = (config.num_layers * per_layer + config.vocab_size * hidden + hidden + batch * hidden) * element
    kv_bytes = batch * context * config.num_layers * 2 * kv * element
    shapes = config.module_shapes().shapes
    lora = slots_used * config.num_layers * rank * sum(a + b for a, b in shapes.values()) * element
    return {"weights": weights, "kv": kv_bytes, "lora": lora, "total": weights + kv_bytes + lora}


def section_decode(args, shape: str) -> dict:
    import torch

    from longtail.serving.kv_cache import PagedKVCache
    from longtail.serving.lora_slots import LoraSlots
    from longtail.serving.model_runner import ModelRunner, SequenceChunk

    began = time.perf_counter()
    budget = args.section_seconds
    device = _device()
    dtype = torch.bfloat16
    batches = (1, 32, 128) if not args.dry_run else (1, 4)
    adapter_counts = (0, 1, 32, 128) if not args.dry_run else (0, 1, 4)
    context = args.context if not args.dry_run else 20
    copy = copy_bandwidth(args.dry_run)
    model = random_model("tiny" if args.dry_run else shape, device, dtype)
    block_size = 16
    per_row = -(-(context + 1) // block_size)
    cache_bytes = 2 * model.config.num_layers * block_size * model.config.num_kv_heads * model.config.head_dim * \
        dtype.itemsize * per_row * (max(batches) + 1)
    cache = PagedKVCache(model.config, cache_bytes, block_size=block_size, device=device, dtype=dtype)
    most = max(adapter_counts)
    slots = LoraSlots(model.config, initial_slots=most, initial_rows=most * RANK, device=device, dtype=dtype)
    loaded = random_adapters(model.config, most, slots, dtype)
    runner = ModelRunner(model, cache, slots)  # on CUDA its decode steps replay graphs (serving.cuda_graphs)
    eager = ModelRunner(model, cache, slots)
    eager.graphs = None
    tables = [cache.pool.allocate(per_row) for _ in range(max(batches))]
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randint(3, model.config.vocab_size, (max(batches),), generator=generator).tolist()
    rows, truncated = [], False
    with torch.inference_mode():
        for batch in batches:
            for count in adapter_counts:
                if count > batch:
                    continue
                if time.perf_counter() - began > 0.85 * budget:
                    truncated = True
                    break
                chunks = [SequenceChunk([tokens[i]], context, tables[i], loaded[i % count] if count else -1)
                          for i in range(batch)]

                def step(chunks=chunks, runner=runner):
                    return runner.run(chunks).argmax(-1)

                ms = _time_ms(step, repeats=2 if args.dry_run else 10, warmup=1 if args.dry_run else 3)
                eager_ms = _time_ms(lambda chunks=chunks: eager.run(chunks).argmax(-1),
                                    repeats=2 if args.dry_run else 10, warmup=1 if args.dry_run else 3)
                need = roofline_bytes(model, count, batch, context)
                roofline_ms = need["total"] / copy * 1e3
                rows.append({"batch": batch, "adapters": count, "step_ms": ms, "eager_ms": eager_ms,
                             "graphs": runner.graphs is not None, "tokens_per_s": batch / (ms / 1e3),
                             "roofline_ms": roofline_ms, "of_roofline": roofline_ms / ms, "bytes": need})
    base = {r["batch"]: r["step_ms"] for r in rows if r["adapters"] == 0}
    for row in rows:
        row["lora_overhead"] = row["step_ms"] / base[row["batch"]] - 1 if row["batch"] in base else None
    return {"shape": shape if not args.dry_run else f"tiny (dry run for {shape})", "context": context,
            "copy_bandwidth": copy, "rows": rows, "truncated": truncated, "all_ok": True}


def section_pytest(args) -> dict:
    try:
        import hypothesis  # noqa: F401
        import pytest  # noqa: F401
    except ImportError as error:
        return {"skipped": f"pytest or hypothesis not importable: {error}", "all_ok": True}
    if args.dry_run:
        return {"skipped": "dry run: the gpu-marked tests need a GPU", "all_ok": True}
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-m", "gpu", "tests/kernels",
                             "tests/serving/test_sampling.py", "-p",
                             "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=args.section_seconds - 5)
    lines = (result.stdout + result.stderr).strip().splitlines()
    # The failures' own lines travel in the JSON: a loan is too short to ask twice what failed.
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR", "E "))][:40]
    print("\n".join(lines[-200:]))
    return {"returncode": result.returncode, "last_line": lines[-1] if lines else "", "failures": failures,
            "all_ok": result.returncode == 0}


def _fallback_modules() -> list[str]:
    """Stand-ins for the engine's third-party imports that a bare device Python may lack.

    The check loads no safetensors file and parses no adapter config (weights are random, adapters made in
    memory), so `safetensors.safe_open`, `regex`'s timeouts and numpy's loaders are never called; only the
    imports must succeed. Returns the names stood in for (reported by the device section).
    """
    import importlib
    import re
    import types

    stood_in = []
    for name in ("safetensors", "regex", "numpy"):
        try:
            importlib.import_module(name)
        except ImportError:
            if name == "regex":
                sys.modules[name] = re
            else:
                module = types.ModuleType(name)

                def missing(*_args, _name=name, **_kwargs):
                    raise ImportError(f"{_name} is not installed on this machine")

                module.safe_open = missing
                module.float32 = module.float16 = module.float64 = None
                module.ndarray = type("ndarray", (), {})
                sys.modules[name] = module
            stood_in.append(name)
    try:
        importlib.import_module("Crypto.Hash.keccak")
    except ImportError:
        # pycryptodome (a web3 dependency) names adapters by keccak256; this check only compares logits,
        # so SHA3-256 stands in and the ids it makes are labels, never content addresses.
        import hashlib

        keccak = types.ModuleType("Crypto.Hash.keccak")
        keccak.new = lambda digest_bits=256: hashlib.sha3_256()
        for module_name, module in (("Crypto", types.ModuleType("Crypto")), ("Crypto.Hash", types.ModuleType("Crypto.Hash")),
                                    ("Crypto.Hash.keccak", keccak)):
            sys.modules[module_name] = module
        sys.modules["Crypto"].Hash = sys.modules["Crypto.Hash"]
        sys.modules["Crypto.Hash"].keccak = keccak
        stood_in.append("Crypto (SHA3 for keccak: ids are labels only)")
    return stood_in


def run_section(args) -> int:
    name = args.section
    stood_in = _fallback_modules()
    out = Path(args.out) / "sections"
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        if name == "device":
            result = section_device(args)
        elif name == "kernels":
            result = section_kernels(args)
        elif name == "engine":
            result = section_engine(args)
        elif name.startswith("decode-"):
            result = section_decode(args, {"decode-8b": "llama-3.1-8b", "decode-1b": "llama-3.2-1b"}[name])
        elif name == "pytest-gpu":
            result = section_pytest(args)
        else:
            raise SystemExit(f"unknown section {name}")
        status = "ok" if result.get("all_ok", True) else "failed"
    except Exception as error:  # recorded, not raised: the parent reports it and goes on
        traceback.print_exc()
        result, status = {"error": f"{type(error).__name__}: {error}"}, "error"
    result.update(status=status, seconds=round(time.perf_counter() - began, 1))
    if stood_in:
        result["stand_ins"] = stood_in
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


# --------------------------------------------------------------------------------------------------
# The parent: sections as children, then the JSON, the markdown and the summary.


def _fmt_bw(value) -> str:
    return f"{value / 1e12:.2f} TB/s" if value and value > 1e11 else (f"{value / 1e9:.2f} GB/s" if value else "n/a")


def render(results: dict) -> tuple[str, list[str]]:
    """(markdown, summary lines ≤ 40)."""
    device = results["sections"].get("device", {})
    md = [f"# GPU check ({results['mode']})", "",
          f"Device: **{device.get('name', '?')}**, torch {device.get('torch', '?')}, triton {device.get('triton', '?')}; "
          f"copy bandwidth {_fmt_bw(device.get('copy_bandwidth'))} (vendor peak {_fmt_bw(device.get('peak_bandwidth'))}).",
          "", "| section | status | seconds | note |", "| --- | --- | ---: | --- |"]
    summary = [f"gpu_check ({results['mode']}): {device.get('name', '?')}, copy {_fmt_bw(device.get('copy_bandwidth'))}"]
    for name, section in results["sections"].items():
        note = section.get("error") or section.get("skipped") or ""
        md.append(f"| {name} | {section.get('status')} | {section.get('seconds', '')} | {note[:120]} |")
        summary.append(f"  {name:11} {section.get('status'):8} {section.get('seconds', '')!s:>6} s  {note[:70]}")
    for name in ("kernels", "engine"):
        checks = results["sections"].get(name, {}).get("checks", [])
        if checks:
            md += ["", f"## {name} correctness", "", "| check | max abs error | atol | ok |", "| --- | ---: | ---: | --- |"]
            md += [f"| {c['check']} | {c['max_abs_error']:.3g} | {c['atol']:.0e} | {'yes' if c['ok'] else 'NO'} |"
                   for c in checks]
            failed = [c["check"] for c in checks if not c["ok"]]
            summary.append(f"{name}: {len(checks) - len(failed)}/{len(checks)} checks pass"
                           + (f"; FAILED: {', '.join(failed)[:150]}" if failed else ""))
        for note in results["sections"].get(name, {}).get("notes", []):
            md.append(f"\n{note}")
    failures = results["sections"].get("pytest-gpu", {}).get("failures", [])
    if failures:
        md += ["", "## pytest -m gpu: failures", "", "```", *failures, "```"]
        summary += [f"pytest: {line[:150]}" for line in failures[:4]]
    timing = results["sections"].get("kernels", {}).get("decode_attention_timing", [])
    if timing:
        md += ["", "## decode attention (bf16): Triton paged kernel vs gather + SDPA", "",
               "| batch | context | Triton ms | gather+SDPA ms | × | KV bytes/s |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in timing:
            md.append(f"| {t['batch']} | {t['context']} | {t['triton_ms']:.3f} | {t['gather_sdpa_ms']:.3f} | "
                      f"{t['gather_sdpa_ms'] / t['triton_ms']:.1f} | {_fmt_bw(t['triton_bytes_per_s'])} |")
        summary.append("decode attention ×gather+SDPA: " + ", ".join(
            f"B{t['batch']}/ctx{t['context']} {t['gather_sdpa_ms'] / t['triton_ms']:.1f}×" for t in timing))
    targets = []
    for name in ("decode-8b", "decode-1b"):
        section = results["sections"].get(name, {})
        rows = section.get("rows", [])
        if not rows:
            continue
        md += ["", f"## {name}: {section['shape']}, bf16, context {section['context']} per row, "
                   f"copy {_fmt_bw(section['copy_bandwidth'])}", "",
               "| batch | adapters | step ms (graphs) | eager ms | tokens/s | roofline ms | of roofline | LoRA overhead |",
               "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        summary.append(f"{name} ({section['context']} ctx): batch/adapters -> ms, tok/s, of roofline, LoRA +%")
        line = []
        for r in rows:
            overhead = f"{r['lora_overhead']:+.0%}" if r["lora_overhead"] is not None else "n/a"
            md.append(f"| {r['batch']} | {r['adapters']} | {r['step_ms']:.2f} | {r['eager_ms']:.2f} | "
                      f"{r['tokens_per_s']:.0f} | "
                      f"{r['roofline_ms']:.2f} | {r['of_roofline']:.0%} | {overhead} |")
            line.append(f"{r['batch']}/{r['adapters']}: {r['step_ms']:.1f}ms (eager {r['eager_ms']:.1f}) "
                        f"{r['tokens_per_s']:.0f}t/s "
                        f"{r['of_roofline']:.0%} {overhead}")
        for i in range(0, len(line), 3):
            summary.append("  " + " | ".join(line[i:i + 3]))
        if section.get("truncated"):
            summary.append("  (time budget reached: rows above are the ones measured)")
        if name == "decode-8b" and results["mode"] == "gpu":
            targets = _targets(rows)
    if targets:
        md += ["", "## targets (issue 25, 8B shape)", ""] + [f"- {t}" for t in targets]
        summary += targets
    return "\n".join(md) + "\n", summary[:39]  # the caller adds one closing line


def _targets(rows: list[dict]) -> list[str]:
    out = []
    wide = [r for r in rows if r["batch"] >= 32]
    if wide:
        worst = min(r["of_roofline"] for r in wide)
        out.append(f"{'PASS' if worst >= TARGET_ROOFLINE else 'FAIL'}: batch 32-128 step ≥ 50% of roofline "
                   f"(worst {worst:.0%})")
    with32 = [r for r in rows if r["adapters"] == 32 and r["lora_overhead"] is not None]
    if with32:
        worst = max(r["lora_overhead"] for r in with32)
        out.append(f"{'PASS' if worst <= TARGET_LORA_OVERHEAD else 'FAIL'}: 32 adapters ≤ +15% over base "
                   f"(worst {worst:+.0%})")
    single = [r for r in rows if r["batch"] == 1 and r["adapters"] == 0]
    if single:
        rate = single[0]["tokens_per_s"]
        out.append(f"{'PASS' if rate >= TARGET_SINGLE_STREAM else 'FAIL'}: single stream ≥ 100 tok/s ({rate:.0f})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu_check_out"),
                        help="folder for gpu_check.json, gpu_check.md and logs/ (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on a CPU, Triton interpreter")
    parser.add_argument("--budget-seconds", type=float, default=450.0, help="the whole run's limit")
    parser.add_argument("--context", type=int, default=512, help="cached tokens per row in the decode sections")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in run order")
    parser.add_argument("--section", help=argparse.SUPPRESS)          # child mode
    parser.add_argument("--section-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        return run_section(args)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    unknown = [s for s in args.sections.split(",") if s and s not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown sections {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    env = dict(os.environ, TRITON_INTERPRET="1" if args.dry_run else "0")
    results = {"mode": "dry-run" if args.dry_run else "gpu", "sections": {}}
    for name in [s for s in args.sections.split(",") if s]:
        left = args.budget_seconds - (time.perf_counter() - began)
        limit = min(SECTIONS[name], left - 5)
        if limit < 10:
            results["sections"][name] = {"status": "not run", "skipped": "whole-run budget spent"}
            continue
        command = [sys.executable, "-P", str(Path(__file__).resolve()), "--section", name, "--out", str(out),
                   "--section-seconds", str(limit), "--context", str(args.context)]
        if args.dry_run:
            command.append("--dry-run")
        section_file = out / "sections" / f"{name}.json"
        section_file.unlink(missing_ok=True)
        started = time.perf_counter()
        with open(out / "logs" / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if section_file.exists():
            results["sections"][name] = json.loads(section_file.read_text())
        else:
            results["sections"][name] = {"status": "timeout" if code == "timeout" else "crashed",
                                         "error": f"no result (exit {code}); see logs/{name}.log",
                                         "seconds": round(time.perf_counter() - started, 1)}
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    results["seconds"] = round(time.perf_counter() - began, 1)
    markdown, summary = render(results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown)
    summary.append(f"{results['seconds']:.0f} s; full tables in {out}/gpu_check.md, figures in gpu_check.json")
    print("\n".join(summary))
    bad = [n for n, s in results["sections"].items() if s.get("status") not in ("ok", "not run")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
