"""The CPU engine's fp32 matmuls in C (`csrc/gemm_fp32.c`), beside their torch reference.

A register-blocked GEMM over weights packed once at load into panels of output columns: it beat torch's fp32
paths (MKL's sgemm on plain weights, oneDNN's packed inner product) at every batch size a step has on this
project's CPUs, from one row (a decode of one stream, bound by reading the weights) to the 128-row steps and
prompts where arithmetic dominates (docs/serving.md, "Fifth round"). Built like the other CPU kernels
(`kernels.native`; `LONGTAIL_KERNELS=torch` turns it off and the model keeps torch's matmuls).
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch
import torch.nn.functional as F

from longtail.kernels.lora import LoraShapeError
from longtail.kernels.lora_cpu import ERRORS, RunTable, check_runs
from longtail.kernels.native import CSRC, FLAGS, NativeLibrary


class GemmShapeError(ValueError):
    """Tensors handed to the packed GEMM disagree on a shape, dtype, device or layout."""


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.longtail_gemm_panel_width.restype = i64
    library.longtail_gemm_panel_width.argtypes = []
    library.longtail_gemm_pack.restype = None
    library.longtail_gemm_pack.argtypes = [ptr, i64, i64, ptr]
    library.longtail_gemm_packed.restype = ctypes.c_int
    library.longtail_gemm_packed.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64]
    library.longtail_gemm_packed_lora.restype = ctypes.c_int
    library.longtail_gemm_packed_lora.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64,
                                                  ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]


_native = NativeLibrary(CSRC / "gemm_fp32.c", _declare)


def library_with_flags(*extra: str) -> NativeLibrary:
    """The same kernel built with extra compiler flags (a test builds the AVX2 variant on an AVX-512 CPU)."""
    return NativeLibrary(CSRC / "gemm_fp32.c", _declare, (*FLAGS, *extra))


def available() -> bool:
    """True when the C kernel is built (or builds now) and `LONGTAIL_KERNELS` does not force torch."""
    return _native.available()


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A linear weight [out_features, in_features] in the kernel's panel layout: ceil(out / width) panels of
    `width` output columns, each k-major (`panels[p, k, j] = weight[p * width + j, k]`, zero past the end)."""

    panels: torch.Tensor
    out_features: int
    in_features: int
    library: NativeLibrary = dataclasses.field(default=_native, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype

    def numel(self) -> int:
        """Parameters of the weight it packs (the panels' zero padding is not a parameter)."""
        return self.out_features * self.in_features


def _library(library: NativeLibrary) -> ctypes.CDLL:
    loaded = library.get()
    if loaded is None:
        raise RuntimeError("the CPU GEMM kernel is not available (see available())")
    return loaded


def pack(weight: torch.Tensor, library: NativeLibrary = _native) -> PackedWeight:
    """`weight` [out, in] (fp32, CPU) in the panel layout; the plain tensor is not kept."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise GemmShapeError(f"pack: needs a 2-D fp32 CPU weight, got {tuple(weight.shape)} {weight.dtype} "
                             f"on {weight.device}")
    loaded = _library(library)
    width = loaded.longtail_gemm_panel_width()
    weight = weight.contiguous()
    out_features, in_features = weight.shape
    panels = torch.empty(-(-out_features // width), in_features, width, dtype=torch.float32)
    loaded.longtail_gemm_pack(weight.data_ptr(), out_features, in_features, panels.data_ptr())
    return PackedWeight(panels, out_features, in_features, library)


def gemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _operands(name: str, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x as the kernel reads it (rows with unit stride), after checking x and bias against the weight."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] != weight.in_features:
        raise GemmShapeError(f"{name}: x {tuple(x.shape)} {x.dtype} on {x.device} against a packed "
                             f"{weight.shape} weight: needs fp32 CPU rows of {weight.in_features}")
    if bias is not None and (bias.shape != (weight.out_features,) or bias.dtype != torch.float32
                             or not bias.is_contiguous()):
        raise GemmShapeError(f"{name}: bias must be a contiguous [{weight.out_features}] fp32 vector")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    return x


def gemm(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_ref` for x [rows, in] (fp32, CPU) against a packed weight (and bias [out])."""
    x = _operands("gemm", x, weight, bias)
    out = torch.empty((x.shape[0], weight.out_features), dtype=torch.float32)
    if not x.shape[0]:  # a step with no logits wanted (scoring) asks for none
        return out
    code = _library(weight.library).longtail_gemm_packed(
        x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.panels.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0), weight.out_features,
        torch.get_num_threads())
    if code:
        raise GemmShapeError(f"gemm: error {code}")
    return out


_LORA_ERRORS = {**ERRORS, -5: "bad sizes"}  # the LoRA kernel's codes, as the fused one shares its checks


def gemm_lora(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, runs: torch.Tensor,
              table: RunTable) -> torch.Tensor:
    """`gemm` plus, for every run (slot, begin, end) of `runs` and projection p of `table` (the group whose outputs
    this weight stacks), out[t, cols_p] += scale_{p,s} * (x[t] A_{p,s}^T) B_{p,s}^T: `kernels.lora_cpu`'s
    `add_lora_runs_native` fused into the matmul, so the factors stream in while the base output is computed.
    fp32 only; raises LoraShapeError when the table does not fit x or the weight."""
    x = _operands("gemm_lora", x, weight, bias)
    if table.dtype != torch.float32 or table.in_dim != weight.in_features:
        raise LoraShapeError(f"gemm_lora: a {table.dtype} table of input width {table.in_dim} against a packed "
                             f"fp32 {weight.shape} weight")
    check_runs("gemm_lora", runs)
    out = torch.empty((x.shape[0], weight.out_features), dtype=torch.float32)
    if not x.shape[0]:
        return out
    code = _library(weight.library).longtail_gemm_packed_lora(
        x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.panels.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0), weight.out_features,
        torch.get_num_threads(), runs.data_ptr(), runs.shape[0], table.out_cols.shape[0], table.slot_count,
        table.out_cols.data_ptr(), table.a_addr.data_ptr(), table.b_addr.data_ptr(), table.ranks.data_ptr(),
        table.scales.data_ptr())
    if code:
        raise LoraShapeError(f"gemm_lora: {_LORA_ERRORS.get(code, f'error {code}')}")
    return out
