"""One anvil and one deployment per test session; every test runs between evm_snapshot and evm_revert."""

from __future__ import annotations

from pathlib import Path

import pytest

from longtail.contracts.anvil import Anvil  # noqa: E402
from longtail.contracts.client import LongtailContracts  # noqa: E402
from longtail.contracts.deployment import OPEN, deploy_all  # noqa: E402

from contracts_testkit import TEST_PARAMS, World  # noqa: E402

FUNDED = 100_000 * OPEN


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.chain)


@pytest.fixture(scope="session")
def anvil():
    with Anvil() as chain:
        yield chain


@pytest.fixture(scope="session")
def base_world(anvil) -> World:
    accounts = anvil.accounts
    deployer = accounts[0]
    deployment = deploy_all(anvil.w3, deployer, TEST_PARAMS)
    contracts = LongtailContracts.connect(anvil.w3, deployment)
    world = World(anvil=anvil, contracts=contracts, deployer=deployer, node=accounts[1], client=accounts[2],
                  adapter_owner=accounts[3], datanet_owner=accounts[4], challenger=accounts[5],
                  other_node=accounts[6], other_client=accounts[7], contributor=accounts[8])
    for account in accounts[1:]:
        contracts.token.transfer(deployer, account.address, FUNDED)
    return world


@pytest.fixture
def world(base_world: World):
    """The session's world, rolled back after the test so every test starts from the same state."""
    snapshot = base_world.anvil.snapshot()
    try:
        yield base_world
    finally:
        base_world.anvil.revert(snapshot)
