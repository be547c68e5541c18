"""Serving fixtures: tiny models whose attention is sharp enough that RoPE and masking mistakes show.

The session kits in tests/conftest.py draw every weight, RMSNorm scales included,
from N(0, 0.08); activations then stay so small that attention is nearly uniform
and a wrong RoPE theta moves logits by under 1e-4. These kits rewrite the norm
scales to 1 + noise (as in trained models), so position handling is exercised,
and the Llama one uses Llama-3 RoPE scaling with a short original context so the
scaled frequencies matter at test lengths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_kit import TINY_ADAPTER_SPECS, TinyModelKit, build_peft_adapter, build_tiny_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _sharpen(base_dir: Path, rope: dict | None) -> None:
    """Norm scales near 1 and, optionally, another RoPE: the model HF and we both load afterwards."""
    weights_file = base_dir / "model.safetensors"
    weights = load_file(str(weights_file))
    for name, tensor in weights.items():
        if "norm" in name:
            weights[name] = 1.0 + tensor
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    if rope is not None:
        config = json.loads((base_dir / "config.json").read_text())
        config["rope_parameters"] = rope
        (base_dir / "config.json").write_text(json.dumps(config, indent=2))


def _sharp_kit(root: Path, qwen_style: bool, rope: dict | None) -> TinyModelKit:
    base_dir = build_tiny_model(root / "base", qwen_style=qwen_style, seed=3)
    _sharpen(base_dir, rope)
    adapters = {spec.name: build_peft_adapter(base_dir, spec, root / "adapters" / spec.name, seed=200 + i)
                for i, spec in enumerate(TINY_ADAPTER_SPECS)}
    return TinyModelKit(base_dir=base_dir, adapter_dirs=adapters)


@pytest.fixture(scope="session")
def sharp_llama(tmp_path_factory) -> TinyModelKit:
    """Tiny Llama with unit-scale norms and Llama-3 RoPE scaling, plus the four test adapters."""
    torch.manual_seed(0)
    return _sharp_kit(tmp_path_factory.mktemp("sharp-llama"), qwen_style=False, rope=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def sharp_qwen2(tmp_path_factory) -> TinyModelKit:
    """Tiny Qwen2 (qkv bias, theta 1e6) with unit-scale norms, plus the four test adapters."""
    return _sharp_kit(tmp_path_factory.mktemp("sharp-qwen2"), qwen_style=True, rope=None)
