"""Our Llama-family model (Llama, Mistral, Qwen2): plain tensors loaded from HF safetensors.

One forward runs a flat batch of tokens from many sequences: linear layers see
every token at once (that is where batching pays), LoRA deltas are added per
token by adapter slot through `kernels.add_lora`, keys and values go to the
paged cache, and attention reads each sequence's context from it: prefill
segments one by one, all decode tokens in one call.
q/k/v and gate/up are fused into one matmul each at load time; each adapter's
delta is added into its projection's columns of the fused output.

On a CPU the weights are packed once at load (`weight_format`): in fp32 into our GEMM's panels
(`kernels.gemm_cpu`, every matmul from one row up), in bf16 into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the layout inductor's freezing uses). RoPE + the cache write and
decode attention are one C call each (`kernels.attention_cpu`): decode attention reads keys and values where
they lie in the paged cache. Elsewhere (CUDA) decode attention gathers the rows' blocks and runs SDPA;
`_decode_attention` is the one place a device's paged-attention kernel plugs in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from longtail.kernels import attention_cpu, gemm_cpu, linear_cpu, norm_cpu
from longtail.kernels.lora import Runs, add_lora, add_lora_runs, kernel_backend
from longtail.kernels.lora_cpu import add_lora_runs_native
from longtail.serving.config import ModelConfig
from longtail.serving.kv_cache import PagedKVCache
from longtail.serving.lora_slots import LoraSlots


@dataclasses.dataclass
class PrefillSegment:
    start: int            # first token of the segment in the batch
    length: int           # tokens of this sequence in the batch
    context: int          # tokens of this sequence already in the cache before this step
    gather: torch.Tensor | None  # cache slots of positions [0, context + length); None when context is 0


@dataclasses.dataclass
class BatchPlan:
    """Everything a forward needs besides the weights: built by the runner, read by the model."""

    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    write_slots: torch.Tensor      # [T] cache slot of each token's key/value
    token_slots: torch.Tensor      # [T] LoRA slot, -1 = base only
    lora_groups: list              # kernels.token_groups(token_slots), computed once per step; [] = no adapter
    prefill: list[PrefillSegment]
    decode_count: int              # B: the first B rows of the batch are single-token decode rows
    decode_gather: torch.Tensor    # [B, W] block tables of the decode rows, padded with each row's first block
    context_lens: torch.Tensor     # [B] keys each decode row attends to (its context + itself)
    logits_index: torch.Tensor     # [N] batch indices whose next-token logits are wanted
    lora_runs: Runs = dataclasses.field(default_factory=list)  # (slot, begin, end) runs for the CPU torch path
    native_runs: torch.Tensor | None = None  # [n, 3] short runs for the CPU C kernel (kernels.lora_cpu)
    lora_per_token: bool = False   # a CUDA graph's plan: LoRA reads every token's slot on the device (BGMV)


Weight = torch.Tensor | gemm_cpu.PackedWeight  # plain, oneDNN-packed (an mkldnn tensor) or in our GEMM's panels


@dataclasses.dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up concatenated along the output dimension."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: Weight                       # [q + 2 kv, hidden]
    qkv_bias: torch.Tensor | None
    o: Weight
    gate_up: Weight                   # [2 intermediate, hidden]
    down: Weight


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of a linear weight: 1.1-1.7x faster bf16 matmuls than the plain layout on this CPU
    (measured in docs/serving.md); the result is an opaque mkldnn tensor only `_linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def weight_format(device: torch.device, dtype: torch.dtype) -> str:
    """How the projection weights are kept: "panels" (fp32 on a CPU with our GEMM kernel), "onednn" (oneDNN's
    blocked layout: bf16 where oneDNN has its AVX-512 bf16 path; fp32 without our kernel where a probe finds it
    faster, `packing_pays`) or "plain". `LONGTAIL_PACKED_WEIGHTS=0` keeps them plain (torch's own matmuls: the
    reference the tests hold the packed paths to); `=1` packs fp32 without asking the probe.

    Measured with torch 2.13 (docs/serving.md): on the 2-core AVX-512 EPYC our GEMM took 0.6-0.8x oneDNN's packed
    time at 1-32 rows and 0.8-0.95x at 64-128, 1.0x from 512; packed bf16 took 0.6-0.7x the plain time.
    """
    setting = os.environ.get("LONGTAIL_PACKED_WEIGHTS", "").strip()
    if setting == "0" or device.type != "cpu":
        return "plain"
    if dtype == torch.float32 and gemm_cpu.available():
        return "panels"
    if not torch.backends.mkldnn.is_available():
        return "plain"
    if dtype == torch.bfloat16:
        # oneDNN's bf16 reorder needs AVX-512 (BW/VL/DQ) and raises on an AVX2-only CPU (an AMD EPYC of this
        # project's CI is one): there bf16 weights stay plain and torch's own bf16 matmuls run.
        return "onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "plain"
    return "onednn" if dtype == torch.float32 and (setting == "1" or packing_pays()) else "plain"


@functools.cache
def packing_pays(rows: int = 128, hidden: int = 1024, width: int = 4096, repeats: int = 5) -> bool:
    """Whether oneDNN's packed fp32 matmul beats the plain one on this CPU by 10 % or more: both timed on one
    decode-sized shape, alternating, best of `repeats` (about 0.2 s, once per process). Either choice computes
    the same function; only speed differs (tests/serving/test_cpu_fast_path.py holds them equal)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(width, hidden, generator=generator)
    x = torch.randn(rows, hidden, generator=generator)
    packed = _pack(weight)
    best = {"plain": float("inf"), "packed": float("inf")}
    for _ in range(repeats):
        for name, w in (("plain", weight), ("packed", packed)):
            began = time.perf_counter()
            _linear(x, w)
            best[name] = min(best[name], time.perf_counter() - began)
    return best["packed"] < 0.9 * best["plain"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _load_tensors(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                weights[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
    return weights


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in weights]
        if missing:
            raise KeyError(f"checkpoint lacks {missing}: not a Llama-family model")
        self.embed = weights.pop("model.embed_tokens.weight")
        self.norm = weights.pop("model.norm.weight")
        head = weights.pop("lm_head.weight", None)
        self.lm_head = self.embed if config.tie_word_embeddings or head is None else head
        self.layers = [self._fuse(weights, layer) for layer in range(config.num_layers)]
        self.weight_format = weight_format(device, dtype)
        self.packed = self.weight_format != "plain"
        # bf16 matmuls of 2-32 rows (decode) as one C pass over each plain weight (kernels.linear_cpu), where bf16
        # weights stay plain (no oneDNN bf16 path: torch's plain bf16 matmuls are slow there). Where oneDNN packs
        # bf16 it won at every row count, with AMX and without (docs/serving.md); fp32 has our GEMM. 0 = off.
        self.small_linear_from = 2 if (device.type == "cpu" and dtype == torch.bfloat16 and not self.packed
                                       and linear_cpu.available()) else 0
        if self.packed:
            pack = gemm_cpu.pack if self.weight_format == "panels" else _pack
            # The embedding keeps its plain copy: a tied head is packed apart from it.
            self.lm_head = pack(self.lm_head)
            for weights_ in self.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    setattr(weights_, name, pack(getattr(weights_, name)))
        self.cpu_attention = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and \
            attention_cpu.available()
        # The residual adds and RMSNorms as C calls (kernels.norm_cpu): two per layer instead of ~14 small ones.
        self.cpu_norm = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and norm_cpu.available()
        # CUDA: Triton paged attention reads K/V in place (kernels/paged_attention.py); LONGTAIL_PAGED_ATTENTION=0
        # keeps the gather + SDPA path (the GPU check compares the two).
        self.paged_kernels = device.type == "cuda" and os.environ.get("LONGTAIL_PAGED_ATTENTION", "").strip() != "0"
        self._extend_meta: tuple | None = None
        self.scale = config.head_dim ** -0.5
        self._bound: tuple[torch.Tensor, attention_cpu.BoundCache] | None = None
        self.inv_freq = config.inverse_frequencies().to(device)
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        # Column where each projection's output starts inside the fused matmul's output.
        self.qkv_columns = (("q_proj", 0), ("k_proj", q), ("v_proj", q + kv))
        self.gate_up_columns = (("gate_proj", 0), ("up_proj", config.intermediate_size))

    def _fuse(self, weights: dict[str, torch.Tensor], layer: int) -> LayerWeights:
        prefix = f"model.layers.{layer}"

        def take(name: str) -> torch.Tensor:
            key = f"{prefix}.{name}"
            if key not in weights:
                raise KeyError(f"checkpoint lacks {key}")
            return weights.pop(key)

        attention = [take(f"self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]
        biases = [weights.pop(f"{prefix}.self_attn.{p}.bias", None) for p in ("q_proj", "k_proj", "v_proj")]
        if any(b is not None for b in biases):
            biases = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                      for b, w in zip(biases, attention, strict=True)]
            qkv_bias = torch.cat(biases)
        else:
            qkv_bias = None
        return LayerWeights(
            input_norm=take("input_layernorm.weight"), post_attention_norm=take("post_attention_layernorm.weight"),
            qkv=torch.cat(attention), qkv_bias=qkv_bias, o=take("self_attn.o_proj.weight"),
            gate_up=torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")]),
            down=take("mlp.down_proj.weight"))

    @classmethod
    def from_pretrained(cls, model_dir: Path | str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> LlamaModel:
        """Load config.json + *.safetensors; fp32 on CPU and bf16 on CUDA unless `dtype` says otherwise."""
        device = torch.device(device)
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        config = ModelConfig.from_model_dir(model_dir)
        return cls(config, _load_tensors(Path(model_dir), device, dtype), device, dtype)

    def _matmul(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, gemm_cpu.PackedWeight):
            return gemm_cpu.gemm(x, weight, bias)
        if self.small_linear_from and x.shape[0] >= self.small_linear_from and linear_cpu.fits(x, weight):
            return linear_cpu.linear_small(x, weight, bias)
        return _linear(x, weight, bias)

    def _project(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, layer: int, columns,
                 plan: BatchPlan, lora: LoraSlots | None) -> torch.Tensor:
        """x through `weight` (a projection group: `columns` names its projections and their first output
        columns) plus the LoRA of every adapter in the step that targets them."""
        if lora is None or not (plan.lora_groups or plan.lora_runs or plan.native_runs is not None
                                or plan.lora_per_token):
            return self._matmul(x, weight, bias)
        if (plan.lora_runs or plan.native_runs is not None) and kernel_backend() == "torch":
            if plan.native_runs is not None and isinstance(weight, gemm_cpu.PackedWeight):
                # decode runs fused into the matmul: the factors stream in while the base output is computed
                out = gemm_cpu.gemm_lora(x, weight, bias, plan.native_runs, lora.run_table(columns, layer))
            else:
                out = self._matmul(x, weight, bias)
                if plan.native_runs is not None:  # decode: one C call for the whole projection group
                    add_lora_runs_native(out, x, plan.native_runs, lora.run_table(columns, layer))
            if plan.lora_runs:
                for name, column in columns:
                    add_lora_runs(out, x, plan.lora_runs, lora.views(name, layer), out_col_start=column)
            return out
        out = self._matmul(x, weight, bias)
        for name, column in columns:
            buffers = lora.buffers[name]
            max_rank = buffers.max_rank[layer]
            if max_rank:
                add_lora(out, x, buffers.a_rows[layer], buffers.b_rows[layer], plan.token_slots, buffers.offsets,
                         buffers.ranks[layer], buffers.scales[layer], max_rank, out_col_start=column,
                         groups=plan.lora_groups or None, per_token=plan.lora_per_token)
        return out

    def _attention(self, x: torch.Tensor, layer: int, plan: BatchPlan, cache: PagedKVCache,
                   cos: torch.Tensor, sin: torch.Tensor, lora: LoraSlots | None) -> torch.Tensor:
        config, weights = self.config, self.layers[layer]
        tokens = x.shape[0]
        qkv = self._project(x, weights.qkv, weights.qkv_bias, layer, self.qkv_columns, plan, lora)
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        keys, values = cache.keys[layer], cache.values[layer]
        if self.cpu_attention:  # rotates q and k in place inside qkv, copies k and v to their slots
            self._kernels(cache).rope_write(qkv, layer, cos, sin, plan.write_slots)
        q = qkv[:, :q_width].view(tokens, config.num_heads, config.head_dim)
        k = qkv[:, q_width:q_width + kv_width].view(tokens, config.num_kv_heads, config.head_dim)
        v = qkv[:, q_width + kv_width:].view(tokens, config.num_kv_heads, config.head_dim)
        if not self.cpu_attention:
            cos_, sin_ = cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None]
            q = q * cos_ + _rotate_half(q) * sin_
            k = k * cos_ + _rotate_half(k) * sin_
            keys.index_copy_(0, plan.write_slots, k)
            values.index_copy_(0, plan.write_slots, v)
        out = torch.empty(tokens, config.num_heads, config.head_dim, dtype=qkv.dtype, device=qkv.device)
        prefill = plan.prefill
        if self.paged_kernels and prefill and self._extend_attention(out, q, keys, values, plan, cache.block_size):
            prefill = ()
        for segment in prefill:
            rows = slice(segment.start, segment.start + segment.length)
            seq_q = q[rows].transpose(0, 1)[None]
            if segment.context == 0:  # a whole prompt: its keys are this batch's rows, no gather needed
                seq_k, seq_v = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
                attended = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, is_causal=True, enable_gqa=True)
            else:  # a later chunk of a prompt: causal, offset by what is already cached
                seq_k = keys.index_select(0, segment.gather).transpose(0, 1)[None]
                seq_v = values.index_select(0, segment.gather).transpose(0, 1)[None]
                total = segment.context + segment.length
                allowed = torch.arange(total, device=x.device)[None, :] <= (
                    segment.context + torch.arange(segment.length, device=x.device)[:, None])
                attended = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, attn_mask=allowed, enable_gqa=True)
            out[rows] = attended[0].transpose(0, 1)
        if plan.decode_count:
            rows = plan.decode_count
            if self.cpu_attention:  # the bound kernels: the cache's checks and addresses computed once
                self._kernels(cache).decode(out[:rows], q[:rows], layer, plan.decode_gather, plan.context_lens,
                                            self.scale)
            else:
                self._decode_attention(out[:rows], q[:rows], keys, values, plan.decode_gather, plan.context_lens,
                                       cache.block_size)
        flat = out.reshape(tokens, -1)
        projected = self._project(flat, weights.o, None, layer, (("o_proj", 0),), plan, lora)
        return projected

    def _kernels(self, cache: PagedKVCache) -> attention_cpu.BoundCache:
        """The CPU attention kernels bound to `cache` (checked, and its per-layer addresses computed, once)."""
        bound = self._bound
        if bound is None or bound[0] is not cache.keys:
            bound = self._bound = (cache.keys, attention_cpu.BoundCache(cache.keys, cache.values,
                                                                        self.config.num_heads, cache.block_size))
        return bound[1]

    def _decode_attention(self, out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> None:
        """out [B, H, D] = each decode row's attention over its first context_lens[b] cached positions.

        A device's paged-attention kernel (query, key_cache, value_cache, block_tables, context_lens, scale)
        goes here; without one, the rows' blocks are gathered into a padded copy for SDPA.
        """
        if self.cpu_attention:
            attention_cpu.paged_decode_attention(out, query, keys, values, block_tables, context_lens, self.scale,
                                                 block_size)
            return
        if self.paged_kernels:
            from longtail.kernels.paged_attention import paged_decode_attention_triton

            paged_decode_attention_triton(out, query, keys, values, block_tables, context_lens, self.scale, block_size)
            return
        # index_select, not advanced indexing: one memcpy per block, ~5x faster on a CPU.
        out.copy_(attention_cpu.paged_decode_attention_ref(query, keys, values, block_tables, context_lens,
                                                           self.scale, block_size))

    def _extend_attention(self, out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          plan: BatchPlan, block_size: int) -> bool:
        """Every prefill segment in one Triton launch, keys read in place; False (caller loops) if not adjacent.

        The segments' block tables come from their slot maps on the device (no host read), built once
        per plan and reused by every layer.
        """
        if self._extend_meta is None or self._extend_meta[0] is not plan:
            segments = plan.prefill
            first = segments[0].start
            if any(b.start != a.start + a.length for a, b in zip(segments, segments[1:], strict=False)):
                return False
            width = max(-(-(s.context + s.length) // block_size) for s in segments)
            tables = torch.zeros(len(segments), width, dtype=torch.int64, device=self.device)
            for row, segment in enumerate(segments):
                # Position k·block_size of a sequence lies at slot table[k]·block_size: every block_size-th slot.
                slots = segment.gather if segment.gather is not None else \
                    plan.write_slots[segment.start:segment.start + segment.length]
                tables[row, :-(-slots.shape[0] // block_size)] = slots[::block_size] // block_size
            host = [s.start - first for s in segments] + [segments[-1].start + segments[-1].length - first] + \
                [s.context for s in segments]
            meta = torch.tensor(host, dtype=torch.int64).to(self.device, non_blocking=True)
            end = segments[-1].start + segments[-1].length
            self._extend_meta = (plan, first, end, tables, meta[:len(segments) + 1], meta[len(segments) + 1:],
                                 max(s.length for s in segments))
        from longtail.kernels.paged_attention import paged_extend_attention_triton

        _, first, end, tables, starts, prefix_lens, longest = self._extend_meta
        paged_extend_attention_triton(out[first:end], query[first:end], keys, values, tables, starts, prefix_lens,
                                      longest, self.scale, block_size)
        return True

    def _mlp(self, x: torch.Tensor, layer: int, plan: BatchPlan, lora: LoraSlots | None) -> torch.Tensor:
        weights = self.layers[layer]
        gate_up = self._project(x, weights.gate_up, None, layer, self.gate_up_columns, plan, lora)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        down = self._project(hidden, weights.down, None, layer, (("down_proj", 0),), plan, lora)
        return down

    def forward(self, plan: BatchPlan, cache: PagedKVCache, lora: LoraSlots | None) -> torch.Tensor:
        """Next-token logits (fp32) for the tokens in `plan.logits_index`."""
        eps = self.config.rms_norm_eps
        x = F.embedding(plan.input_ids, self.embed)
        freqs = plan.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()  # fp32; the torch path casts them to the model's dtype
        if self.cpu_norm:  # the residual stream is updated in place, each add fused with the norm after it
            delta = None
            for layer, weights in enumerate(self.layers):
                hidden = norm_cpu.add_rms_norm(x, delta, weights.input_norm, eps)
                delta = self._attention(hidden, layer, plan, cache, cos, sin, lora)
                hidden = norm_cpu.add_rms_norm(x, delta, weights.post_attention_norm, eps)
                delta = self._mlp(hidden, layer, plan, lora)
            last = x[plan.logits_index]
            last.add_(delta[plan.logits_index])
            return self._matmul(norm_cpu.add_rms_norm(last, None, self.norm, eps), self.lm_head).float()
        for layer, weights in enumerate(self.layers):
            x = x + self._attention(norm_cpu.rms_norm_ref(x, weights.input_norm, eps), layer, plan, cache, cos, sin, lora)
            x = x + self._mlp(norm_cpu.rms_norm_ref(x, weights.post_attention_norm, eps), layer, plan, lora)
        last = norm_cpu.rms_norm_ref(x[plan.logits_index], self.norm, eps)
        return self._matmul(last, self.lm_head).float()
