"""Tiny random models and PEFT adapters for the tests: built from seeds, never downloaded.

A plain module (not a conftest) so fixtures in any folder import the same builders;
pytest's `pythonpath` setting puts tests/ on the path (docs/packaging.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """How one test adapter is made: rank, targets and PEFT's scaling options."""

    name: str
    rank: int
    targets: tuple[str, ...]
    alpha: int
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, int], ...] = ()


# Ranks 4/8/16/64, different target sets, one rslora, one with per-module ranks.
TINY_ADAPTER_SPECS = (
    AdapterSpec("r4-attn", 4, ("q_proj", "v_proj"), alpha=8),
    AdapterSpec("r8-all", 8, tuple(ALL_PROJECTIONS), alpha=16, rank_pattern=(("o_proj", 2),)),
    AdapterSpec("r16-mlp-rslora", 16, ("gate_proj", "up_proj", "down_proj"), alpha=8, use_rslora=True),
    AdapterSpec("r64-qko", 64, ("q_proj", "k_proj", "o_proj"), alpha=32, alpha_pattern=(("k_proj", 64),)),
)


def _tiny_llama_config(qwen_style: bool):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if qwen_style:
        return Qwen2Config(**common, rope_theta=1_000_000.0, tie_word_embeddings=False)
    return LlamaConfig(
        **common,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_model(out_dir: Path, qwen_style: bool = False, seed: int = 0) -> Path:
    """Write a random tiny causal LM (safetensors + config) and return its folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_llama_config(qwen_style), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            # Larger than default init so logits are well separated and greedy ties are rare.
            param.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_peft_adapter(base_dir: Path, spec: AdapterSpec, out_dir: Path, seed: int) -> Path:
    """Wrap the base with a random, non-zero LoRA per `spec` and save it in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(out_dir)
    return out_dir


@dataclasses.dataclass(frozen=True)
class TinyModelKit:
    """A tiny base model folder and PEFT adapter folders made for it."""

    base_dir: Path
    adapter_dirs: dict[str, Path]


def build_kit(root: Path, qwen_style: bool) -> TinyModelKit:
    base_dir = build_tiny_model(root / "base", qwen_style=qwen_style)
    adapters = {
        spec.name: build_peft_adapter(base_dir, spec, root / "adapters" / spec.name, seed=100 + i)
        for i, spec in enumerate(TINY_ADAPTER_SPECS)
    }
    return TinyModelKit(base_dir=base_dir, adapter_dirs=adapters)
