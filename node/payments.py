"""Payments intake: post-pay with a bounded credit, per DESIGN.md.

A request carries the voucher for everything already served on its channel.
The node serves only while `deposit - owed - reserved >= maxPrice(request)`
(and within the per-client credit cap); the price of the answer is added to
`owed`, which the next voucher must cover. `owed` is the sum of the prices in
this node's receipts for the channel, so it survives restarts with the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable

from node.errors import ChainUnavailable, InvalidVoucherSignature, PaymentRequired


def price_for_tokens(price_per_1k_tokens: int, tokens: int) -> int:
    """OPEN base units for `tokens` tokens, rounded up so a request never costs 0 by truncation."""
    return math.ceil(price_per_1k_tokens * tokens / 1000)


@dataclasses.dataclass(frozen=True)
class ChannelState:
    """What the chain says about a channel (read through the contracts handle, cached)."""

    channel_id: str
    client: str
    node: str
    deposit: int
    redeemed: int
    closing: bool


@dataclasses.dataclass(frozen=True)
class Voucher:
    """A client-signed promise: the cumulative amount paid on a channel."""

    channel_id: str
    cumulative_amount: int
    signature: str


@dataclasses.dataclass
class ChannelAccount:
    """The node's running view of one channel: what it served and what it holds vouchers for."""

    channel_id: str
    client: str
    owed: int = 0
    reserved: int = 0
    best_voucher: Voucher | None = None

    @property
    def paid(self) -> int:
        return self.best_voucher.cumulative_amount if self.best_voucher else 0


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Credit held for one in-flight request; settled with its real price or released."""

    channel_id: str
    client: str
    max_price: int


ChannelReader = Callable[[str], Awaitable[ChannelState]]
VoucherSignerRecovery = Callable[[Voucher], str]
OwedLoader = Callable[[str], Awaitable[tuple[int, Voucher | None]]]
VoucherSaver = Callable[[Voucher, str], Awaitable[None]]


class PaymentIntake:
    """Admits requests against channel credit; all methods run on the node's event loop."""

    def __init__(self, node_address: str, read_channel: ChannelReader, recover_signer: VoucherSignerRecovery,
                 load_account: OwedLoader, save_voucher: VoucherSaver, credit_cap: int | None = None,
                 channel_cache_seconds: float = 5.0) -> None:
        self._node = node_address.lower()
        self._read_channel = read_channel
        self._recover_signer = recover_signer
        self._load_account = load_account
        self._save_voucher = save_voucher
        self._credit_cap = credit_cap
        self._cache_seconds = channel_cache_seconds
        self._chain_cache: dict[str, tuple[float, ChannelState]] = {}
        self._accounts: dict[str, ChannelAccount] = {}
        self._lock = asyncio.Lock()

    async def channel(self, channel_id: str, refresh: bool = False) -> ChannelState:
        cached = self._chain_cache.get(channel_id)
        if cached and not refresh and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        try:
            state = await self._read_channel(channel_id)
        except Exception as error:  # the chain client raises many kinds; callers get one typed error
            if cached:
                return cached[1]
            raise ChainUnavailable(f"cannot read channel {channel_id} from the chain: {type(error).__name__}") from error
        self._chain_cache[channel_id] = (time.monotonic(), state)
        return state

    async def account(self, channel_id: str, client: str) -> ChannelAccount:
        account = self._accounts.get(channel_id)
        if account is None:
            owed, voucher = await self._load_account(channel_id)
            account = ChannelAccount(channel_id=channel_id, client=client, owed=owed, best_voucher=voucher)
            self._accounts[channel_id] = account
        return account

    async def accept_voucher(self, voucher: Voucher) -> ChannelAccount:
        """Check a voucher's signature against the channel's client and keep it if it pays more."""
        state = await self.channel(voucher.channel_id)
        self._check_channel_is_ours(state)
        try:
            signer = self._recover_signer(voucher)
        except Exception as error:  # malformed signature bytes
            raise InvalidVoucherSignature(f"voucher signature does not parse: {type(error).__name__}",
                                          channel_id=voucher.channel_id) from error
        if signer.lower() != state.client.lower():
            raise InvalidVoucherSignature("voucher is not signed by the channel's client",
                                          channel_id=voucher.channel_id, signer=signer, client=state.client)
        if voucher.cumulative_amount > state.deposit:
            raise PaymentRequired("voucher exceeds the channel's deposit", channel_id=voucher.channel_id,
                                  deposit=str(state.deposit), cumulative_amount=str(voucher.cumulative_amount))
        async with self._lock:
            account = await self.account(voucher.channel_id, state.client)
            if voucher.cumulative_amount > account.paid:
                await self._save_voucher(voucher, state.client)
                account.best_voucher = voucher
        return account

    async def reserve(self, channel_id: str | None, voucher: Voucher | None, max_price: int) -> Reservation:
        """Admit a request that may cost up to `max_price`, or raise PaymentRequired saying what to pay."""
        if not channel_id:
            raise PaymentRequired("a payment channel is required: send X-Longtail-Channel and a voucher",
                                  max_price=str(max_price))
        if voucher is not None:
            if voucher.channel_id.lower() != channel_id.lower():
                raise InvalidVoucherSignature("voucher is for another channel", channel_id=channel_id)
            await self.accept_voucher(voucher)
        state = await self.channel(channel_id)
        self._check_channel_is_ours(state)
        async with self._lock:
            account = await self.account(channel_id, state.client)
            if account.paid < account.owed:
                raise PaymentRequired("the voucher does not cover what was already served",
                                      channel_id=channel_id, owed=str(account.owed), paid=str(account.paid),
                                      pay_cumulative=str(account.owed))
            available = self._available(state, account)
            if available < max_price:
                state = await self.channel(channel_id, refresh=True)
                available = self._available(state, account)
                if available < max_price:
                    raise PaymentRequired("the channel's deposit does not cover this request",
                                          channel_id=channel_id, deposit=str(state.deposit), owed=str(account.owed),
                                          max_price=str(max_price), top_up=str(max_price - available))
            account.reserved += max_price
        return Reservation(channel_id=channel_id, client=state.client, max_price=max_price)

    async def settle(self, reservation: Reservation, price: int) -> int:
        """Charge `price` (<= the reservation) and return the cumulative amount the next voucher must cover."""
        async with self._lock:
            account = self._accounts[reservation.channel_id]
            account.reserved -= reservation.max_price
            account.owed += min(price, reservation.max_price)
            return account.owed

    async def release(self, reservation: Reservation) -> None:
        """The request failed before an answer: nothing is charged."""
        async with self._lock:
            self._accounts[reservation.channel_id].reserved -= reservation.max_price

    def _available(self, state: ChannelState, account: ChannelAccount) -> int:
        available = state.deposit - account.owed - account.reserved
        if self._credit_cap is not None:
            available = min(available, self._credit_cap - account.reserved)
        return available

    def accounts(self) -> list[ChannelAccount]:
        return list(self._accounts.values())

    def _check_channel_is_ours(self, state: ChannelState) -> None:
        if state.node.lower() != self._node:
            raise PaymentRequired("the channel pays another node", channel_id=state.channel_id, node=state.node)
        if state.closing:
            raise PaymentRequired("the channel is closing; open a new one", channel_id=state.channel_id)
