"""Deploy the whole Longtail contract set in one call and describe where it lives.

Order: OpenToken, Registry, PaymentChannels, AttributionLedger, then the one-time wiring
(`Registry.setLedger`, `PaymentChannels.setLedger`). The result is a frozen `Deployment` that
round-trips through JSON, so a node, the CLI and an auditor all read the same addresses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from longtail.contracts.artifacts import load_artifact
from longtail.contracts.chain import ChainError, send

OPEN = 10**18  # base units per OPEN


@dataclasses.dataclass(frozen=True)
class DeployParams:
    """Protocol parameters fixed at deployment (see docs/contracts.md for what each one governs)."""

    initial_supply: int = 1_000_000_000 * OPEN
    minting_open: bool = True
    min_stake: int = 1_000 * OPEN
    unstake_delay: int = 7 * 24 * 3600
    thaw_period: int = 24 * 3600
    adapter_share_bps: int = 2_000
    datanet_share_bps: int = 1_000
    dispute_window: int = 24 * 3600
    dispute_bond: int = 10 * OPEN
    slash_amount: int = 500 * OPEN


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Where the four contracts live on one chain."""

    chain_id: int
    token: str
    registry: str
    channels: str
    ledger: str
    deployer: str
    block_number: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Deployment:
        return cls(
            chain_id=int(data["chain_id"]),
            token=to_checksum_address(data["token"]),
            registry=to_checksum_address(data["registry"]),
            channels=to_checksum_address(data["channels"]),
            ledger=to_checksum_address(data["ledger"]),
            deployer=to_checksum_address(data["deployer"]),
            block_number=int(data["block_number"]),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        return cls.from_json(json.loads(path.read_text()))


def deploy_contract(w3: Web3, deployer: LocalAccount, name: str, *args) -> str:
    """Deploy one compiled contract and return its checksummed address."""
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = send(w3, deployer, factory.constructor(*args))
    address = receipt.get("contractAddress")
    if not address:
        raise ChainError(f"deploying {name} returned no contract address")
    return to_checksum_address(address)


def deploy_all(w3: Web3, deployer: LocalAccount, params: DeployParams = DeployParams()) -> Deployment:
    """Deploy and wire OpenToken, Registry, PaymentChannels and AttributionLedger; the deployer holds the supply."""
    start_block = w3.eth.block_number
    token = deploy_contract(w3, deployer, "OpenToken", deployer.address, params.minting_open, params.initial_supply)
    registry = deploy_contract(w3, deployer, "Registry", token, params.min_stake, params.unstake_delay)
    channels = deploy_contract(w3, deployer, "PaymentChannels", token, params.thaw_period)
    ledger = deploy_contract(w3, deployer, "AttributionLedger", token, registry, channels, params.adapter_share_bps,
                             params.datanet_share_bps, params.dispute_window, params.dispute_bond, params.slash_amount)
    for name, address in (("Registry", registry), ("PaymentChannels", channels)):
        contract = w3.eth.contract(address=address, abi=load_artifact(name).abi)
        send(w3, deployer, contract.functions.setLedger(ledger))
    # Event readers start here: nothing of this deployment can be logged in an earlier block.
    return Deployment(chain_id=w3.eth.chain_id, token=token, registry=registry, channels=channels, ledger=ledger,
                      deployer=deployer.address, block_number=start_block)
