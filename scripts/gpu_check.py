"""GPU check for the multi-LoRA kernels: tests on the GPU, then bandwidth and speed-up tables.

One prepared command for a CUDA machine, in at most ~5 minutes:
  1. `pytest -m gpu tests/kernels` (fp16/bf16 against the torch reference);
  2. decode (BGMV): batch 1–256, distinct adapters 1–256, ranks 8/16/64, hidden 4096;
  3. prefill (SGMV): 2,048 tokens in 8–64 segments;
timing Triton against the torch reference in the same run and reporting the
bytes each kernel must move as a fraction of the device's memory bandwidth.
Writes the table into docs/kernels.md between `<!-- gpu:start -->` / `<!-- gpu:end -->`.
"""

# The timed lambdas run inside their own loop iteration, so binding the loop variables late is intended.
# ruff: noqa: B023

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "kernels.md"
# Peak memory bandwidth in bytes/s by device name (vendor figures).
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12, "4090": 1.0e12}


def bandwidth_of(name: str) -> float:
    for key, value in BANDWIDTH.items():
        if key in name:
            return value
    return float("nan")


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def case(tokens: int, adapters: int, rank: int, hidden: int, dtype, segments: int | None = None):
    device = "cuda"
    offsets = torch.arange(adapters, device=device) * rank
    ranks = torch.full((adapters,), rank, device=device)
    scales = torch.ones(adapters, device=device)
    a_rows = torch.randn(adapters * rank, hidden, device=device, dtype=dtype) * 0.02
    b_rows = torch.randn(adapters * rank, hidden, device=device, dtype=dtype) * 0.02
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    if segments is None:
        slots = torch.arange(tokens, device=device) % adapters
    else:
        slots = torch.sort(torch.arange(tokens, device=device) % segments % adapters).values
    return x, a_rows, b_rows, slots, offsets, ranks, scales


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (nothing was measured)", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels"], cwd=ROOT)
    from kernels import lora_expand_ref, lora_shrink_ref, segments_from_token_slots
    from kernels.lora import lora_expand_sgmv_ref, lora_shrink_sgmv_ref
    from kernels.lora_triton import (
        lora_expand_sgmv_triton,
        lora_expand_triton,
        lora_shrink_sgmv_triton,
        lora_shrink_triton,
    )

    name = torch.cuda.get_device_name(0)
    peak = bandwidth_of(name)
    dtype = torch.float16
    hidden = 4096
    rows = []
    for batch in (1, 8, 32, 64, 128, 256):
        for adapters in sorted({1, min(batch, 32), batch}):
            for rank in (8, 16, 64):
                x, a, b, slots, offsets, ranks, scales = case(batch, adapters, rank, hidden, dtype)
                out = torch.zeros(batch, hidden, device="cuda", dtype=dtype)
                shrunk = lora_shrink_triton(x, a, slots, offsets, ranks, rank)
                t_shrink = timed(lambda: lora_shrink_triton(x, a, slots, offsets, ranks, rank))
                t_expand = timed(lambda: lora_expand_triton(out, shrunk, b, slots, offsets, ranks, scales))
                r_shrink = timed(lambda: lora_shrink_ref(x, a, slots, offsets, ranks, rank), 5)
                r_expand = timed(lambda: lora_expand_ref(out, shrunk, b, slots, offsets, ranks, scales), 5)
                used = min(adapters, batch)
                # Bytes that must move: each distinct adapter's A and B, plus activations in and out.
                moved = 2 * used * rank * hidden * 2 + batch * hidden * 2 * 3
                seconds = t_shrink + t_expand
                rows.append(("decode", batch, adapters, rank, seconds * 1e6, moved / seconds / peak,
                             (r_shrink + r_expand) / seconds))
    for segments in (8, 16, 64):
        for rank in (16, 64):
            x, a, b, slots, offsets, ranks, scales = case(2048, segments, rank, hidden, dtype, segments)
            seg_starts, seg_slots = segments_from_token_slots(slots)
            out = torch.zeros(2048, hidden, device="cuda", dtype=dtype)
            shrunk = lora_shrink_sgmv_triton(x, a, seg_starts, seg_slots, offsets, ranks, rank)
            t = timed(lambda: lora_shrink_sgmv_triton(x, a, seg_starts, seg_slots, offsets, ranks, rank)) + timed(
                lambda: lora_expand_sgmv_triton(out, shrunk, b, seg_starts, seg_slots, offsets, ranks, scales))
            r = timed(lambda: lora_shrink_sgmv_ref(x, a, seg_starts, seg_slots, offsets, ranks, rank), 5) + timed(
                lambda: lora_expand_sgmv_ref(out, shrunk, b, seg_starts, seg_slots, offsets, ranks, scales), 5)
            moved = 2 * segments * rank * hidden * 2 + 2048 * hidden * 2 * 3
            rows.append(("prefill", 2048, segments, rank, t * 1e6, moved / t / peak, r / t))
    lines = [f"## Measured on {name} (fp16, hidden {hidden}; peak bandwidth {peak / 1e12:.2f} TB/s)", "",
             "| phase | tokens | adapters | rank | µs (shrink+expand) | fraction of HBM bandwidth | × torch reference |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p} | {t} | {a} | {r} | {us:.1f} | {frac:.2f} | {speed:.1f} |" for p, t, a, r, us, frac, speed in rows]
    lines += ["", f"GPU kernel tests: {'passed' if tests.returncode == 0 else 'FAILED'}."]
    table = "\n".join(lines)
    print(table)
    text = DOC.read_text()
    start, end = "<!-- gpu:start -->", "<!-- gpu:end -->"
    DOC.write_text(text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):])
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
