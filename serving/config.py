"""The base model's architecture, read from an HF `config.json` (Llama, Mistral and Qwen2 families)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from longtail.serving.peft_format import ModuleShapes

SUPPORTED = {"llama", "mistral", "qwen2"}


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict) and "full_attention" in parameters:
        parameters = parameters["full_attention"]  # per-layer-type form; this family has one type
    if isinstance(parameters, dict):
        theta = float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))
        kind = parameters.get("rope_type") or parameters.get("type")
        return theta, (dict(parameters) if kind not in (None, "default") else None)
    scaling = config.get("rope_scaling")
    return float(config.get("rope_theta", 10000.0)), (dict(scaling) if scaling else None)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the model code needs; read from `config.json`, never guessed."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dict(cls, config: dict) -> ModelConfig:
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not served; supported: {sorted(SUPPORTED)}")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        # Qwen2 always has q/k/v biases; Llama declares them with attention_bias.
        bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        rope = rope_settings(config)
        context = int(config.get("max_position_embeddings", 2048))
        window = config.get("sliding_window")
        if window and (model_type == "mistral" or config.get("use_sliding_window")):
            # Attention here is full-context: serving past the window would differ from the model, so stop there.
            context = min(context, int(window))
        return cls(
            model_type=model_type, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope[0], rope_scaling=rope[1], max_position_embeddings=context,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), attention_bias=bias,
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> ModelConfig:
        config = cls.from_dict(json.loads((Path(model_dir) / "config.json").read_text()))
        generation = Path(model_dir) / "generation_config.json"
        if generation.exists():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            extra = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
            config = dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))
        return config

    def module_shapes(self) -> ModuleShapes:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return ModuleShapes(num_layers=self.num_layers, shapes={
            "q_proj": (self.hidden_size, q), "k_proj": (self.hidden_size, kv), "v_proj": (self.hidden_size, kv),
            "o_proj": (q, self.hidden_size), "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size), "down_proj": (self.intermediate_size, self.hidden_size),
        })

    def parameter_count(self) -> int:
        """Weights the model holds: embedding, (untied) head, every layer's projections, norms and biases."""
        projections = sum(rows * columns for rows, columns in self.module_shapes().shapes.values())
        biases = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        per_layer = projections + 2 * self.hidden_size + biases
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + head + self.num_layers * per_layer + self.hidden_size

    def inverse_frequencies(self) -> torch.Tensor:
        """RoPE inverse frequencies, with Llama-3 style scaling when the config asks for it."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
            original = float(scaling.get("original_max_position_embeddings", 8192))
            low_wavelen, high_wavelen = original / low, original / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (original / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        elif kind == "linear":
            inv = inv / float(scaling["factor"])
        elif kind not in (None, "default"):
            raise ValueError(f"rope scaling {kind!r} is not supported")
        return inv.float()
