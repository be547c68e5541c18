"""The CPU engine's LoRA for short runs of tokens: a C kernel (`csrc/lora_runs.c`) beside its torch reference.

A decode step on a CPU holds one run of a few tokens per adapter, and every
run meets one small matmul pair per projection per layer. As torch calls each
pair costs ~13 us of dispatch whatever its size, which made half of the LoRA
time; the kernel applies a layer's whole projection group (q/k/v, o, gate/up,
down) to every run in one call, so what remains is reading each adapter's rows
once. Long runs (prompt chunks) stay on torch's matmul here, which tiles them well. Where the model's fp32
weights are in the packed GEMM's panels, the same pair math runs inside the GEMM instead
(`kernels.gemm_cpu.gemm_lora`), its factors prefetched while the base output is computed, and there long runs
go too: their expand becomes more of the GEMM's tiles.
fp32 and bf16 (the model's dtype; bf16 rounds where torch's bf16 matmuls do): in bf16
torch's per-run matmuls held adapters-on throughput at 0.24x of base on a 38-adapter trace.

The reference is `kernels.lora.add_lora_runs` (same math, one torch matmul pair
per run); tests compare the two. The kernel is built and loaded by
`kernels.native` (the system C compiler on first use, cached under
`$LONGTAIL_HOME/kernels/`), and ctypes releases the GIL while it runs. It splits its (run, projection)
pairs among `torch.get_num_threads()` OpenMP threads: one adapter's rows are a
memory read that one core cannot saturate the bus with. Without a compiler, or with
`LONGTAIL_KERNELS=torch`, `native_available()` is False and callers use the reference.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import torch

from longtail.kernels import native
from longtail.kernels.lora import LoraShapeError, Runs
from longtail.kernels.native import CSRC, FLAGS, NativeLibrary

# Runs longer than this go to torch (unless the fused GEMM takes them, `split_runs`): a prompt chunk is a real
# matmul, where a tiled BLAS beats a plain loop.
MAX_NATIVE_RUN = 16

ERRORS = {-1: "a run names a slot outside the table", -2: "a projection's columns fall outside the output",
           -3: "a run's tokens fall outside the batch", -4: "no memory for the kernel's scratch"}
# The dtypes the kernel reads and writes (its `dtype` code); arithmetic is fp32 in both.
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _declare(library: ctypes.CDLL) -> None:
    function = library.longtail_lora_runs
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]


SOURCE = CSRC / "lora_runs.c"
_native = NativeLibrary(SOURCE, _declare)


def build(target: Path, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile this kernel (or `source`) into `target`; see `kernels.native.build`."""
    return native.build(target, source, flags)


def native_available() -> bool:
    """True when the C kernel is built (or builds now) and `LONGTAIL_KERNELS` does not force the torch reference."""
    return _native.available()


@dataclasses.dataclass(frozen=True)
class RunTable:
    """One layer's projection group as the kernel reads it: per (projection, slot) the rows' addresses.

    Holds the weight buffers it points into, so they outlive the table; rebuild it whenever
    the buffers move (an adapter loaded or freed, a buffer grown).
    """

    in_dim: int
    slot_count: int
    dtype: torch.dtype
    out_cols: torch.Tensor   # [P, 2] int64: first column, width
    a_addr: torch.Tensor     # [P, S] int64
    b_addr: torch.Tensor     # [P, S] int64
    ranks: torch.Tensor      # [P, S] int64
    scales: torch.Tensor     # [P, S] float32
    holds: tuple[torch.Tensor, ...]


def run_table(projections: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int], list[float], int]]
              ) -> RunTable:
    """A table from (a_rows [rows, in], b_rows [rows, width], slot offsets, slot ranks, slot scales, first column)
    per projection; every projection reads the same input, so `in` must agree."""
    if not projections:
        raise LoraShapeError("run_table: no projections")
    in_dim = projections[0][0].shape[1]
    slot_count = len(projections[0][2])
    dtype = projections[0][0].dtype
    if dtype not in DTYPES:
        raise LoraShapeError(f"run_table: the CPU kernel takes fp32 or bf16 buffers, got {dtype}")
    item = projections[0][0].element_size()
    cols, a_addr, b_addr, ranks, scales, holds = [], [], [], [], [], []
    for a_rows, b_rows, offsets, slot_ranks, slot_scales, column in projections:
        if a_rows.dtype != dtype or b_rows.dtype != dtype or a_rows.device.type != "cpu" or b_rows.device.type != "cpu":
            raise LoraShapeError("run_table: every buffer must be a CPU tensor of one dtype (fp32 or bf16)")
        if not (a_rows.is_contiguous() and b_rows.is_contiguous()):
            raise LoraShapeError("run_table: weight buffers must be contiguous")
        if a_rows.shape[1] != in_dim or a_rows.shape[0] != b_rows.shape[0]:
            raise LoraShapeError(f"run_table: A {tuple(a_rows.shape)} and B {tuple(b_rows.shape)} disagree "
                                 f"(input width {in_dim})")
        if len(offsets) != slot_count or len(slot_ranks) != slot_count or len(slot_scales) != slot_count:
            raise LoraShapeError("run_table: every projection needs one offset, rank and scale per slot")
        width = b_rows.shape[1]
        for offset, rank in zip(offsets, slot_ranks, strict=True):  # the kernel trusts these rows
            if rank and not 0 <= offset <= offset + rank <= a_rows.shape[0]:
                raise LoraShapeError(f"run_table: rows {offset}:{offset + rank} outside a buffer of "
                                     f"{a_rows.shape[0]} rows")
        a_base, b_base = a_rows.data_ptr(), b_rows.data_ptr()
        placed = list(zip(offsets, slot_ranks, strict=True))
        cols.append([column, width])
        a_addr.append([a_base + offset * in_dim * item if rank else 0 for offset, rank in placed])
        b_addr.append([b_base + offset * width * item if rank else 0 for offset, rank in placed])
        ranks.append(list(slot_ranks))
        scales.append([float(s) for s in slot_scales])
        holds += [a_rows, b_rows]
    return RunTable(in_dim, slot_count, dtype, torch.tensor(cols, dtype=torch.int64), torch.tensor(a_addr, dtype=torch.int64),
                    torch.tensor(b_addr, dtype=torch.int64), torch.tensor(ranks, dtype=torch.int64),
                    torch.tensor(scales, dtype=torch.float32), tuple(holds))


def split_runs(runs: Runs, fused: bool = False) -> tuple[torch.Tensor | None, Runs]:
    """(short runs as the kernel's [n, 3] int64 table or None, long runs for the torch reference).

    `fused`: the model's matmuls are the packed GEMM (`kernels.gemm_cpu.gemm_lora`), whose tiles take long runs
    too (their expand as more GEMM tiles): every run goes to the kernel and none to torch."""
    if fused:
        return (torch.tensor(runs, dtype=torch.int64) if runs else None), []
    short = [run for run in runs if run[2] - run[1] <= MAX_NATIVE_RUN]
    long = [run for run in runs if run[2] - run[1] > MAX_NATIVE_RUN]
    return (torch.tensor(short, dtype=torch.int64) if short else None), long


def check_runs(caller: str, runs: torch.Tensor) -> None:
    """Raise LoraShapeError unless `runs` is laid out as the kernels read it (the C code checks the values)."""
    if runs.dtype != torch.int64 or runs.dim() != 2 or runs.shape[1] != 3 or not runs.is_contiguous():
        raise LoraShapeError(f"{caller}: runs must be a contiguous [n, 3] int64 tensor")


def add_lora_runs_native(out: torch.Tensor, x: torch.Tensor, runs: torch.Tensor, table: RunTable) -> None:
    """out[t, cols_p] += scale_{p,s} * (x[t] A_{p,s}^T) B_{p,s}^T for every projection p and run (s, begin, end).

    `runs` comes from `split_runs`; `table` from `run_table`. Raises LoraShapeError on a
    mismatch instead of touching memory it does not own.
    """
    library = _native.get()
    if library is None:
        raise RuntimeError("the CPU LoRA kernel is not available (see native_available)")
    if x.dtype != table.dtype or out.dtype != table.dtype or x.device.type != "cpu" or out.device.type != "cpu":
        raise LoraShapeError(f"add_lora_runs_native: x and out must be CPU tensors of the table's dtype ({table.dtype})")
    if x.dim() != 2 or out.dim() != 2 or x.stride(1) != 1 or out.stride(1) != 1:
        raise LoraShapeError("add_lora_runs_native: x and out must be 2-D with contiguous rows")
    if x.shape[1] != table.in_dim or x.shape[0] != out.shape[0]:
        raise LoraShapeError(f"add_lora_runs_native: x {tuple(x.shape)} and out {tuple(out.shape)} do not fit a "
                             f"table of input width {table.in_dim}")
    check_runs("add_lora_runs_native", runs)
    code = library.longtail_lora_runs(
        x.data_ptr(), x.stride(0), x.shape[1], out.data_ptr(), out.stride(0), out.shape[1], out.shape[0],
        runs.data_ptr(), runs.shape[0], table.out_cols.shape[0], table.slot_count, table.out_cols.data_ptr(),
        table.a_addr.data_ptr(), table.b_addr.data_ptr(), table.ranks.data_ptr(), table.scales.data_ptr(),
        DTYPES[table.dtype], torch.get_num_threads())
    if code:
        raise LoraShapeError(f"add_lora_runs_native: {ERRORS.get(code, f'error {code}')}")
