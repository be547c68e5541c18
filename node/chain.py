"""The node's calls to the chain, as async methods over the synchronous web3 handle.

web3.py blocks, so every call runs in a worker thread; errors of any kind
(connection refused, timeout, revert) surface as `ChainError` with the reason,
so the payment intake and the checkpointer can retry without knowing web3.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TypeVar

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import RPCEndpoint

from longtail.contracts.client import LongtailContracts
from longtail.contracts.deployment import Deployment
from longtail.contracts.ledger import CheckpointInfo, CheckpointRecord
from longtail.contracts.payouts import Allocation, PayoutSplit
from longtail.contracts.vouchers import SignedVoucher
from longtail.node.payments import ChannelState, Voucher
from longtail.node.vouchers import RequestAuthorization, VoucherDomain, recover_authorization_signer

T = TypeVar("T")


class ChainError(RuntimeError):
    """A chain call failed; `reason` says why (down, reverted, wrong chain)."""


class ChainGateway:
    """One node's view of the contracts: its key signs its own transactions."""

    def __init__(self, rpc_url: str, deployment: Deployment, account: LocalAccount, timeout: float = 10.0) -> None:
        self.rpc_url = rpc_url
        self.deployment = deployment
        self.account = account
        # web3's validation middleware asks for the chain id before every eth_call; a chain's id does not change
        # under a running node, so the first answer is kept (per thread, web3's cache key): a channel read is one
        # round trip instead of two.
        self._w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, cache_allowed_requests=True,
                                          cacheable_requests={RPCEndpoint("eth_chainId")},
                                          request_cache_validation_threshold=None))
        self._contracts: LongtailContracts | None = None
        self.vouchers = VoucherDomain(deployment.chain_id, deployment.channels)
        self._lock = asyncio.Lock()  # one transaction at a time keeps nonces in order

    @property
    def contracts(self) -> LongtailContracts:
        if self._contracts is None:
            self._contracts = LongtailContracts.connect(self._w3, self.deployment)
        return self._contracts

    async def _call(self, function: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.to_thread(function)
        except Exception as error:  # web3 raises many types; callers need one, with the reason kept
            self._contracts = None if "connect" in str(error).lower() else self._contracts
            raise ChainError(f"{what}: {type(error).__name__}: {error}") from error

    async def _transact(self, function: Callable[[], T], what: str) -> T:
        async with self._lock:
            return await self._call(function, what)

    # --- reads ------------------------------------------------------------------------------------

    async def read_channel(self, channel_id: str) -> ChannelState:
        info = await self._call(lambda: self.contracts.channels.get_channel(channel_id), f"read channel {channel_id}")
        return ChannelState(channel_id=channel_id, client=info.client, node=info.node, deposit=info.deposit,
                            redeemed=info.redeemed, closing=info.closing)

    def recover_voucher_signer(self, voucher: Voucher | RequestAuthorization) -> str:
        """The signer of a voucher or of a request authorization (both in the PaymentChannels domain)."""
        if isinstance(voucher, RequestAuthorization):
            return recover_authorization_signer(self.vouchers, voucher)
        signed = SignedVoucher(voucher.channel_id, voucher.cumulative_amount, voucher.signature)
        return self.vouchers.recover(signed)

    async def latest_checkpoint(self) -> CheckpointInfo:
        return await self._call(lambda: self.contracts.ledger.latest_checkpoint(self.account.address),
                                "read latest checkpoint")

    async def checkpoints(self, node: str | None = None) -> list[CheckpointRecord]:
        return await self._call(lambda: self.contracts.ledger.checkpoints(node or self.account.address),
                                "read checkpoints")

    async def unreleased_revenue(self) -> int:
        return await self._call(lambda: self.contracts.channels.revenue(self.account.address), "read revenue")

    async def block_number(self) -> int:
        return await self._call(lambda: self._w3.eth.block_number, "read block number")

    async def withdrawals_started(self, from_block: int, to_block: int) -> list[str]:
        """Channels (any node's) whose client started a withdrawal in blocks [from_block, to_block]."""
        return await self._call(lambda: self.contracts.channels.withdrawals_started(from_block, to_block),
                                "read withdrawals")

    async def registered_endpoints(self) -> list[str]:
        """HTTP endpoints of every node registered on chain (where adapters can be fetched from)."""
        nodes = await self._call(lambda: self.contracts.registry.registered_nodes(
            from_block=self.deployment.block_number), "read registered nodes")
        return [n.endpoint for n in nodes if n.endpoint]

    async def adapter_registration(self, adapter_id: str):
        return await self._call(lambda: self.contracts.registry.get_adapter(adapter_id), f"read adapter {adapter_id}")

    async def split(self) -> PayoutSplit:
        return await self._call(lambda: self.contracts.ledger.split(), "read payout split")

    @functools.cache  # noqa: B019  (one gateway per node; adapter registrations are immutable per id)
    def _adapter_has_datanets(self, adapter_id: str) -> bool:
        return bool(self.contracts.registry.get_adapter(adapter_id).datanet_shares)

    async def adapters_with_datanets(self, adapter_ids: set[str]) -> set[str]:
        def read() -> set[str]:
            return {a for a in adapter_ids if int(a, 16) != 0 and self._adapter_has_datanets(a)}
        return await self._call(read, "read adapter registrations")

    # --- transactions -----------------------------------------------------------------------------

    async def redeem(self, voucher: Voucher) -> int:
        signed = SignedVoucher(voucher.channel_id, voucher.cumulative_amount, voucher.signature)
        return await self._transact(lambda: self.contracts.channels.redeem(self.account, signed),
                                    f"redeem voucher on {voucher.channel_id}")

    async def post_checkpoint(self, tree_size: int, root_hash: bytes, proof: list[bytes],
                              adapters: tuple[Allocation, ...], datanets: tuple[Allocation, ...]) -> int:
        return await self._transact(
            lambda: self.contracts.ledger.post_checkpoint(self.account, tree_size, root_hash, proof, adapters, datanets),
            f"post checkpoint of size {tree_size}")
