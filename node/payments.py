"""Payments intake: post-pay with a bounded credit, per DESIGN.md.

A request carries the voucher for everything already served on its channel.
The node serves only while `deposit - owed - reserved >= maxPrice(request)`
(and within the per-client credit cap); the price of the answer is added to
`owed`, which the next voucher must cover. `owed` is the sum of the prices in
this node's receipts for the channel, so it survives restarts with the log.

A voucher that comes with a request and pays more is kept in memory at once;
the channel's best voucher not yet on disk (`unstored_voucher`) is written in
the transaction of the next receipt on that channel, whichever request it
belongs to, so no answer leaves while a voucher the node holds is only in
memory, at the cost of one statement, not a second commit. A request that
ends without a receipt (refused, failed) writes it on its own before it
returns, as does a voucher sent alone (`accept_voucher`); a failed write
leaves it unstored, so the next receipt or write tries again. Writes need no
ordering here: the store keeps a voucher only over a lower one.

The chain's view of a channel is cached and, once stale, refreshed in the
background while the cached view keeps serving (a top-up that a request needs
is read at once). A view older than `max_view_seconds` (far below the thaw
period) never admits a request: it is read again first, and a chain that cannot
be read then refuses the request instead of trusting the old view. A view that
shows a withdrawal started calls `on_withdraw_started`, which the checkpointer
sets to redeem that channel at once.

Every paid request is authorised by the channel's client (`authorize`, before
any work): an EIP-712 `RequestAuthorization` over the request, fresh, used once
(docs/security.md). Credit: a channel is never extended more than its deposit
minus what it owes and what is reserved, and no more than `credit_cap` beyond its
best voucher; cold and warm channels alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from longtail.node.errors import ChainUnavailable, InvalidVoucherSignature, PaymentRequired
from longtail.node.vouchers import MAX_AUTHORIZATION_SECONDS, RequestAuthorization

log = logging.getLogger("longtail.payments")


def price_for_tokens(price_per_1k_tokens: int, tokens: int) -> int:
    """OPEN base units for `tokens` tokens, rounded up so a request never costs 0 by truncation."""
    # Integers only: a float product loses base units past 2**53 (10**18 + 7 per 1k over 4,999 tokens was off by tens).
    return -(-price_per_1k_tokens * tokens // 1000)


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
    stored: int = 0  # the highest voucher amount known to be on disk

    @property
    def paid(self) -> int:
        return self.best_voucher.cumulative_amount if self.best_voucher else 0

    @property
    def unstored_voucher(self) -> Voucher | None:
        return self.best_voucher if self.paid > self.stored else None

    def mark_stored(self, voucher: Voucher) -> None:
        self.stored = max(self.stored, voucher.cumulative_amount)


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
                 channel_cache_seconds: float = 30.0, max_view_seconds: float = 60.0,
                 require_authorization: bool = True) -> None:
        """`recover_signer` recovers the signer of a Voucher and of a RequestAuthorization alike.
        `require_authorization=False` is for harnesses whose subject is not payment (fault injection with fake
        signatures); a node always requires it."""
        self._node = node_address.lower()
        self._read_channel = read_channel
        self._recover_signer = recover_signer
        self._load_account = load_account
        self._save_voucher = save_voucher
        self._credit_cap = credit_cap
        self._cache_seconds = channel_cache_seconds
        self.max_view_seconds = max(max_view_seconds, channel_cache_seconds)
        self._require_authorization = require_authorization
        self._nonces: dict[str, int] = {}  # authorization nonce -> expiry: each is used once
        self.on_withdraw_started: Callable[[str], None] | None = None
        self._chain_cache: dict[str, tuple[float, ChannelState]] = {}
        self._refreshing: dict[str, asyncio.Task] = {}
        self._accounts: dict[str, ChannelAccount] = {}
        self._lock = asyncio.Lock()

    async def channel(self, channel_id: str, refresh: bool = False) -> ChannelState:
        cached = self._chain_cache.get(channel_id)
        if cached and not refresh and time.monotonic() - cached[0] >= self.max_view_seconds:
            # Too old to admit on: a client may have thawed and withdrawn meanwhile (issue 20, attack 3).
            return await self._read(channel_id, None)
        if cached and not refresh:
            if time.monotonic() - cached[0] >= self._cache_seconds and channel_id not in self._refreshing:
                # Stale: serve the cached view now (a chain read costs tens of ms) and refresh it meanwhile.
                task = asyncio.ensure_future(self._read(channel_id, cached))
                self._refreshing[channel_id] = task
                task.add_done_callback(lambda _: self._refreshing.pop(channel_id, None))
            return cached[1]
        return await self._read(channel_id, cached)

    async def _read(self, channel_id: str, cached: tuple[float, ChannelState] | None) -> ChannelState:
        try:
            state = await self._read_channel(channel_id)
        except Exception as error:  # the chain client raises many kinds; callers get one typed error
            if cached:
                return cached[1]
            raise ChainUnavailable(f"cannot read channel {channel_id} from the chain: {type(error).__name__}") from error
        self._chain_cache[channel_id] = (time.monotonic(), state)
        if state.closing and (cached is None or not cached[1].closing) and self.on_withdraw_started is not None:
            self.on_withdraw_started(channel_id)
        return state

    async def authorize(self, channel_id: str | None, authorization: RequestAuthorization | None) -> None:
        """Refuse, before any work, a request that its channel's client did not sign (or signed for another
        request, or that was already used or expired), or whose channel cannot pay for anything more."""
        if not channel_id:
            raise PaymentRequired("a payment channel is required: send X-Longtail-Channel, a request authorization "
                                  "and a voucher for what was served")
        if not self._require_authorization:
            return
        if authorization is None:
            raise PaymentRequired("a paid request must be signed by the channel's client: send the "
                                  "X-Longtail-Auth-Nonce, -Expires and -Signature headers (docs/security.md)",
                                  channel_id=channel_id)
        if authorization.channel_id.lower() != channel_id.lower():
            raise InvalidVoucherSignature("the authorization is for another channel", channel_id=channel_id)
        now = int(time.time())
        if not now <= authorization.expires_at <= now + MAX_AUTHORIZATION_SECONDS:
            raise PaymentRequired(f"the authorization expired or is valid for more than {MAX_AUTHORIZATION_SECONDS} "
                                  "s; sign a fresh one", channel_id=channel_id, expires_at=authorization.expires_at,
                                  now=now)
        if authorization.nonce in self._nonces:
            raise InvalidVoucherSignature("this authorization was already used; sign each request once",
                                          channel_id=channel_id)
        state = await self.channel(channel_id)
        self._check_channel_is_ours(state)
        try:
            signer = self._recover_signer(authorization)
        except Exception as error:  # malformed signature bytes
            raise InvalidVoucherSignature(f"authorization signature does not parse: {type(error).__name__}",
                                          channel_id=channel_id) from error
        if signer.lower() != state.client.lower():
            raise InvalidVoucherSignature("the request is not signed by the channel's client",
                                          channel_id=channel_id, signer=signer, client=state.client)
        if authorization.nonce in self._nonces:  # a twin that passed the first check during the chain read
            raise InvalidVoucherSignature("this authorization was already used; sign each request once",
                                          channel_id=channel_id)
        self._remember_nonce(authorization.nonce, authorization.expires_at, now)
        async with self._lock:
            account = await self.account(channel_id, state.client)
            if state.deposit - account.owed - account.reserved <= 0:
                raise PaymentRequired("the channel's deposit is spent; top it up", channel_id=channel_id,
                                      deposit=str(state.deposit), owed=str(account.owed))

    def _remember_nonce(self, nonce: str, expires_at: int, now: int) -> None:
        if len(self._nonces) >= 4096:  # prune the expired ones now and then: each is refused by its expiry anyway
            for old in [n for n, expiry in self._nonces.items() if expiry < now]:
                del self._nonces[old]
        self._nonces[nonce] = expires_at

    async def account(self, channel_id: str, client: str) -> ChannelAccount:
        account = self._accounts.get(channel_id)
        if account is None:
            owed, voucher = await self._load_account(channel_id)
            account = ChannelAccount(channel_id=channel_id, client=client, owed=owed, best_voucher=voucher,
                                     stored=voucher.cumulative_amount if voucher else 0)
            self._accounts[channel_id] = account
        return account

    async def accept_voucher(self, voucher: Voucher) -> ChannelAccount:
        """Check a voucher's signature against the channel's client and keep it if it pays more (durably)."""
        account = await self._accept(voucher)
        await self._store(account)
        return account

    async def _accept(self, voucher: Voucher) -> ChannelAccount:
        """Check a voucher and keep it in memory if it pays more (`unstored_voucher` then says it is not stored)."""
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
                account.best_voucher = voucher
            return account

    def unstored_voucher(self, channel_id: str) -> Voucher | None:
        """The channel's best voucher if it is not on disk yet: the node writes it with its next receipt."""
        account = self._accounts.get(channel_id)
        return account.unstored_voucher if account else None

    def mark_stored(self, channel_id: str, voucher: Voucher) -> None:
        """`voucher` was committed (with a receipt)."""
        self._accounts[channel_id].mark_stored(voucher)

    async def _store(self, account: ChannelAccount) -> None:
        """Write the channel's unstored voucher, if any, on its own (raises if the write fails)."""
        voucher = account.unstored_voucher
        if voucher is not None:
            await self._save_voucher(voucher, account.client)
            account.mark_stored(voucher)

    async def _store_quietly(self, account: ChannelAccount) -> None:
        """`_store` on a path that is already failing: a failed write is logged (and left for the next try), the
        first error stands."""
        try:
            await self._store(account)
        except Exception as error:  # the store's own error; the request's error is the one to report
            log.error("voucher on channel %s could not be stored: %s", account.channel_id, error)

    async def reserve(self, channel_id: str | None, voucher: Voucher | None, max_price: int) -> Reservation:
        """Admit a request that may cost up to `max_price`, or raise PaymentRequired saying what to pay."""
        if not channel_id:
            raise PaymentRequired("a payment channel is required: send X-Longtail-Channel and a voucher",
                                  max_price=str(max_price))
        account = None
        if voucher is not None:
            if voucher.channel_id.lower() != channel_id.lower():
                raise InvalidVoucherSignature("voucher is for another channel", channel_id=channel_id)
            account = await self._accept(voucher)
        try:
            return await self._reserve(channel_id, max_price)
        except BaseException:
            if account is not None:  # even a refusal leaves only after the voucher it kept is stored
                await self._store_quietly(account)
            raise

    async def _reserve(self, channel_id: str, max_price: int) -> Reservation:
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
        """The request failed before its receipt: nothing is charged, and the channel's voucher is stored."""
        async with self._lock:
            account = self._accounts[reservation.channel_id]
            account.reserved -= reservation.max_price
        await self._store_quietly(account)

    def _available(self, state: ChannelState, account: ChannelAccount) -> int:
        available = state.deposit - account.owed - account.reserved
        if self._credit_cap is not None:
            # Credit is what the node served or holds for requests beyond the best voucher it has.
            available = min(available, self._credit_cap - max(account.owed - account.paid, 0) - account.reserved)
        return available

    def accounts(self) -> list[ChannelAccount]:
        return list(self._accounts.values())

    def _check_channel_is_ours(self, state: ChannelState) -> None:
        if state.node.lower() != self._node:
            raise PaymentRequired("the channel pays another node", channel_id=state.channel_id, node=state.node)
        if state.closing:
            raise PaymentRequired("the channel is closing; open a new one", channel_id=state.channel_id)


def authorization_from_headers(headers, channel_id: str | None, request) -> RequestAuthorization | None:
    """The request authorization in `headers`, bound to `request` (a CompletionRequest) as the node parsed it:
    its model, its prompt hash (the receipt's promptHash) and its max_tokens."""
    from longtail.attribution.receipts import keccak
    from longtail.node.errors import BadRequest
    from longtail.node.service import prompt_text_as_received  # the service imports this module
    from longtail.node.vouchers import parse_authorization

    try:
        prompt_hash = keccak(prompt_text_as_received(request).encode("utf-8"))
        return parse_authorization(headers, channel_id, request.model, prompt_hash, request.max_tokens)
    except UnicodeEncodeError:  # a lone surrogate (a libp2p body skips the HTTP edge's Unicode check)
        raise BadRequest("the model or prompt is not valid Unicode") from None
