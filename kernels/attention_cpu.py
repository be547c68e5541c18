"""The CPU engine's attention over the paged KV cache: a C kernel (`csrc/attention_cpu.c`) beside torch references.

Two calls per layer replace ~30 small torch calls:
- `rope_write`: rotates q and k in place inside the fused qkv output and copies k and v
  into their cache slots (reference: `rope_write_ref`, the model's former torch code);
- `paged_decode_attention`: every decode row attends to its context where it lies in the
  cache, following its block table (reference: `paged_decode_attention_ref`, a gather + SDPA).

The decode call takes (query, key_cache, value_cache, block_tables, context_lens, scale), the
shape a GPU paged-attention kernel takes too, so `serving/model.py` can pick a kernel per device.
Built by `kernels.native` (system C compiler on first use, cached per source, flags and CPU;
ctypes releases the GIL); `available()` is False without a compiler or with `LONGTAIL_KERNELS=torch`.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from longtail.kernels.native import CSRC, EXACT_FLAGS, NativeLibrary

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ERRORS = {-1: "a slot or block index falls outside the cache", -2: "unsupported head layout",
           -3: "a context length is 0 or longer than its block table", -4: "out of memory"}


class AttentionShapeError(ValueError):
    """Tensors handed to the attention kernel disagree on a shape, dtype or index range."""


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.longtail_rope_write.restype = ctypes.c_int
    library.longtail_rope_write.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int,
                                            i64]
    library.longtail_paged_decode.restype = ctypes.c_int
    library.longtail_paged_decode.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64,
                                              i64, ctypes.c_float, ctypes.c_int, i64]


# No FMA contraction: RoPE then rounds exactly as torch's separate multiply and add do.
_native = NativeLibrary(CSRC / "attention_cpu.c", _declare, EXACT_FLAGS)


def library_with_flags(*extra: str) -> NativeLibrary:
    """The same kernels built with extra compiler flags (a test builds the AVX2 variant on an AVX-512 CPU)."""
    return NativeLibrary(CSRC / "attention_cpu.c", _declare, (*EXACT_FLAGS, *extra))


_load = _native.get


def available() -> bool:
    """True when the C kernel is built (or builds now) and `LONGTAIL_KERNELS` does not force torch."""
    return _native.available()


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, dtype: torch.dtype) -> None:
    if key_cache.shape != value_cache.shape or key_cache.dim() != 3:
        raise AttentionShapeError(f"caches {tuple(key_cache.shape)} and {tuple(value_cache.shape)} must be "
                                  "one [slots, kv_heads, head_dim] shape")
    for cache in (key_cache, value_cache):
        if cache.dtype != dtype or cache.device.type != "cpu" or not cache.is_contiguous():
            raise AttentionShapeError(f"caches must be contiguous CPU {dtype} tensors")


def rope_write_ref(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor, write_slots: torch.Tensor) -> None:
    """Torch reference of `rope_write` (HF's rotate_half RoPE, then index_copy_ into the cache)."""
    tokens, head_dim = qkv.shape[0], cos.shape[-1]
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    cos, sin = cos.to(qkv.dtype)[:, None], sin.to(qkv.dtype)[:, None]
    for begin, count in ((0, heads), (q_width, kv_heads)):
        part = qkv[:, begin:begin + count * head_dim].view(tokens, count, head_dim)
        half = head_dim // 2
        rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
        part.copy_(part * cos + rotated * sin)
    key_cache.index_copy_(0, write_slots, qkv[:, q_width:q_width + kv_width].view(tokens, kv_heads, head_dim))
    value_cache.index_copy_(0, write_slots, qkv[:, q_width + kv_width:].view(tokens, kv_heads, head_dim))


def rope_write(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
               key_cache: torch.Tensor, value_cache: torch.Tensor, write_slots: torch.Tensor) -> None:
    """Rotate q and k in place in `qkv` [T, (heads + 2 kv_heads) * D]; write k and v to `write_slots` [T].

    cos, sin: [T, D] fp32. Raises AttentionShapeError instead of writing outside the cache.
    """
    library = _load()
    if library is None:
        raise RuntimeError("the CPU attention kernel is not available (see available())")
    head_dim = key_cache.shape[-1]
    _check_cache(key_cache, value_cache, qkv.dtype)
    tokens = qkv.shape[0]
    if (qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim
            or key_cache.shape[1] != kv_heads):
        raise AttentionShapeError(f"qkv {tuple(qkv.shape)} does not fit {heads} heads, {kv_heads} kv heads of "
                                  f"{head_dim}")
    for table in (cos, sin):
        if table.dtype != torch.float32 or not table.is_contiguous() or tuple(table.shape) != (tokens, head_dim):
            raise AttentionShapeError(f"cos/sin must be contiguous fp32 [{tokens}, {head_dim}]")
    if write_slots.dtype != torch.int64 or not write_slots.is_contiguous() or write_slots.shape != (tokens,):
        raise AttentionShapeError("write_slots must be a contiguous int64 vector, one slot per token")
    code = library.longtail_rope_write(qkv.data_ptr(), qkv.stride(0), tokens, heads, kv_heads, head_dim,
                                       cos.data_ptr(), sin.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                       key_cache.shape[0], write_slots.data_ptr(), _DTYPES[qkv.dtype],
                                       torch.get_num_threads())
    if code:
        raise AttentionShapeError(f"rope_write: {_ERRORS.get(code, f'error {code}')}")


def paged_decode_attention_ref(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               block_size: int) -> torch.Tensor:
    """Torch reference: gather each row's blocks into a padded copy, masked SDPA. query [B, H, D] -> [B, H, D]."""
    rows, width = block_tables.shape
    kv_heads, head_dim = key_cache.shape[1:]
    blocks_k = key_cache.view(-1, block_size, kv_heads, head_dim)
    blocks_v = value_cache.view(-1, block_size, kv_heads, head_dim)
    keys = blocks_k.index_select(0, block_tables.reshape(-1)).view(rows, width * block_size, kv_heads, head_dim)
    values = blocks_v.index_select(0, block_tables.reshape(-1)).view(rows, width * block_size, kv_heads, head_dim)
    mask = torch.arange(width * block_size, device=query.device)[None, :] < context_lens[:, None]
    attended = F.scaled_dot_product_attention(query[:, :, None], keys.permute(0, 2, 1, 3), values.permute(0, 2, 1, 3),
                                              attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return attended[:, :, 0]


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, block_size: int, library: NativeLibrary | None = None) -> None:
    """out[b] = attention of query[b] ([H, D]) over the first context_lens[b] positions of row b's block table.

    query, out: [B, H, D] with contiguous heads (rows may be strided, e.g. views into a fused qkv);
    key_cache, value_cache: [slots, KV, D]; block_tables [B, W] and context_lens [B] int64.
    `library`: another build of the kernels (`library_with_flags`).
    """
    library = (library or _native).get()
    if library is None:
        raise RuntimeError("the CPU attention kernel is not available (see available())")
    _check_cache(key_cache, value_cache, query.dtype)
    rows, heads, head_dim = query.shape
    kv_heads = key_cache.shape[1]
    for tensor in (query, out):
        if tensor.dim() != 3 or tensor.stride(2) != 1 or tensor.stride(1) != head_dim or tensor.dtype != query.dtype:
            raise AttentionShapeError("query and out must be [B, H, D] with contiguous heads, one dtype")
    if out.shape != query.shape or key_cache.shape[2] != head_dim:
        raise AttentionShapeError(f"out {tuple(out.shape)}, query {tuple(query.shape)}, cache "
                                  f"{tuple(key_cache.shape)} disagree")
    if key_cache.shape[0] % block_size:
        raise AttentionShapeError(f"cache of {key_cache.shape[0]} slots is not whole blocks of {block_size}")
    if (block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64 or block_tables.dim() != 2
            or not block_tables.is_contiguous() or not context_lens.is_contiguous()
            or block_tables.shape[0] != rows or context_lens.shape != (rows,)):
        raise AttentionShapeError("block_tables [B, W] and context_lens [B] must be contiguous int64")
    code = library.longtail_paged_decode(
        out.data_ptr(), out.stride(0), query.data_ptr(), query.stride(0), key_cache.data_ptr(),
        value_cache.data_ptr(), key_cache.shape[0] // block_size, block_tables.data_ptr(), block_tables.shape[1],
        context_lens.data_ptr(), rows, heads, kv_heads, head_dim, block_size, scale, _DTYPES[query.dtype],
        torch.get_num_threads())
    if code:
        raise AttentionShapeError(f"paged_decode_attention: {_ERRORS.get(code, f'error {code}')}")


class BoundCache:
    """Both kernels bound to one paged cache ([layers, slots, KV, D] keys and values), checked once here.

    A decode step calls each kernel once per layer; re-checking the cache's dtype, shape and
    contiguity each time was a fifth of the calls' cost. Per call only what changes is checked
    (the activations' shapes); indices are still checked by the C code before it writes.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, heads: int, block_size: int) -> None:
        library = _load()
        if library is None:
            raise RuntimeError("the CPU attention kernel is not available (see available())")
        if keys.dim() != 4 or keys.shape[1] % block_size:
            raise AttentionShapeError(f"cache {tuple(keys.shape)} is not [layers, whole blocks of {block_size}, KV, D]")
        _check_cache(keys[0], values[0], keys.dtype)
        self._rope = library.longtail_rope_write
        self._decode = library.longtail_paged_decode
        self.dtype, self.code = keys.dtype, _DTYPES[keys.dtype]
        self.layers, self.slots, self.kv_heads, self.head_dim = keys.shape
        self.heads, self.block_size = heads, block_size
        self.width = (heads + 2 * self.kv_heads) * self.head_dim
        layer_bytes = self.slots * self.kv_heads * self.head_dim * keys.element_size()
        self.key_addr = [keys.data_ptr() + layer * layer_bytes for layer in range(self.layers)]
        self.value_addr = [values.data_ptr() + layer * layer_bytes for layer in range(self.layers)]
        self._holds = (keys, values)

    def rope_write(self, qkv: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor,
                   write_slots: torch.Tensor) -> None:
        """`rope_write` into layer `layer`; cos, sin [T, D] fp32 and write_slots [T] int64, contiguous."""
        tokens = qkv.shape[0]
        if (qkv.dtype != self.dtype or qkv.dim() != 2 or qkv.shape[1] != self.width or qkv.stride(1) != 1
                or cos.shape != (tokens, self.head_dim) or sin.shape != cos.shape or write_slots.shape != (tokens,)
                or cos.dtype is not torch.float32 or sin.dtype is not torch.float32
                or write_slots.dtype is not torch.int64):
            raise AttentionShapeError("rope_write: qkv, cos, sin or write_slots do not fit the cache")
        code = self._rope(qkv.data_ptr(), qkv.stride(0), tokens, self.heads, self.kv_heads, self.head_dim,
                          cos.data_ptr(), sin.data_ptr(), self.key_addr[layer], self.value_addr[layer], self.slots,
                          write_slots.data_ptr(), self.code, torch.get_num_threads())
        if code:
            raise AttentionShapeError(f"rope_write: {_ERRORS.get(code, f'error {code}')}")

    def decode(self, out: torch.Tensor, query: torch.Tensor, layer: int, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float) -> None:
        """`paged_decode_attention` over layer `layer`; query and out [B, H, D] rows of contiguous heads."""
        rows = query.shape[0]
        if (query.dtype != self.dtype or out.dtype != self.dtype or query.shape != (rows, self.heads, self.head_dim)
                or out.shape != query.shape or query.stride(1) != self.head_dim or out.stride(1) != self.head_dim
                or query.stride(2) != 1 or out.stride(2) != 1 or block_tables.shape[0] != rows
                or context_lens.shape != (rows,) or not block_tables.is_contiguous()
                or block_tables.dtype is not torch.int64 or context_lens.dtype is not torch.int64):
            raise AttentionShapeError("paged_decode_attention: query, out or tables do not fit the cache")
        code = self._decode(out.data_ptr(), out.stride(0), query.data_ptr(), query.stride(0), self.key_addr[layer],
                            self.value_addr[layer], self.slots // self.block_size, block_tables.data_ptr(),
                            block_tables.shape[1], context_lens.data_ptr(), rows, self.heads, self.kv_heads,
                            self.head_dim, self.block_size, scale, self.code, torch.get_num_threads())
        if code:
            raise AttentionShapeError(f"paged_decode_attention: {_ERRORS.get(code, f'error {code}')}")
