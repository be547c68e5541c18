"""One decode step of the CPU engine, timed: batch 1 / 32 / 128, base only and with distinct adapters.

Baseline in the same run: the same engine with its C kernels held to one thread
(`torch.set_num_threads(1)` around each kernel call; torch's own matmuls keep all
threads), against the kernels sharing torch's OpenMP threads. Configurations
alternate round by round, so drift on a shared machine hits both alike; each cell
is the median step of its rounds. Writes its table to docs/serving.md between
`<!-- decode_step:start -->` and `<!-- decode_step:end -->`.

    python -m longtail.scripts.bench_decode_step [--rounds 5] [--steps 8] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from longtail.scripts.bench_serving import make_adapters
from longtail.scripts.docs_section import write_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "serving.md"


@contextlib.contextmanager
def kernels_on_one_thread(enabled: bool):
    """Hold our C kernels to one thread (the state before they used OpenMP) while torch keeps its threads."""
    if not enabled:
        yield
        return
    import longtail.serving.model as model_module
    from longtail.kernels import attention_cpu

    threads = torch.get_num_threads()

    def wrap(function):
        def single(*args, **kwargs):
            torch.set_num_threads(1)
            try:
                return function(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)
        return single

    lora = model_module.add_lora_runs_native  # the model imported it by name: patch it where it is read
    model_module.add_lora_runs_native = wrap(lora)
    bound = attention_cpu.BoundCache
    originals = (bound.rope_write, bound.decode)

    bound.rope_write, bound.decode = wrap(originals[0]), wrap(originals[1])
    try:
        yield
    finally:
        bound.rope_write, bound.decode = originals
        model_module.add_lora_runs_native = lora


def decode_steps(engine, batch: int, adapters: list[str | None], context: int, steps: int) -> list[float]:
    """Seconds of each of `steps` decode steps with `batch` running requests of `context` prompt tokens."""
    from longtail.serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    handles = [engine.submit([5 + (i * 7 + j) % 900 for j in range(context)], adapters[i % len(adapters)], params)
               for i in range(batch)]
    while not all(r.prefilled for r in engine.scheduler.running) or len(engine.scheduler.running) < batch:
        engine.step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - began)
    while engine.has_work():
        engine.step()
    for handle in handles:
        handle.wait(timeout=60)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--adapters", default="0,1,32", help="distinct adapters in the batch (0 = base only)")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens of each request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from longtail.serving.base_models import ensure_embedded_model
    from longtail.serving.engine import Engine

    model_dir = ensure_embedded_model()
    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(a) for a in args.adapters.split(",")]
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as scratch:
        folders = make_adapters(model_dir, Path(scratch), max(counts), (16, 16), seed=3) if max(counts) else []
        engine = Engine.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), kv_cache_bytes=1 << 30,
                                        max_batch_tokens=8192, initial_adapter_slots=max(max(counts), 1))
        ids = [engine.add_adapter(f) for f in folders]
        decode_steps(engine, 4, ids[:1] or [None], 16, 2)  # warm-up: kernels built, first adapter resident
        cells: dict[tuple[int, int, bool], list[float]] = {}
        for round_ in range(args.rounds):
            for batch in batches:
                for count in counts:
                    chosen = ids[:count] if count else [None]
                    for one_thread in ((True, False) if round_ % 2 == 0 else (False, True)):
                        with kernels_on_one_thread(one_thread):
                            times = decode_steps(engine, batch, chosen, args.context, args.steps)
                        cells.setdefault((batch, count, one_thread), []).extend(times)
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1}/{args.rounds} done (load {loads[-1]:.1f})", flush=True)
    lines = [f"`python -m longtail.scripts.bench_decode_step --rounds {args.rounds} --steps {args.steps}` "
             f"(SmolLM2-135M {args.dtype}, {args.threads} threads, {args.context}-token prompts, rank-16 adapters "
             f"on all 7 projections; median decode step over rounds x steps; load average "
             f"{min(loads):.1f}–{max(loads):.1f} on 2 cores).", "",
             "| batch | distinct adapters | kernels on 1 thread (before) | kernels on torch's threads | speed-up |"
             " tokens/s after |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for batch in batches:
        for count in counts:
            before = statistics.median(cells[(batch, count, True)]) * 1e3
            after = statistics.median(cells[(batch, count, False)]) * 1e3
            lines.append(f"| {batch} | {count} | {before:.1f} ms | {after:.1f} ms | {before / after:.2f}x | "
                         f"{batch / after * 1e3:.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(DOC, "decode_step", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
