"""The CPU fp32 GEMM over packed panels (kernels/csrc/gemm_fp32.c) against F.linear in fp64, its reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longtail.kernels.gemm_cpu import GemmShapeError, available, gemm, gemm_ref, library_with_flags, pack

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the CPU GEMM kernel cannot be built")


def _has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# The AVX-512 build tiles 12 x 32 with k in chunks of 768 and rows in blocks of 144; the AVX2 build 6 x 16 and
# blocks of 72. The shapes cross every edge: a partial row tile, a partial panel, a partial k chunk, two row blocks.
SHAPES = [(1, 8, 1), (7, 13, 5), (13, 576, 96), (145, 800, 33), (30, 1536, 259), (200, 96, 4099)]


def check(weight_library=None, rows=None):
    for rows_, hidden, out_features in SHAPES if rows is None else [(rows, 576, 100)]:
        generator = torch.Generator().manual_seed(rows_ * 1000 + out_features + hidden)
        weight = torch.randn(out_features, hidden, generator=generator)
        bias = torch.randn(out_features, generator=generator)
        # x as a slice of wider rows: the kernel honours the row stride
        x = torch.randn(rows_, hidden + 5, generator=generator)[:, 2:2 + hidden]
        packed = pack(weight) if weight_library is None else pack(weight, weight_library)
        assert packed.shape == (out_features, hidden) and packed.numel() == out_features * hidden
        for b in (None, bias):
            got = gemm(x, packed, b)
            want = gemm_ref(x.double(), weight.double(), None if b is None else b.double()).float()
            assert got.shape == want.shape and got.dtype == torch.float32
            # fp32 sums in k order against an fp64 reference: ~1e-6 relative to the terms' size
            torch.testing.assert_close(got, want, atol=1e-5 * hidden ** 0.5, rtol=1e-5)


def test_matches_torch():
    check()


@pytest.mark.parametrize("rows", range(1, 14))
def test_every_row_tile_size(rows):
    check(rows=rows)


@pytest.mark.skipif(not _has_avx512(), reason="this CPU builds the AVX2 variant already")
def test_the_avx2_build_matches_torch_too():
    """CI machines differ (an AVX2-only EPYC among them): the other tiling is checked here as well."""
    library = library_with_flags("-mno-avx512f")
    if library.get() is None:
        pytest.skip("the compiler cannot build without AVX-512")
    assert library.get().longtail_gemm_panel_width() == 16
    check(weight_library=library)


@pytest.mark.parametrize("case", ["bf16 weight", "1-D weight", "bf16 x", "width", "bias", "no rows", "transposed x"])
def test_refuses_what_it_cannot_read(case):
    weight, x, bias = torch.randn(16, 32), torch.randn(2, 32), None
    if case == "bf16 weight":
        with pytest.raises(GemmShapeError):
            pack(weight.to(torch.bfloat16))
        return
    if case == "1-D weight":
        with pytest.raises(GemmShapeError):
            pack(torch.randn(32))
        return
    packed = pack(weight)
    if case == "bf16 x":
        x = x.to(torch.bfloat16)
    elif case == "width":
        x = torch.randn(2, 31)
    elif case == "bias":
        bias = torch.randn(15)
    elif case == "no rows":  # an empty batch is an empty answer, not an error
        assert gemm(torch.randn(0, 32), packed).shape == (0, 16)
        return
    elif case == "transposed x":  # a view with a column stride: copied, not refused
        x = torch.randn(32, 2).t()
        torch.testing.assert_close(gemm(x, packed), gemm_ref(x, weight), atol=1e-4, rtol=1e-5)
        return
    with pytest.raises(GemmShapeError):
        gemm(x, packed, bias)
