"""Typed calls to the AttributionLedger: checkpoints and their payouts, claims, Datanet distributions,
disputes; and the event readers an auditor replays history from."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3

from longtail.contracts.artifacts import load_artifact
from longtail.contracts.chain import call_view, event_args, hex32, send, to_bytes32
from longtail.contracts.payouts import Allocation, PayoutSplit
from longtail.contracts.token import OpenToken

DISPUTE_STATUS = ("none", "open", "answered", "slashed")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A node's latest checkpoint (epoch 0 = none yet)."""

    node: str
    tree_size: int
    epoch: int
    posted_at: int
    root_hash: str


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """One CheckpointPosted event joined with its payouts, as an auditor replays it."""

    node: str
    epoch: int
    tree_size: int
    root_hash: str
    revenue: int
    node_amount: int
    adapters: tuple[Allocation, ...]          # gross revenue per adapter, as declared
    adapter_owner_amounts: tuple[Allocation, ...]
    datanets: tuple[Allocation, ...]
    block_number: int
    tx_hash: str


@dataclasses.dataclass(frozen=True)
class DistributionInfo:
    distribution_id: int
    datanet_id: str
    root: str
    leaf_count: int
    total: int
    claimed: int


@dataclasses.dataclass(frozen=True)
class DisputeInfo:
    dispute_id: int
    node: str
    seq: int
    challenger: str
    deadline: int
    tree_size: int
    status: str
    bond: int
    root_hash: str
    leaf_hash: str


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class AttributionLedger:
    """The AttributionLedger at `address`."""

    def __init__(self, w3: Web3, address: str, token: OpenToken) -> None:
        self.w3 = w3
        self.address = address
        self.token = token
        abi = load_artifact("AttributionLedger").abi
        self.contract = w3.eth.contract(address=address, abi=abi)
        digest_fn = next(i for i in abi if i.get("name") == "receiptDigest")
        # (solidity name, type) in struct order, read from the ABI so it can never drift from the contract.
        self.receipt_fields: tuple[tuple[str, str], ...] = tuple(
            (c["name"], c["type"]) for c in digest_fn["inputs"][0]["components"])

    # -- parameters
    def split(self) -> PayoutSplit:
        return PayoutSplit(self.contract.functions.adapterShareBps().call(),
                           self.contract.functions.datanetShareBps().call())

    def dispute_window(self) -> int:
        return self.contract.functions.disputeWindow().call()

    def dispute_bond(self) -> int:
        return self.contract.functions.disputeBond().call()

    def slash_amount(self) -> int:
        return self.contract.functions.slashAmount().call()

    # -- checkpoints
    def post_checkpoint(self, node: LocalAccount, tree_size: int, root_hash: str | bytes,
                        consistency_proof: Sequence[bytes], adapters: Sequence[Allocation] = (),
                        datanets: Sequence[Allocation] = ()) -> int:
        """Post the node's log checkpoint and split the declared revenue; returns the new epoch."""
        receipt = send(self.w3, node, self.contract.functions.postCheckpoint(
            tree_size, to_bytes32(root_hash), [bytes(p) for p in consistency_proof],
            [(to_bytes32(a.id), a.amount) for a in adapters], [(to_bytes32(d.id), d.amount) for d in datanets]))
        return int(event_args(self.contract.events.CheckpointPosted(), receipt)[0]["epoch"])

    def latest_checkpoint(self, node: str) -> CheckpointInfo:
        tree_size, epoch, posted_at, root = self.contract.functions.latestCheckpoint(node).call()
        return CheckpointInfo(node=node, tree_size=tree_size, epoch=epoch, posted_at=posted_at, root_hash=hex32(root))

    def checkpoints(self, node: str | None = None, from_block: int = 0) -> list[CheckpointRecord]:
        """Every checkpoint (of `node`, or of all nodes) with its payouts, oldest first."""
        filters = {"node": node} if node else None
        events = self.contract.events
        posted = events.CheckpointPosted().get_logs(from_block=from_block, argument_filters=filters)
        adapter_paid = events.AdapterPaid().get_logs(from_block=from_block, argument_filters=filters)
        datanet_paid = events.DatanetPaid().get_logs(from_block=from_block, argument_filters=filters)
        node_paid = events.NodePaid().get_logs(from_block=from_block, argument_filters=filters)
        by_tx: dict[bytes, dict[str, list]] = {}
        for kind, logs in (("adapters", adapter_paid), ("datanets", datanet_paid), ("node", node_paid)):
            for log in logs:
                by_tx.setdefault(bytes(log["transactionHash"]), {}).setdefault(kind, []).append(log["args"])
        records = []
        for log in posted:
            args = log["args"]
            parts = by_tx.get(bytes(log["transactionHash"]), {})
            records.append(CheckpointRecord(
                node=args["node"], epoch=args["epoch"], tree_size=args["treeSize"], root_hash=hex32(args["rootHash"]),
                revenue=args["revenue"], node_amount=sum(p["amount"] for p in parts.get("node", [])),
                adapters=tuple(Allocation(hex32(p["adapterId"]), p["revenue"]) for p in parts.get("adapters", [])),
                adapter_owner_amounts=tuple(Allocation(hex32(p["adapterId"]), p["amount"])
                                            for p in parts.get("adapters", [])),
                datanets=tuple(Allocation(hex32(p["datanetId"]), p["amount"]) for p in parts.get("datanets", [])),
                block_number=log["blockNumber"], tx_hash=HexBytes(log["transactionHash"]).to_0x_hex()))
        return records

    # -- claims
    def claimable(self, account: str) -> int:
        return self.contract.functions.claimable(account).call()

    def claim(self, account: LocalAccount) -> int:
        """Withdraw everything `account` can claim; returns the amount."""
        receipt = send(self.w3, account, self.contract.functions.claim())
        return int(event_args(self.contract.events.Claimed(), receipt)[0]["amount"])

    def burned(self) -> int:
        """Slashed OPEN beyond the challengers' rewards: held by the ledger, claimable by no one."""
        return self.contract.functions.burned().call()

    def open_disputes(self, node: str) -> int:
        return self.contract.functions.openDisputes(node).call()

    def challenger_reward_bps(self) -> int:
        return self.contract.functions.CHALLENGER_REWARD_BPS().call()

    def datanet_pool(self, datanet_id: str) -> int:
        return self.contract.functions.datanetPool(to_bytes32(datanet_id)).call()

    # -- Datanet distributions
    def publish_distribution(self, owner: LocalAccount, datanet_id: str, root: str | bytes, leaf_count: int,
                             total: int) -> int:
        """Move `total` from the Datanet's pool into a distribution over an RFC 9162 tree; returns its id."""
        receipt = send(self.w3, owner, self.contract.functions.publishDistribution(
            to_bytes32(datanet_id), to_bytes32(root), leaf_count, total))
        return int(event_args(self.contract.events.DistributionPublished(), receipt)[0]["distributionId"])

    def claim_distribution(self, sender: LocalAccount, distribution_id: int, leaf_index: int, account: str,
                           amount: int, proof: Sequence[bytes]) -> dict:
        return send(self.w3, sender, self.contract.functions.claimDistribution(
            distribution_id, leaf_index, account, amount, [bytes(p) for p in proof]))

    def get_distribution(self, distribution_id: int) -> DistributionInfo:
        datanet, root, leaf_count, total, claimed = self.contract.functions.getDistribution(distribution_id).call()
        return DistributionInfo(distribution_id=distribution_id, datanet_id=hex32(datanet), root=hex32(root),
                                leaf_count=leaf_count, total=total, claimed=claimed)

    def is_distribution_claimed(self, distribution_id: int, leaf_index: int) -> bool:
        return self.contract.functions.isDistributionClaimed(distribution_id, leaf_index).call()

    # -- receipts and disputes
    def receipt_tuple(self, receipt: Mapping[str, Any] | Any) -> tuple:
        """The Receipt struct as ABI values, from a mapping (Solidity or snake_case names) or an object
        with snake_case attributes (attribution.receipts.Receipt)."""
        values = []
        for name, kind in self.receipt_fields:
            if isinstance(receipt, Mapping):
                value = receipt[name] if name in receipt else receipt[_snake(name)]
            else:
                value = getattr(receipt, _snake(name))
            values.append(to_bytes32(value) if kind == "bytes32" else (
                Web3.to_checksum_address(value) if kind == "address" else int(value)))
        return tuple(values)

    def receipt_digest(self, receipt: Mapping[str, Any] | Any) -> bytes:
        return bytes(self.contract.functions.receiptDigest(self.receipt_tuple(receipt)).call())

    def receipt_leaf_hash(self, receipt: Mapping[str, Any] | Any) -> bytes:
        return bytes(self.contract.functions.receiptLeafHash(self.receipt_tuple(receipt)).call())

    def open_dispute(self, challenger: LocalAccount, receipt: Mapping[str, Any] | Any, signature: str | bytes) -> int:
        """Lock the bond and challenge the node to prove the receipt is in its log; returns the dispute id."""
        self.token.ensure_allowance(challenger, self.address, self.dispute_bond())
        tx = send(self.w3, challenger, self.contract.functions.openDispute(self.receipt_tuple(receipt),
                                                                           bytes(HexBytes(signature))))
        return int(event_args(self.contract.events.DisputeOpened(), tx)[0]["disputeId"])

    def answer_dispute(self, sender: LocalAccount, dispute_id: int, inclusion_proof: Sequence[bytes]) -> dict:
        return send(self.w3, sender, self.contract.functions.answerDispute(dispute_id, [bytes(p) for p in inclusion_proof]))

    def resolve_dispute(self, sender: LocalAccount, dispute_id: int) -> int:
        """Slash the node of an unanswered dispute after its window; returns the OPEN slashed."""
        tx = send(self.w3, sender, self.contract.functions.resolveDispute(dispute_id))
        return int(event_args(self.contract.events.DisputeResolved(), tx)[0]["slashed"])

    def prove_mismatch(self, challenger: LocalAccount, receipt: Mapping[str, Any] | Any, signature: str | bytes,
                       committed_leaf: bytes, inclusion_proof: Sequence[bytes]) -> int:
        """Prove the checkpoint holds another leaf at the receipt's seq; returns the OPEN slashed."""
        tx = send(self.w3, challenger, self.contract.functions.proveMismatch(
            self.receipt_tuple(receipt), bytes(HexBytes(signature)), bytes(committed_leaf),
            [bytes(p) for p in inclusion_proof]))
        return int(event_args(self.contract.events.MismatchProven(), tx)[0]["slashed"])

    def get_dispute(self, dispute_id: int) -> DisputeInfo:
        node, seq, challenger, deadline, tree_size, status, bond, root, leaf = call_view(
            self.contract.functions.getDispute(dispute_id))
        return DisputeInfo(dispute_id=dispute_id, node=node, seq=seq, challenger=challenger, deadline=deadline,
                           tree_size=tree_size, status=DISPUTE_STATUS[status], bond=bond, root_hash=hex32(root),
                           leaf_hash=hex32(leaf))

    def disputes(self, node: str | None = None, from_block: int = 0) -> list[DisputeInfo]:
        """Current state of every dispute opened (against `node`, or all), oldest first."""
        filters = {"node": node} if node else None
        events = self.contract.events.DisputeOpened().get_logs(from_block=from_block, argument_filters=filters)
        return [self.get_dispute(e["args"]["disputeId"]) for e in events]
