"""Typed calls to PaymentChannels: deposits (also by permit), voucher redemption, thawed withdrawal; events."""

from __future__ import annotations

import dataclasses

from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from hexbytes import HexBytes
from web3 import Web3

from longtail.contracts.artifacts import load_artifact
from longtail.contracts.chain import call_view, event_args, hex32, send, to_bytes32
from longtail.contracts.token import OpenToken
from longtail.contracts.vouchers import SignedVoucher, sign_voucher


@dataclasses.dataclass(frozen=True)
class ChannelInfo:
    """A channel as the chain holds it; `node` is the zero address for a channel never opened."""

    channel_id: str
    client: str
    node: str
    deposit: int
    redeemed: int
    thaw_ends_at: int

    @property
    def closing(self) -> bool:
        """A withdrawal is thawing: the node should stop serving on credit from this channel."""
        return self.thaw_ends_at != 0

    @property
    def available(self) -> int:
        """What vouchers can still be redeemed for."""
        return self.deposit - self.redeemed


@dataclasses.dataclass(frozen=True)
class Redemption:
    """A VoucherRedeemed event: the signed aggregate and what it paid, so anyone can replay history."""

    channel_id: str
    node: str
    cumulative_amount: int
    paid: int
    signature: str
    block_number: int


def channel_id_of(client: str, node: str) -> str:
    """keccak256(abi.encode(client, node)): one channel per (client, node) pair."""
    return hex32(keccak(abi_encode(["address", "address"], [client, node])))


class PaymentChannels:
    """The PaymentChannels contract at `address`."""

    def __init__(self, w3: Web3, address: str, token: OpenToken) -> None:
        self.w3 = w3
        self.address = address
        self.token = token
        self.contract = w3.eth.contract(address=address, abi=load_artifact("PaymentChannels").abi)

    def deposit(self, client: LocalAccount, node: str, amount: int) -> str:
        """Approve and deposit `amount` into the client's channel to `node`; returns the channel id."""
        self.token.ensure_allowance(client, self.address, amount)
        send(self.w3, client, self.contract.functions.deposit(node, amount))
        return channel_id_of(client.address, node)

    def deposit_with_permit(self, client: LocalAccount, node: str, amount: int, deadline: int) -> str:
        """Sign a permit and deposit in one transaction (no separate approve)."""
        permit = self.token.sign_permit(client, self.address, amount, deadline)
        send(self.w3, client, self.contract.functions.depositWithPermit(node, amount, deadline, permit.v, permit.r,
                                                                        permit.s))
        return channel_id_of(client.address, node)

    def sign_voucher(self, client: LocalAccount, channel_id: str, cumulative_amount: int) -> SignedVoucher:
        """A voucher for this deployment's chain and contract."""
        return sign_voucher(client, channel_id, cumulative_amount, self.w3.eth.chain_id, self.address)

    def redeem(self, node: LocalAccount, voucher: SignedVoucher) -> int:
        """Redeem the highest voucher; returns what this call paid (the increase, capped at the deposit)."""
        receipt = send(self.w3, node, self.contract.functions.redeem(
            to_bytes32(voucher.channel_id), voucher.cumulative_amount, bytes(HexBytes(voucher.signature))))
        return int(event_args(self.contract.events.VoucherRedeemed(), receipt)[0]["paid"])

    def start_withdraw(self, client: LocalAccount, channel_id: str) -> int:
        """Start thawing; returns the unix time from which finish_withdraw works."""
        receipt = send(self.w3, client, self.contract.functions.startWithdraw(to_bytes32(channel_id)))
        return int(event_args(self.contract.events.WithdrawStarted(), receipt)[0]["thawEndsAt"])

    def cancel_withdraw(self, client: LocalAccount, channel_id: str) -> dict:
        return send(self.w3, client, self.contract.functions.cancelWithdraw(to_bytes32(channel_id)))

    def finish_withdraw(self, client: LocalAccount, channel_id: str) -> int:
        """Take back everything not redeemed; returns the refund."""
        receipt = send(self.w3, client, self.contract.functions.finishWithdraw(to_bytes32(channel_id)))
        return int(event_args(self.contract.events.Withdrawn(), receipt)[0]["refund"])

    def get_channel(self, channel_id: str) -> ChannelInfo:
        client, thaw_ends_at, node, deposit, redeemed = call_view(
            self.contract.functions.getChannel(to_bytes32(channel_id)))
        return ChannelInfo(channel_id=channel_id.lower(), client=client, node=node, deposit=deposit,
                           redeemed=redeemed, thaw_ends_at=thaw_ends_at)

    def revenue(self, node: str) -> int:
        """Redeemed OPEN of `node` that no checkpoint has split yet."""
        return self.contract.functions.revenue(node).call()

    def thaw_period(self) -> int:
        return self.contract.functions.thawPeriod().call()

    def voucher_digest(self, channel_id: str, cumulative_amount: int) -> bytes:
        """The digest as the contract computes it (for cross-checking the off-chain signer)."""
        return bytes(self.contract.functions.voucherDigest(to_bytes32(channel_id), cumulative_amount).call())

    # -- event readers
    def redemptions(self, channel_id: str | None = None, node: str | None = None, from_block: int = 0) -> list[Redemption]:
        filters: dict = {}
        if channel_id:
            filters["channelId"] = to_bytes32(channel_id)
        if node:
            filters["node"] = node
        events = self.contract.events.VoucherRedeemed().get_logs(from_block=from_block,
                                                                  argument_filters=filters or None)
        return [Redemption(channel_id=hex32(e["args"]["channelId"]), node=e["args"]["node"],
                           cumulative_amount=e["args"]["cumulativeAmount"], paid=e["args"]["paid"],
                           signature="0x" + bytes(e["args"]["signature"]).hex(), block_number=e["blockNumber"])
                for e in events]

    def withdrawals_started(self, from_block: int, to_block: int) -> list[str]:
        """Ids of channels whose client started a withdrawal in blocks [from_block, to_block]."""
        events = self.contract.events.WithdrawStarted().get_logs(from_block=from_block, to_block=to_block)
        return list(dict.fromkeys(hex32(e["args"]["channelId"]) for e in events))

    def channels_of(self, client: str | None = None, node: str | None = None, from_block: int = 0) -> list[str]:
        """Ids of channels that received deposits, filtered by client and/or node, oldest first."""
        filters: dict = {}
        if client:
            filters["client"] = client
        if node:
            filters["node"] = node
        events = self.contract.events.Deposited().get_logs(from_block=from_block, argument_filters=filters or None)
        seen: dict[str, None] = {}
        for e in events:
            seen.setdefault(hex32(e["args"]["channelId"]), None)
        return list(seen)
