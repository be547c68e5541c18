"""Artifacts match the sources; deployments round-trip; anvil's dev keys are the ones it funds."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from longtail.contracts.anvil import DEV_ACCOUNTS, Anvil
from longtail.contracts.artifacts import (
    BUILD_DIR,
    CONTRACT_NAMES,
    StaleArtifacts,
    load_artifact,
    sources_sha256,
)
from longtail.contracts.client import LongtailContracts, WrongChain
from longtail.contracts.deployment import Deployment, deploy_all

from contracts_testkit import TEST_PARAMS

REPO = BUILD_DIR.parent.parent


def test_committed_artifacts_equal_a_fresh_compile():
    """Recompile with the pinned solc-js and fail if contracts/build/ is stale (run `node contracts/build.js`)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is required to check the contract artifacts (make setup installs it)")
    result = subprocess.run([node, "contracts/build.js", "--check"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in CONTRACT_NAMES:
        assert load_artifact(name).sources_sha256 == sources_sha256()


def test_stale_artifact_raises_a_clear_error(tmp_path):
    for name in CONTRACT_NAMES:
        data = json.loads((BUILD_DIR / f"{name}.json").read_text())
        data["sources_sha256"] = "0" * 64
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    with pytest.raises(StaleArtifacts, match="node contracts/build.js") as info:
        load_artifact("Registry", build_dir=tmp_path)
    assert info.value.sources_hash == sources_sha256()


def test_deployment_round_trips_through_json(world, tmp_path):
    deployment = world.contracts.deployment
    path = tmp_path / "deployment.json"
    deployment.save(path)
    assert Deployment.load(path) == deployment
    assert Deployment.from_json(json.loads(json.dumps(deployment.to_json()))) == deployment


def test_connect_refuses_another_chain(world):
    moved = Deployment.from_json({**world.contracts.deployment.to_json(), "chain_id": 1})
    with pytest.raises(WrongChain):
        LongtailContracts.connect(world.anvil.w3, moved)


def test_second_anvil_on_another_chain_id_gets_a_working_deployment():
    with Anvil(chain_id=4242) as chain:
        assert chain.w3.eth.accounts == [a.address for a in DEV_ACCOUNTS]
        deployment = deploy_all(chain.w3, chain.accounts[0], TEST_PARAMS)
        contracts = LongtailContracts.connect(chain.w3, deployment)
        assert deployment.chain_id == 4242
        assert contracts.token.balance_of(chain.accounts[0].address) == TEST_PARAMS.initial_supply
        assert contracts.ledger.split().adapter_share_bps == TEST_PARAMS.adapter_share_bps
