"""The CPU engine's residual add + RMSNorm in C (`csrc/norm_cpu.c`), beside its torch reference.

The reference is HF's LlamaRMSNorm (the code the model ran before); tests compare the two. A
SiLU(gate) * up kernel was tried beside it and dropped: torch's vectorised `silu` is 2-6x faster
than its scalar `expf` from 8 rows up (docs/serving.md). Built like the other CPU kernels (`kernels.native`:
system C compiler on first use, cached under `$LONGTAIL_HOME/kernels/`, `LONGTAIL_KERNELS=torch`
turns it off).
"""

from __future__ import annotations

import ctypes

import torch

from longtail.kernels.native import CSRC, EXACT_FLAGS, NativeLibrary

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class NormShapeError(ValueError):
    """Tensors handed to a layer-glue kernel disagree on a shape, dtype or layout."""


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.longtail_add_rms_norm.restype = ctypes.c_int
    library.longtail_add_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_float,
                                              ctypes.c_int, i64]


_native = NativeLibrary(CSRC / "norm_cpu.c", _declare, EXACT_FLAGS)
_load = _native.get


def available() -> bool:
    """True when the C kernel is built (or builds now) and `LONGTAIL_KERNELS` does not force torch."""
    return _native.available()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def add_rms_norm_ref(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """residual += delta (in place, when given); returns RMSNorm(residual)."""
    if delta is not None:
        residual.add_(delta)
    return rms_norm_ref(residual, weight, eps)


def _rows(tensor: torch.Tensor, width: int, dtype: torch.dtype, what: str) -> None:
    if (tensor.dim() != 2 or tensor.shape[1] != width or tensor.stride(1) != 1 or tensor.dtype != dtype
            or tensor.device.type != "cpu"):
        raise NormShapeError(f"{what}: expected [rows, {width}] {dtype} CPU rows, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """`add_rms_norm_ref` in one pass: residual [T, H] updated in place, the normed rows returned."""
    library = _load()
    if library is None:
        raise RuntimeError("the CPU norm kernel is not available (see available())")
    dtype, hidden = residual.dtype, residual.shape[-1]
    if dtype not in _DTYPES:
        raise NormShapeError(f"add_rms_norm: fp32 or bf16 only, got {dtype}")
    _rows(residual, hidden, dtype, "add_rms_norm residual")
    if delta is not None:
        _rows(delta, hidden, dtype, "add_rms_norm delta")
        if delta.shape[0] != residual.shape[0]:
            raise NormShapeError("add_rms_norm: residual and delta have different row counts")
    if weight.shape != (hidden,) or weight.dtype != dtype or not weight.is_contiguous():
        raise NormShapeError(f"add_rms_norm: weight must be a contiguous [{hidden}] {dtype} vector")
    out = torch.empty(residual.shape, dtype=dtype)
    code = library.longtail_add_rms_norm(
        residual.data_ptr(), residual.stride(0), delta.data_ptr() if delta is not None else None,
        delta.stride(0) if delta is not None else 0, weight.data_ptr(), out.data_ptr(), out.stride(0),
        residual.shape[0], hidden, eps, _DTYPES[dtype], torch.get_num_threads())
    if code:
        raise NormShapeError(f"add_rms_norm: error {code}")
    return out
