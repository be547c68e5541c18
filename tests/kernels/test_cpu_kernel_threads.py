"""The CPU C kernels share their work among torch's OpenMP threads: same bits at any thread count, one pool."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from longtail.kernels import attention_cpu, gemm_cpu, lora_cpu
from longtail.kernels.lora import runs_of

from .test_attention_cpu import paged_case
from .test_lora_cpu import projection_group

pytestmark = pytest.mark.skipif(not (attention_cpu.available() and lora_cpu.native_available()),
                                reason="no C compiler: the CPU kernels cannot be built")


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_our_kernels_add_no_openmp_runtime():
    """Our kernels link libgomp.so.1 by soname, so the loader reuses the copy torch brought: one thread pool.

    (Other wheels may bundle a renamed copy of their own, e.g. pydivsufsort's `libgomp-<hash>.so.1.0.0`; that
    one is theirs. What ours must not do is pull in a second `libgomp.so.1`, such as the system's.)
    """
    assert attention_cpu.available() and lora_cpu.native_available() and gemm_cpu.available()
    mapped = {Path(line.split()[-1]).resolve() for line in Path("/proc/self/maps").read_text().splitlines()
              if line.rstrip().endswith(("libgomp.so.1", "libiomp5.so"))}
    assert mapped == {(Path(torch.__file__).parent / "lib" / "libgomp.so.1").resolve()}, mapped


def test_decode_attention_gives_the_same_bits_on_one_thread_and_on_four():
    # 24 rows x 2 kv heads x ~150 positions: above the kernel's threshold for forking.
    lengths = [150 + 7 * i for i in range(24)]
    for dtype in (torch.float32, torch.bfloat16):
        query, keys, values, tables, context = paged_case(3, lengths, 6, 2, 32, 16, dtype)
        outs = []
        for count in (1, 4):
            out = torch.empty_like(query)
            with threads(count):
                attention_cpu.paged_decode_attention(out, query, keys, values, tables, context, 32 ** -0.5, 16)
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
        reference = attention_cpu.paged_decode_attention_ref(query, keys, values, tables, context, 32 ** -0.5, 16)
        torch.testing.assert_close(outs[1].float(), reference.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_rope_write_of_a_prompt_gives_the_same_bits_on_one_thread_and_on_four():
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, tokens = 6, 2, 16, 61
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator)
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 50
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(128, generator=generator)[:tokens].contiguous()
    results = []
    for count in (1, 4):
        mine = qkv.clone()
        caches = [torch.zeros(128, kv_heads, head_dim) for _ in range(2)]
        with threads(count):
            attention_cpu.rope_write(mine, heads, kv_heads, cos, sin, caches[0], caches[1], slots)
        results.append((mine, *caches))
    reference = [qkv.clone(), torch.zeros(128, kv_heads, head_dim), torch.zeros(128, kv_heads, head_dim)]
    attention_cpu.rope_write_ref(reference[0], heads, kv_heads, cos, sin, reference[1], reference[2], slots)
    for ours_one, ours_four, theirs in zip(results[0], results[1], reference, strict=True):
        assert torch.equal(ours_one, ours_four) and torch.equal(ours_four, theirs)


def test_lora_runs_give_the_same_bits_on_one_thread_and_on_four():
    slots = [0, 0, 1, 2, 2, 2, 3, -1, 1, 1, 3, 0]
    cases, parts, width = projection_group(5, len(slots), 48, [32, 16, 16], [8, 16, 0, 64], slots)
    x = cases[0].x
    runs, long = lora_cpu.split_runs(runs_of(slots))
    assert runs is not None and not long and runs.shape[0] > 2
    table = lora_cpu.run_table(parts)
    outs = []
    for count in (1, 4):
        out = torch.zeros(len(slots), width)
        with threads(count):
            lora_cpu.add_lora_runs_native(out, x, runs, table)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0


def test_gemm_gives_the_same_bits_on_any_thread_count():
    """Each thread owns whole panels (output columns), summed in k order: no result depends on the split."""
    generator = torch.Generator().manual_seed(3)
    packed, x = gemm_cpu.pack(torch.randn(3000, 576, generator=generator)), torch.randn(70, 576, generator=generator)
    results = []
    for count in (1, 2, 3):
        with threads(count):
            results.append(gemm_cpu.gemm(x, packed))
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_fused_gemm_lora_gives_the_same_bits_on_any_thread_count():
    """Threads own whole panels and whole (run, projection) pairs; the LoRA terms are added after a barrier."""
    from .test_gemm_lora_cpu import big_case

    weight, bias, x, runs, table, _ = big_case()
    packed = gemm_cpu.pack(weight)
    results = []
    for count in (1, 2, 3):
        with threads(count):
            results.append(gemm_cpu.gemm_lora(x, packed, bias, runs, table))
    assert all(torch.equal(results[0], other) for other in results[1:])
