"""Node fixtures: the real base model's engine, shared by the tests of one module that start real nodes."""

from __future__ import annotations

import pytest

from longtail.node.devnet import ADAPTERS, NODE_ADAPTERS
from longtail.serving.base_models import embedded_model_dir


@pytest.fixture(scope="module")
def shared_model():
    """One engine over the embedded base model and its tokenizer (loading it per node would dominate the run)."""
    if not (embedded_model_dir() / "config.json").exists():
        pytest.skip("embedded base model not prepared: run `make setup`")
    if not all((ADAPTERS / name).exists() for names in NODE_ADAPTERS.values() for name in names):
        pytest.skip("shipped demo adapters missing from data/adapters")
    from transformers import AutoTokenizer

    from longtail.node.config import NodeConfig
    from longtail.node.runner import build_engine

    model_dir = embedded_model_dir()
    engine = build_engine(NodeConfig(kv_cache_bytes=64 * 2**20), model_dir)
    yield engine, AutoTokenizer.from_pretrained(model_dir)
    engine.shutdown()
