"""The CPU engine's decode matmuls in C (`csrc/linear_small.c`), beside their torch reference.

With a few rows a linear layer reads its whole weight to do little arithmetic; the C kernel streams
each weight row once into the dot products of every row of x, where torch's sgemm reached a third of
the memory bandwidth (docs/serving.md). Used for at most `MAX_ROWS` rows, fp32 or bf16, plain
(unpacked) weights; more rows are torch's (a blocked GEMM is faster once arithmetic dominates). Built
like the other CPU kernels (`kernels.native`; `LONGTAIL_KERNELS=torch` turns it off).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from longtail.kernels.native import CSRC, NativeLibrary

MAX_ROWS = 32  # the C kernel's own limit (csrc/linear_small.c)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class LinearShapeError(ValueError):
    """Tensors handed to the small-batch linear kernel disagree on a shape, dtype or layout."""


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.longtail_linear_small.restype = ctypes.c_int
    library.longtail_linear_small.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int, i64]


_native = NativeLibrary(CSRC / "linear_small.c", _declare)


def available() -> bool:
    """True when the C kernel is built (or builds now) and `LONGTAIL_KERNELS` does not force torch."""
    return _native.available()


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_small` takes these: a few CPU rows, fp32/bf16, a plain contiguous weight of that dtype."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.device.type == "cpu" and x.dtype in _DTYPES
            and weight.dtype == x.dtype and not weight.is_mkldnn and weight.dim() == 2 and weight.is_contiguous()
            and x.stride(1) == 1 and weight.shape[1] == x.shape[1])


def linear_small(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear_ref` for x [rows <= MAX_ROWS, hidden] against weight [out, hidden] (and bias [out])."""
    library = _native.get()
    if library is None:
        raise RuntimeError("the CPU linear kernel is not available (see available())")
    if not fits(x, weight):
        raise LinearShapeError(f"linear_small: x {tuple(x.shape)} {x.dtype} against weight {tuple(weight.shape)} "
                               f"{weight.dtype}: needs 1-{MAX_ROWS} contiguous CPU rows of the weight's dtype")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise LinearShapeError(f"linear_small: bias must be a contiguous [{weight.shape[0]}] {x.dtype} vector")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
    code = library.longtail_linear_small(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.data_ptr(),
                                         bias.data_ptr() if bias is not None else None, out.data_ptr(),
                                         out.stride(0), weight.shape[0], _DTYPES[x.dtype], torch.get_num_threads())
    if code == -2:
        raise MemoryError("linear_small: no scratch memory")
    if code:
        raise LinearShapeError(f"linear_small: error {code}")
    return out
