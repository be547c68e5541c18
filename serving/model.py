"""Our Llama-family model (Llama, Mistral, Qwen2): plain tensors loaded from HF safetensors.

One forward runs a flat batch of tokens from many sequences: linear layers see
every token at once (that is where batching pays), LoRA deltas are added per
token by adapter slot through `kernels`, keys and values go to the paged cache,
and attention reads each sequence's context from it: prefill segments one by
one, all decode tokens in one padded, masked call.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from kernels import add_lora
from serving.config import ModelConfig
from serving.kv_cache import PagedKVCache
from serving.lora_slots import LoraSlots


@dataclasses.dataclass
class PrefillSegment:
    start: int            # first token of the segment in the batch
    length: int           # tokens of this sequence in the batch
    context: int          # tokens of this sequence already in the cache before this step
    gather: torch.Tensor  # cache slots of positions [0, context + length)


@dataclasses.dataclass
class BatchPlan:
    """Everything a forward needs besides the weights: built by the runner, read by the model."""

    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    write_slots: torch.Tensor      # [T] cache slot of each token's key/value
    token_slots: torch.Tensor      # [T] LoRA slot, -1 = base only
    lora_groups: list              # kernels.token_groups(token_slots), computed once per step
    prefill: list[PrefillSegment]
    decode_tokens: torch.Tensor    # [B] batch indices of single-token decode rows
    decode_gather: torch.Tensor    # [B, C] cache slots, padded
    decode_mask: torch.Tensor      # [B, C] True where the key is real
    logits_index: torch.Tensor     # [N] batch indices whose next-token logits are wanted


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.w = weights
        self.inv_freq = config.inverse_frequencies().to(device)
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]) \
            if not config.tie_word_embeddings else weights["model.embed_tokens.weight"]

    @classmethod
    def from_pretrained(cls, model_dir: Path | str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> LlamaModel:
        device = torch.device(device)
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        config = ModelConfig.from_model_dir(model_dir)
        weights: dict[str, torch.Tensor] = {}
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir} has no .safetensors files")
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    weights[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
        required = ["model.embed_tokens.weight", "model.norm.weight"]
        missing = [k for k in required if k not in weights]
        if missing:
            raise KeyError(f"{model_dir} lacks {missing}: not a Llama-family checkpoint")
        return cls(config, weights, device, dtype)

    def _project(self, x: torch.Tensor, layer: int, parent: str, name: str, plan: BatchPlan,
                 lora: LoraSlots | None) -> torch.Tensor:
        prefix = f"model.layers.{layer}.{parent}.{name}"
        out = F.linear(x, self.w[prefix + ".weight"], self.w.get(prefix + ".bias"))
        if lora is not None and plan.lora_groups:
            buffers = lora.buffers[name]
            max_rank = buffers.max_rank[layer]
            if max_rank:
                add_lora(out, x, buffers.a_rows[layer], buffers.b_rows[layer], plan.token_slots, buffers.offsets,
                         buffers.ranks[layer], buffers.scales[layer], max_rank, groups=plan.lora_groups)
        return out

    def _attention(self, x: torch.Tensor, layer: int, plan: BatchPlan, cache: PagedKVCache,
                   cos: torch.Tensor, sin: torch.Tensor, lora: LoraSlots | None) -> torch.Tensor:
        config = self.config
        tokens = x.shape[0]
        q = self._project(x, layer, "self_attn", "q_proj", plan, lora).view(tokens, config.num_heads, config.head_dim)
        k = self._project(x, layer, "self_attn", "k_proj", plan, lora).view(tokens, config.num_kv_heads, config.head_dim)
        v = self._project(x, layer, "self_attn", "v_proj", plan, lora).view(tokens, config.num_kv_heads, config.head_dim)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        cache.keys[layer].index_copy_(0, plan.write_slots, k)
        cache.values[layer].index_copy_(0, plan.write_slots, v)
        out = torch.empty_like(q)
        keys, values = cache.keys[layer], cache.values[layer]
        for segment in plan.prefill:
            rows = slice(segment.start, segment.start + segment.length)
            seq_k = keys[segment.gather].transpose(0, 1)[None]
            seq_v = values[segment.gather].transpose(0, 1)[None]
            seq_q = q[rows].transpose(0, 1)[None]
            if segment.context == 0:
                attended = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, is_causal=True, enable_gqa=True)
            else:
                total = segment.context + segment.length
                allowed = torch.arange(total, device=x.device)[None, :] <= (
                    segment.context + torch.arange(segment.length, device=x.device)[:, None])
                attended = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, attn_mask=allowed, enable_gqa=True)
            out[rows] = attended[0].transpose(0, 1)
        if plan.decode_tokens.numel():
            dec_q = q[plan.decode_tokens][:, :, None]                       # [B, H, 1, D]
            dec_k = keys[plan.decode_gather].permute(0, 2, 1, 3)            # [B, KV, C, D]
            dec_v = values[plan.decode_gather].permute(0, 2, 1, 3)
            mask = plan.decode_mask[:, None, None, :]
            attended = F.scaled_dot_product_attention(dec_q, dec_k, dec_v, attn_mask=mask, enable_gqa=True)
            out[plan.decode_tokens] = attended[:, :, 0]
        return self._project(out.reshape(tokens, -1), layer, "self_attn", "o_proj", plan, lora)

    def forward(self, plan: BatchPlan, cache: PagedKVCache, lora: LoraSlots | None) -> torch.Tensor:
        """Next-token logits (fp32) for the tokens in `plan.logits_index`."""
        config = self.config
        x = F.embedding(plan.input_ids, self.w["model.embed_tokens.weight"])
        freqs = plan.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        for layer in range(config.num_layers):
            prefix = f"model.layers.{layer}"
            normed = _rms_norm(x, self.w[f"{prefix}.input_layernorm.weight"], config.rms_norm_eps)
            x = x + self._attention(normed, layer, plan, cache, cos, sin, lora)
            normed = _rms_norm(x, self.w[f"{prefix}.post_attention_layernorm.weight"], config.rms_norm_eps)
            gate = self._project(normed, layer, "mlp", "gate_proj", plan, lora)
            up = self._project(normed, layer, "mlp", "up_proj", plan, lora)
            x = x + self._project(F.silu(gate) * up, layer, "mlp", "down_proj", plan, lora)
        last = _rms_norm(x[plan.logits_index], self.w["model.norm.weight"], config.rms_norm_eps)
        return F.linear(last, self.lm_head).float()
