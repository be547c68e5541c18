"""Multi-LoRA serving benchmark in S-LoRA's style, four systems in one process and one run.

Workload: adapter popularity power-law (alpha), Gamma inter-arrival times with
coefficient of variation cv, input and output lengths uniform in ranges.
Systems: (a) HF PEFT, one request at a time with `set_adapter` (what users do
today; timed on a random subset, compared by tokens/s), (b) HF PEFT batched per
adapter (requests grouped by adapter, left-padded; also a subset),
(c) our engine with no adapters (the ceiling), (d) our engine with the adapters.
Writes the table to docs/benchmarks.md between `<!-- serving:start -->` and `<!-- serving:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"

from scripts.docs_section import write_section  # noqa: E402

TARGETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")]


def make_adapters(model_dir: Path, out: Path, count: int, ranks: tuple[int, int], seed: int) -> list[Path]:
    """Random PEFT-format adapters written straight with safetensors (fast; PEFT loads them)."""
    from serving.config import ModelConfig

    shapes = ModelConfig.from_model_dir(model_dir).module_shapes()
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    rng = random.Random(seed)
    folders = []
    for index in range(count):
        rank = rng.choice([r for r in (8, 16, 32, 64) if ranks[0] <= r <= ranks[1]])
        targets = TARGETS[index % len(TARGETS)]
        generator = torch.Generator().manual_seed(seed + index)
        tensors = {}
        for layer in range(shapes.num_layers):
            for name in targets:
                width_in, width_out = shapes.shapes[name]
                key = f"base_model.model.model.layers.{layer}.{parent[name]}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, width_in, generator=generator) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(width_out, rank, generator=generator) * 0.02
        folder = out / f"adapter-{index:03d}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "base_model_name_or_path": str(model_dir), "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
        }))
        folders.append(folder)
    return folders


def workload(count: int, adapters: int, alpha: float, cv: float, rate: float, input_range, output_range, seed: int):
    """(arrival seconds, adapter index, prompt length, output length) per request."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(adapters)]
    shape = 1.0 / (cv * cv)
    clock, jobs = 0.0, []
    for _ in range(count):
        clock += rng.gammavariate(shape, 1.0 / (rate * shape))
        jobs.append((clock, rng.choices(range(adapters), weights)[0], rng.randint(*input_range),
                     rng.randint(*output_range)))
    return jobs


def run_engine(engine, jobs, adapter_ids, vocab: int) -> dict:
    from serving import SamplingParams

    rng = random.Random(1)
    prompts = [[rng.randrange(100, vocab) for _ in range(length)] for _, _, length, _ in jobs]
    handles = []
    start = time.perf_counter()
    pending = list(range(len(jobs)))
    while pending or any(not h.done.is_set() for h in handles):
        now = time.perf_counter() - start
        while pending and jobs[pending[0]][0] <= now:
            index = pending.pop(0)
            _, adapter, _, out_len = jobs[index]
            handles.append(engine.submit(prompts[index], adapter_ids[adapter] if adapter_ids else None,
                                         SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)))
        if not engine.step() and pending:
            time.sleep(min(0.005, max(0.0, jobs[pending[0]][0] - now)))
    seconds = time.perf_counter() - start
    outputs = [h.output() for h in handles]
    tokens = sum(len(o.token_ids) for o in outputs)
    ttfts = sorted(o.ttft_seconds for o in outputs if o.ttft_seconds is not None)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ttft_p50": ttfts[len(ttfts) // 2], "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "tpot": seconds / max(tokens / len(outputs), 1) / 1}


def run_hf_sequential(model, jobs, vocab: int) -> dict:
    rng = random.Random(1)
    tokens, ttfts, start = 0, [], time.perf_counter()
    for _, adapter, length, out_len in jobs:
        model.set_adapter(f"a{adapter}")
        prompt = torch.tensor([[rng.randrange(100, vocab) for _ in range(length)]])
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                                 pad_token_id=0)
        ttfts.append(time.perf_counter() - began)
        tokens += out.shape[1] - prompt.shape[1]
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_hf_grouped(model, jobs, vocab: int) -> dict:
    rng = random.Random(1)
    groups: dict[int, list] = {}
    for job in jobs:
        groups.setdefault(job[1], []).append(job)
    tokens, start = 0, time.perf_counter()
    for adapter, members in groups.items():
        model.set_adapter(f"a{adapter}")
        longest = max(m[2] for m in members)
        out_len = max(m[3] for m in members)
        batch = torch.zeros(len(members), longest, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, member in enumerate(members):
            batch[row, longest - member[2]:] = torch.tensor([rng.randrange(100, vocab) for _ in range(member[2])])
            mask[row, longest - member[2]:] = 1
        with torch.inference_mode():
            model.generate(batch, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                           do_sample=False, pad_token_id=0)
        tokens += sum(m[3] for m in members)  # useful tokens only; padding work is the baseline's cost
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--baseline-subset", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="8 adapters, 16 requests: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.requests, args.baseline_subset = 8, 16, 4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serving import Engine
    from serving.base_models import ensure_embedded_model

    torch.manual_seed(0)
    model_dir = ensure_embedded_model()
    vocab = 49152
    jobs = workload(args.requests, args.adapters, args.alpha, args.cv, args.rate, (8, 64), (16, 64), seed=3)
    with tempfile.TemporaryDirectory() as scratch:
        folders = make_adapters(model_dir, Path(scratch), args.adapters, (8, 64), seed=11)
        engine = Engine.from_pretrained(model_dir, device=args.device, kv_cache_bytes=512 * 2**20,
                                        max_adapters=args.adapters, max_batch_tokens=1024)
        adapter_ids = [engine.add_adapter(f) for f in folders]
        run_engine(engine, jobs[:4], None, vocab)  # warm-up
        ceiling = run_engine(engine, jobs, None, vocab)
        ours = run_engine(engine, jobs, adapter_ids, vocab)
        del engine
        subset = random.Random(5).sample(jobs, min(args.baseline_subset, len(jobs)))
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        used = sorted({j[1] for j in jobs})
        peft = PeftModel.from_pretrained(base, str(folders[used[0]]), adapter_name=f"a{used[0]}").eval()
        for index in used[1:]:
            peft.load_adapter(str(folders[index]), adapter_name=f"a{index}")
        sequential = run_hf_sequential(peft, subset, vocab)
        grouped = run_hf_grouped(peft, subset, vocab)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [("(a) HF PEFT, one at a time, set_adapter", sequential, f"{len(subset)} of {len(jobs)} (random subset)"),
            ("(b) HF PEFT, batched per adapter", grouped, f"{len(subset)} of {len(jobs)} (random subset)"),
            ("(c) Longtail engine, no adapters", ceiling, f"{len(jobs)}"),
            ("(d) Longtail engine, with adapters", ours, f"{len(jobs)}")]
    lines = [
        f"## Multi-LoRA serving ({args.adapters} adapters ranks 8–64, {args.requests} requests, power-law "
        f"alpha {args.alpha}, Gamma cv {args.cv}, {args.rate}/s, inputs 8–64, outputs 16–64 tokens; "
        f"SmolLM2-135M fp32, {args.device}, this machine)", "",
        "| system | requests timed | output tokens/s | TTFT p50 s | TTFT p99 s | s per output token |",
        "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, result, timed in rows:
        lines.append(f"| {name} | {timed} | {result['tokens_per_s']:.1f} | {result.get('ttft_p50', float('nan')):.3f} | "
                     f"{result.get('ttft_p99', float('nan')):.3f} | {result['seconds'] / max(result['tokens'], 1):.4f} |")
    ratios = (ours["tokens_per_s"] / sequential["tokens_per_s"], ours["tokens_per_s"] / grouped["tokens_per_s"],
              ours["tokens_per_s"] / ceiling["tokens_per_s"])
    lines += ["", f"Ratios (output tokens/s): **d/a = {ratios[0]:.1f}**, **d/b = {ratios[1]:.1f}**, "
                  f"**d/c = {ratios[2]:.2f}** (targets ≥ 10, ≥ 3, ≥ 0.8). Peak RSS of the run: {peak_rss_mb:.0f} MB. "
                  "Baselines (a) and (b) time a random subset of the same requests and are compared by tokens/s."]
    text = "\n".join(lines)
    print(text)
    write_section(DOC, "serving", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
