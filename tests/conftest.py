"""Session-wide fixtures: a random tiny Llama, a tiny Qwen2-style model, PEFT adapters of mixed ranks.

They are built once per test session into a temporary folder, with fixed seeds,
so unit tests run in seconds against real HF/PEFT files instead of the 135M model.
"""

from __future__ import annotations

import os

# Triton's interpreter must be chosen before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from model_kit import TinyModelKit, build_kit


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyModelKit:
    """Random tiny Llama (tied embeddings, GQA) with four adapters of ranks 4, 8, 16, 64."""
    return build_kit(tmp_path_factory.mktemp("tiny-llama"), qwen_style=False)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> TinyModelKit:
    """Random tiny Qwen2-style model (qkv bias, GQA, untied head) with the same adapter specs."""
    return build_kit(tmp_path_factory.mktemp("tiny-qwen2"), qwen_style=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
