"""The paged-attention kernels compile for an H100/H200 (sm_90) without a GPU: triton's own ptxas, ahead of time.

This catches what the interpreter cannot: type errors in the compiled IR, tl.dot shape rules, and shared
memory past the 227 KiB an sm_90 block may use. It does not run them (that needs `scripts/gpu_check.sh`).
The kernels must be compiled in a process where TRITON_INTERPRET is 0 (the test session sets it to 1
before they are defined), so the test runs this file as a script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_LIMIT = 227 * 1024


def compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longtail.kernels import paged_attention as pa

    target = GPUTarget("cuda", 90, 32)
    results = []

    def build(fn, types, constexprs, label, **options):
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                options=options)
        results.append({"kernel": label, "shared": kernel.metadata.shared})

    # (dtype, group, head_dim): the engine's bf16 at Llama-3.1-8B / 3.2-1B layouts (4 query heads per KV head,
    # 128 / 64), a padded group of 3, fp16, and fp32 at the largest tiles (the most shared memory), MHA.
    cases = (("bf16", 4, 128), ("bf16", 4, 64), ("bf16", 3, 128), ("fp16", 4, 128), ("fp32", 4, 128),
             ("fp32", 1, 64))
    for dtype, group, head_dim in cases:
        precision = "ieee" if dtype == "fp32" else "tf32"
        pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                    "tables_ptr": "*i64", "lens_ptr": "*i64", "starts_ptr": "*i64", "prefix_ptr": "*i64",
                    "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "scale_log2": "fp32"}
        build(pa._decode_kernel, pointers,
              dict(GROUP=group, BLOCK_H=pa._group_block(group), HEAD_DIM=head_dim, BLOCK_D=pa._head_block(head_dim),
                   BLOCK_SIZE=16, BLOCK_N=64, DIRECT=group == 1, DOT_PRECISION=precision, UPCAST=False),
              f"decode {dtype} group {group} D {head_dim}", num_warps=4, num_stages=2)
        group_pad = triton.next_power_of_2(group)
        build(pa._extend_kernel, pointers,
              dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=64 // group_pad, HEAD_DIM=head_dim,
                   BLOCK_D=pa._head_block(head_dim), BLOCK_SIZE=16, BLOCK_N=32 if dtype == "fp32" else 64,
                   DOT_PRECISION=precision, UPCAST=False),
              f"extend {dtype} group {group} D {head_dim}", num_warps=4, num_stages=2)
    build(pa._decode_merge_kernel, {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16"},
          dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64), "merge bf16")
    return results


def _have_ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _have_ptxas(), reason="this triton has no bundled ptxas for an ahead-of-time build")
def test_kernels_compile_for_sm90_within_shared_memory():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-P", __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(compiled) == 6 * 2 + 1
    for kernel in compiled:
        assert kernel["shared"] <= SHARED_LIMIT, kernel


if __name__ == "__main__":
    print(json.dumps(compile_all()))
