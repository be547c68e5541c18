"""The CPU residual add + RMSNorm kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch

from longtail.kernels.norm_cpu import (
    NormShapeError,
    add_rms_norm,
    add_rms_norm_ref,
    available,
)

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the CPU kernel cannot be built")

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 130])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_equals_the_reference(dtype, rows, with_delta):
    generator = torch.Generator().manual_seed(rows)
    hidden = 576
    residual = (torch.randn(rows, hidden, generator=generator) * 3).to(dtype)
    delta = torch.randn(rows, hidden, generator=generator).to(dtype) if with_delta else None
    weight = torch.randn(hidden, generator=generator).to(dtype)
    ours_residual, theirs_residual = residual.clone(), residual.clone()
    ours = add_rms_norm(ours_residual, delta, weight, 1e-5)
    theirs = add_rms_norm_ref(theirs_residual, delta, weight, 1e-5)
    assert torch.equal(ours_residual, theirs_residual)  # the residual add rounds exactly as torch's
    torch.testing.assert_close(ours.float(), theirs.float(), **TOLERANCE[dtype])


def test_add_rms_norm_reads_strided_rows_of_a_wider_tensor():
    generator = torch.Generator().manual_seed(4)
    wide = torch.randn(5, 40, generator=generator)
    delta = wide[:, 8:24]  # rows 40 elements apart
    residual = torch.randn(5, 16, generator=generator)
    weight = torch.randn(16, generator=generator)
    expected_residual = residual.clone()
    expected = add_rms_norm_ref(expected_residual, delta.contiguous(), weight, 1e-6)
    got = add_rms_norm(residual, delta, weight, 1e-6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(residual, expected_residual)


def test_the_same_bits_on_one_thread_and_on_four():
    generator = torch.Generator().manual_seed(9)
    residual, delta = torch.randn(128, 576, generator=generator), torch.randn(128, 576, generator=generator)
    weight = torch.randn(576, generator=generator)
    results = []
    before = torch.get_num_threads()
    for count in (1, 4):
        torch.set_num_threads(count)
        try:
            copy = residual.clone()
            results.append((add_rms_norm(copy, delta, weight, 1e-5), copy))
        finally:
            torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_bad_shapes_are_refused():
    with pytest.raises(NormShapeError):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(8), 1e-5)
    with pytest.raises(NormShapeError):
        add_rms_norm(torch.zeros(2, 8), None, torch.zeros(7), 1e-5)
    with pytest.raises(NormShapeError):
        add_rms_norm(torch.zeros(2, 8, dtype=torch.float16), None, torch.zeros(8, dtype=torch.float16), 1e-5)
    with pytest.raises(NormShapeError):
        add_rms_norm(torch.zeros(8, 4).t(), None, torch.zeros(8), 1e-5)  # columns not contiguous
