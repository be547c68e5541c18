"""Typed calls to the Registry: nodes and their stake, Datanets, adapters; and readers of its events."""

from __future__ import annotations

import dataclasses

from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3

from longtail.contracts.artifacts import load_artifact
from longtail.contracts.chain import call_view, hex32, send, to_bytes32
from longtail.contracts.token import OpenToken

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    address: str
    registered: bool
    stake: int
    unbonding: int
    unbonding_ready_at: int
    endpoint: str
    peer_id: bytes


@dataclasses.dataclass(frozen=True)
class DatanetInfo:
    datanet_id: str
    owner: str
    name: str
    records_root: str
    record_count: int
    registered_at: int

    @property
    def registered(self) -> bool:
        return self.owner != ZERO_ADDRESS


@dataclasses.dataclass(frozen=True)
class AdapterRegistration:
    """What an adapter owner declares: ids are 0x-hex; Datanet shares in basis points summing to 10000."""

    adapter_id: str
    base_model_id: str
    datanet_shares: tuple[tuple[str, int], ...]
    price_per_1k_tokens: int
    fetch_uri: str


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    owner: str
    base_model_id: str
    datanet_shares: tuple[tuple[str, int], ...]
    price_per_1k_tokens: int
    fetch_uri: str
    registered_at: int

    @property
    def registered(self) -> bool:
        return self.owner != ZERO_ADDRESS


def datanet_id(name: str, owner: str, records_root: str | bytes, record_count: int) -> str:
    """keccak256(abi.encode(string name, address owner, bytes32 recordsRoot, uint256 recordCount)), as the Registry computes it."""
    encoded = abi_encode(["string", "address", "bytes32", "uint256"],
                         [name, owner, to_bytes32(records_root), int(record_count)])
    return hex32(keccak(encoded))


class Registry:
    """The Registry at `address`; stake moves in OPEN through `token`."""

    def __init__(self, w3: Web3, address: str, token: OpenToken) -> None:
        self.w3 = w3
        self.address = address
        self.token = token
        self.contract = w3.eth.contract(address=address, abi=load_artifact("Registry").abi)

    # -- nodes
    def register_node(self, node: LocalAccount, stake: int, endpoint: str, peer_id: bytes) -> dict:
        """Approve `stake` and register the caller as a node."""
        self.token.ensure_allowance(node, self.address, stake)
        return send(self.w3, node, self.contract.functions.registerNode(stake, endpoint, peer_id))

    def update_node(self, node: LocalAccount, endpoint: str, peer_id: bytes) -> dict:
        return send(self.w3, node, self.contract.functions.updateNode(endpoint, peer_id))

    def add_stake(self, node: LocalAccount, amount: int) -> dict:
        self.token.ensure_allowance(node, self.address, amount)
        return send(self.w3, node, self.contract.functions.addStake(amount))

    def request_unstake(self, node: LocalAccount, amount: int) -> dict:
        return send(self.w3, node, self.contract.functions.requestUnstake(amount))

    def withdraw_stake(self, node: LocalAccount) -> dict:
        return send(self.w3, node, self.contract.functions.withdrawStake())

    def get_node(self, address: str) -> NodeInfo:
        stake, unbonding, ready_at, registered, endpoint, peer_id = call_view(self.contract.functions.getNode(address))
        return NodeInfo(address=address, registered=registered, stake=stake, unbonding=unbonding,
                        unbonding_ready_at=ready_at, endpoint=endpoint, peer_id=bytes(peer_id))

    def is_active_node(self, address: str) -> bool:
        return self.contract.functions.isActiveNode(address).call()

    def min_stake(self) -> int:
        return self.contract.functions.minStake().call()

    def unstake_delay(self) -> int:
        return self.contract.functions.unstakeDelay().call()

    # -- Datanets
    def register_datanet(self, owner: LocalAccount, name: str, records_root: str | bytes, record_count: int) -> str:
        """Register a Datanet owned by `owner`; returns its datanetId (0x-hex)."""
        send(self.w3, owner, self.contract.functions.registerDatanet(name, to_bytes32(records_root), record_count))
        return datanet_id(name, owner.address, records_root, record_count)

    def get_datanet(self, datanet_id_hex: str) -> DatanetInfo:
        owner, registered_at, root, count, name = call_view(
            self.contract.functions.getDatanet(to_bytes32(datanet_id_hex)))
        return DatanetInfo(datanet_id=datanet_id_hex.lower(), owner=owner, name=name, records_root=hex32(root),
                           record_count=count, registered_at=registered_at)

    # -- adapters
    def register_adapter(self, owner: LocalAccount, registration: AdapterRegistration) -> dict:
        """Register an adapter; Datanet shares are sent sorted by id, as the contract requires."""
        shares = sorted((to_bytes32(d), int(bps)) for d, bps in registration.datanet_shares)
        return send(self.w3, owner, self.contract.functions.registerAdapter(
            to_bytes32(registration.adapter_id), to_bytes32(registration.base_model_id), [d for d, _ in shares],
            [bps for _, bps in shares], registration.price_per_1k_tokens, registration.fetch_uri))

    def update_adapter(self, owner: LocalAccount, adapter_id: str, price_per_1k_tokens: int, fetch_uri: str) -> dict:
        return send(self.w3, owner, self.contract.functions.updateAdapter(to_bytes32(adapter_id),
                                                                          price_per_1k_tokens, fetch_uri))

    def transfer_adapter(self, owner: LocalAccount, adapter_id: str, to: str) -> dict:
        return send(self.w3, owner, self.contract.functions.transferAdapter(to_bytes32(adapter_id), to))

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        (owner, _count, registered_at, base_model, price, uri, datanet_ids, shares) = call_view(
            self.contract.functions.getAdapter(to_bytes32(adapter_id)))
        return AdapterInfo(adapter_id=adapter_id.lower(), owner=owner, base_model_id=hex32(base_model),
                           datanet_shares=tuple((hex32(d), s) for d, s in zip(datanet_ids, shares, strict=True)),
                           price_per_1k_tokens=price, fetch_uri=uri, registered_at=registered_at)

    # -- event readers
    def registered_nodes(self, from_block: int = 0) -> list[NodeInfo]:
        """Current records of every node that ever registered, in registration order."""
        events = self.contract.events.NodeRegistered().get_logs(from_block=from_block)
        return [self.get_node(e["args"]["node"]) for e in events]

    def registered_datanets(self, from_block: int = 0) -> list[DatanetInfo]:
        events = self.contract.events.DatanetRegistered().get_logs(from_block=from_block)
        return [self.get_datanet(hex32(e["args"]["datanetId"])) for e in events]

    def registered_adapters(self, from_block: int = 0, datanet: str | None = None) -> list[AdapterInfo]:
        """Every registered adapter (optionally only those with a share in `datanet`)."""
        events = self.contract.events.AdapterRegistered().get_logs(from_block=from_block)
        adapters = [self.get_adapter(hex32(e["args"]["adapterId"])) for e in events]
        if datanet is not None:
            adapters = [a for a in adapters if any(d == datanet.lower() for d, _ in a.datanet_shares)]
        return adapters

    def slashes(self, node: str | None = None, from_block: int = 0) -> list[dict]:
        filters = {"node": node} if node else None
        return [dict(e["args"]) for e in self.contract.events.NodeSlashed().get_logs(
            from_block=from_block, argument_filters=filters)]

