"""GPU check for the multi-LoRA kernels: the GPU tests, then a bandwidth and speed-up table.

One prepared command for a CUDA machine, in at most about 5 minutes:
  1. `pytest -m gpu tests/kernels`: fp16/bf16 kernels against the torch reference, compiled;
  2. decode (BGMV): batch 1–256, distinct adapters 1–256, ranks 8/16/64 and mixed, hidden 4096;
  3. prefill (SGMV): 2,048 tokens in 8–64 segments, ranks 8/16/64;
each timed against the torch reference in the same run (`triton.testing.do_bench`,
L2 flushed between repeats), with the bytes each call must move as a fraction
of the device's peak memory bandwidth and of a device-to-device copy measured
here. Writes the table into docs/kernels.md between the `gpu:start` / `gpu:end`
markers (`scripts.docs_section.write_section`). Exits with status 2 and a message when there is no CUDA device.

    python scripts/gpu_check.py [--skip-tests] [--budget-seconds 270]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from longtail.scripts.docs_section import write_section

ROOT = Path(__file__).resolve().parent.parent

DOC = ROOT / "docs" / "kernels.md"
HIDDEN = 4096
DTYPE = torch.float16
ELEMENT = 2  # bytes per fp16 element
# Vendor peak memory bandwidth in bytes/s; the first substring found in the device name wins.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12), ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("L4", 0.3e12), ("4090", 1.008e12), ("3090", 0.936e12),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed configuration: Triton and torch-reference microseconds and the bytes it must move."""

    phase: str
    tokens: int
    adapters: int
    rank: str
    triton_us: float
    torch_us: float
    bytes_moved: int


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH:
        if key in name:
            return value
    return None


def bench_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Achieved bytes/s of a 1 GiB device-to-device copy (read + write), the practical ceiling."""
    source = torch.empty(2**29, dtype=DTYPE, device="cuda")
    target = torch.empty_like(source)
    seconds = bench_us(lambda: target.copy_(source)) / 1e6
    return 2 * source.numel() * ELEMENT / seconds


def make_weights(adapter_ranks: list[int]):
    offsets, total = [], 0
    for rank in adapter_ranks:
        offsets.append(total)
        total += rank
    a_rows = torch.randn(total, HIDDEN, device="cuda", dtype=DTYPE) * 0.02
    b_rows = torch.randn(total, HIDDEN, device="cuda", dtype=DTYPE) * 0.02
    return (a_rows, b_rows, torch.tensor(offsets, device="cuda"),
            torch.tensor(adapter_ranks, device="cuda"), torch.ones(len(adapter_ranks), device="cuda"))


def lora_bytes(tokens: int, used_ranks: list[int]) -> int:
    """Minimum traffic of shrink + expand: each used adapter's A and B rows once, x read, out read and written."""
    weights = 2 * sum(used_ranks) * HIDDEN
    activations = 3 * tokens * HIDDEN
    shrunk = 2 * tokens * max(used_ranks)
    return (weights + activations + shrunk) * ELEMENT


def time_decode(batch: int, adapters: int, rank_label: str) -> Row:
    from longtail.kernels.lora import lora_expand_ref, lora_shrink_ref
    from longtail.kernels.lora_triton import lora_expand_triton, lora_shrink_triton

    ranks = [8, 16, 64] if rank_label == "mixed" else [int(rank_label)]
    adapter_ranks = [ranks[i % len(ranks)] for i in range(adapters)]
    a_rows, b_rows, offsets, ranks_t, scales = make_weights(adapter_ranks)
    max_rank = max(adapter_ranks)
    x = torch.randn(batch, HIDDEN, device="cuda", dtype=DTYPE)
    slots = torch.arange(batch, device="cuda") % adapters
    out = torch.zeros(batch, HIDDEN, device="cuda", dtype=DTYPE)
    shrunk = lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, max_rank)

    def run_triton():
        s = lora_shrink_triton(x, a_rows, slots, offsets, ranks_t, max_rank)
        lora_expand_triton(out, s, b_rows, slots, offsets, ranks_t, scales)

    def run_torch():
        s = lora_shrink_ref(x, a_rows, slots, offsets, ranks_t, max_rank)
        lora_expand_ref(out, s, b_rows, slots, offsets, ranks_t, scales)

    del shrunk
    used = [adapter_ranks[i] for i in range(min(batch, adapters))]
    return Row("decode", batch, adapters, rank_label, bench_us(run_triton), bench_us(run_torch),
               lora_bytes(batch, used))


def time_prefill(segments: int, rank: int, tokens: int = 2048) -> Row:
    from longtail.kernels.lora import lora_expand_sgmv_ref, lora_shrink_sgmv_ref, segments_from_token_slots
    from longtail.kernels.lora_triton import lora_expand_sgmv_triton, lora_shrink_sgmv_triton

    a_rows, b_rows, offsets, ranks_t, scales = make_weights([rank] * segments)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
    slots = torch.arange(tokens, device="cuda") * segments // tokens  # equal runs, one adapter each
    seg_starts, seg_slots = segments_from_token_slots(slots)
    out = torch.zeros(tokens, HIDDEN, device="cuda", dtype=DTYPE)

    def run_triton():
        s = lora_shrink_sgmv_triton(x, a_rows, seg_starts, seg_slots, offsets, ranks_t, rank)
        lora_expand_sgmv_triton(out, s, b_rows, seg_starts, seg_slots, offsets, ranks_t, scales)

    def run_torch():
        s = lora_shrink_sgmv_ref(x, a_rows, seg_starts, seg_slots, offsets, ranks_t, rank)
        lora_expand_sgmv_ref(out, s, b_rows, seg_starts, seg_slots, offsets, ranks_t, scales)

    return Row("prefill", tokens, segments, str(rank), bench_us(run_triton), bench_us(run_torch),
               lora_bytes(tokens, [rank] * segments))


def run_gpu_tests() -> tuple[int, float]:
    began = time.perf_counter()
    # tests/conftest.py defaults TRITON_INTERPRET to 1; the GPU tests must compile.
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p",
                             "no:cacheprovider"], cwd=ROOT, env=env, timeout=150)
    return result.returncode, time.perf_counter() - began


def render(rows: list[Row], name: str, peak: float | None, copy: float, tests: str, truncated: bool) -> str:
    peak_text = f"{peak / 1e12:.2f} TB/s vendor peak" if peak else "vendor peak unknown for this name"
    lines = [
        f"Measured on **{name}** ({peak_text}; a device-to-device copy reached {copy / 1e12:.2f} TB/s), "
        f"fp16, hidden {HIDDEN}, torch {torch.__version__}. GPU kernel tests: {tests}.",
        "",
        "| phase | tokens | adapters | rank | Triton µs | torch ref µs | × torch | GB/s | of peak | of copy |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        achieved = row.bytes_moved / (row.triton_us / 1e6)
        of_peak = f"{achieved / peak:.0%}" if peak else "n/a"
        lines.append(f"| {row.phase} | {row.tokens} | {row.adapters} | {row.rank} | {row.triton_us:.1f} | "
                     f"{row.torch_us:.1f} | {row.torch_us / row.triton_us:.1f} | {achieved / 1e9:.0f} | "
                     f"{of_peak} | {achieved / copy:.0%} |")
    # The targets: decode at batch >= 32 where weights dominate the bytes (as many adapters as tokens).
    bound = [r for r in rows if r.phase == "decode" and r.tokens >= 32 and r.adapters >= 32]
    if bound and peak:
        worst = min(r.bytes_moved / (r.triton_us / 1e6) / peak for r in bound)
        slowest = min(r.torch_us / r.triton_us for r in bound)
        lines += ["", f"Decode at batch ≥ 32 with ≥ 32 distinct adapters: worst {worst:.0%} of peak bandwidth "
                      f"(target ≥ 60%), worst {slowest:.1f}× the torch reference (target ≥ 5×)."]
    lines += ["", "Bytes counted: each used adapter's A and B rank rows once, x read, the output read and "
                  "written, the shrunk activations written and read. Few-adapter rows move few bytes and are "
                  "launch-bound, so their fraction is low by nature."]
    if truncated:
        lines += ["", "The run hit its time budget; the rows above are the ones measured."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="time only, without the pytest -m gpu run")
    parser.add_argument("--budget-seconds", type=float, default=270.0, help="stop timing new rows after this")
    parser.add_argument("--no-write", action="store_true", help="print the table without touching docs/")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); nothing was run or "
              "measured. Run it on a GPU machine with a CUDA build of torch.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_check: unsetting TRITON_INTERPRET so the kernels compile for the GPU", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "0"
    began = time.perf_counter()
    if args.skip_tests:
        tests_status, tests_rc = "not run (--skip-tests)", 0
    else:
        tests_rc, seconds = run_gpu_tests()
        tests_status = f"{'passed' if tests_rc == 0 else 'FAILED'} in {seconds:.0f} s"
    name = torch.cuda.get_device_name(0)
    peak, copy = peak_bandwidth(name), copy_bandwidth()
    plan = [("decode", batch, adapters, rank) for batch in (1, 8, 32, 64, 128, 256)
            for adapters in sorted({min(a, batch) for a in (1, 8, 32, 256)}) for rank in ("8", "16", "64", "mixed")]
    plan += [("prefill", 2048, segments, rank) for segments in (8, 16, 32, 64) for rank in ("8", "16", "64")]
    rows, truncated = [], False
    for phase, tokens, adapters, rank in plan:
        if time.perf_counter() - began > args.budget_seconds:
            truncated = True
            break
        row = time_decode(tokens, adapters, rank) if phase == "decode" else time_prefill(adapters, int(rank))
        rows.append(row)
        print(f"{phase:7} tokens={tokens:5} adapters={adapters:4} rank={rank:5} triton={row.triton_us:8.1f} µs "
              f"torch={row.torch_us:9.1f} µs  ×{row.torch_us / row.triton_us:.1f}", flush=True)
    table = render(rows, name, peak, copy, tests_status, truncated)
    print(table)
    if not args.no_write:
        write_section(DOC, "gpu", table)
        print(f"gpu_check: table written to {DOC.relative_to(ROOT)} in {time.perf_counter() - began:.0f} s")
    return tests_rc


if __name__ == "__main__":
    sys.exit(main())
