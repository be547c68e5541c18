"""Node fixtures: the real base model's engine and a deployed devnet chain, shared by the tests of one module."""

from __future__ import annotations

import pytest

from longtail.contracts.anvil import Anvil
from longtail.node.devnet import ADAPTERS, NODE_ADAPTERS, setup_chain
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


@pytest.fixture(scope="module")
def deployed_chain(tmp_path_factory):
    """anvil with the devnet's contracts, Datanets, adapters and staked nodes: (anvil, deployment, its file, ids)."""
    anvil = Anvil().start()
    deployment, adapter_ids = setup_chain(anvil.w3, log=lambda *_: None)
    folder = tmp_path_factory.mktemp("chain")
    deployment.save(folder / "deployment.json")
    yield anvil, deployment, folder / "deployment.json", adapter_ids
    anvil.stop()


@pytest.fixture()
def chain(deployed_chain):
    """Each test starts from the freshly set-up chain: node keys are shared, their logs are not."""
    anvil = deployed_chain[0]
    snapshot = anvil.snapshot()
    yield deployed_chain
    anvil.revert(snapshot)
