"""The small-batch CPU linear kernel (kernels/csrc/linear_small.c) against F.linear, its reference."""

from __future__ import annotations

import pytest
import torch

from longtail.kernels.linear_cpu import MAX_ROWS, LinearShapeError, available, fits, linear_ref, linear_small

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the CPU linear kernel cannot be built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, MAX_ROWS])
@pytest.mark.parametrize(("out_features", "hidden"), [(1, 8), (7, 13), (64, 576), (259, 1536), (4099, 96)])
def test_matches_torch(dtype, rows, out_features, hidden):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features + hidden)
    weight = torch.randn(out_features, hidden, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    # x as a slice of wider rows: the kernel honours the row stride
    x = torch.randn(rows, hidden + 5, generator=generator).to(dtype)[:, 2:2 + hidden]
    for b in (None, bias):
        got, want = linear_small(x, weight, b), linear_ref(x, weight, b)
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:  # summation order differs from the BLAS's: ~1e-6 relative
            torch.testing.assert_close(got, want, atol=2e-5 * hidden ** 0.5, rtol=1e-5)
        else:  # both accumulate in fp32 and round once; a rounding boundary may fall either side
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * hidden ** 0.5, rtol=1e-2)


def test_threads_do_not_change_the_result():
    generator = torch.Generator().manual_seed(3)
    weight, x = torch.randn(3000, 576, generator=generator), torch.randn(3, 576, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_small(x, weight)
        torch.set_num_threads(max(2, threads))
        many = linear_small(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("case", ["too many rows", "dtype mismatch", "transposed weight", "width", "bias", "mkldnn"])
def test_refuses_what_it_cannot_read(case):
    weight, x, bias = torch.randn(16, 32), torch.randn(2, 32), None
    if case == "too many rows":
        x = torch.randn(MAX_ROWS + 1, 32)
    elif case == "dtype mismatch":
        x = x.to(torch.bfloat16)
    elif case == "transposed weight":
        weight = torch.randn(32, 16).t()
    elif case == "width":
        x = torch.randn(2, 31)
    elif case == "bias":
        bias = torch.randn(15)
    elif case == "mkldnn":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN")
        weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    if case != "bias":
        assert not fits(x, weight)
    with pytest.raises(LinearShapeError):
        linear_small(x, weight, bias)
