"""The checkpointer: every N receipts or T seconds, redeem vouchers, then post the log's checkpoint.

Redeem first, because a checkpoint can only split revenue the node already
redeemed. A failed round (chain down, revert) is retried with exponential
backoff; nothing is marked done until the chain accepted it, and the next
round starts again from the chain's own latest checkpoint, so a receipt is
never lost or counted twice.

Vouchers are redeemed channel by channel: one that the chain refuses (its
client withdrew, the channel is exhausted) is logged and parked until the node
holds a better voucher for that channel, and the round goes on to the other
channels and the checkpoint (issue 20, attack 4). A client that starts a
withdrawal gets its channel redeemed at once, not at the next round: the
checkpointer watches WithdrawStarted events every `watch_seconds`, and the
payment intake reports a closing channel it reads (attack 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from longtail.attribution.receipts import SignedReceipt
from longtail.contracts.chain import ContractRevert
from longtail.node.chain import ChainError, ChainGateway
from longtail.node.checkpoints import epoch_payouts, payable_size

log = logging.getLogger("longtail.checkpointer")
WATCH_HISTORY_BLOCKS = 1_000


@dataclasses.dataclass(frozen=True)
class RoundResult:
    redeemed: int
    posted_size: int | None
    epoch: int | None


class Checkpointer:
    def __init__(self, node, chain: ChainGateway, every_receipts: int, every_seconds: float,
                 redeem_min_amount: int, max_backoff: float = 30.0, watch_seconds: float = 15.0) -> None:
        self.node = node
        self.chain = chain
        self.every_receipts = every_receipts
        self.every_seconds = every_seconds
        self.redeem_min_amount = redeem_min_amount
        self.max_backoff = max_backoff
        self._pending = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.failures = 0
        self.last_error: str | None = None
        self.watch_seconds = watch_seconds
        #: channel id -> (voucher amount the chain refused, why): not retried until a better voucher arrives.
        self.parked: dict[str, tuple[int, str]] = {}
        self._watch_task: asyncio.Task | None = None
        self._urgent: set[asyncio.Task] = set()
        self._watched_block: int | None = None
        payments = getattr(node, "payments", None)
        if payments is not None:
            payments.on_withdraw_started = self.redeem_soon

    def notify_receipt(self) -> None:
        self._pending += 1
        if self._pending >= self.every_receipts:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="checkpointer")
        self._watch_task = asyncio.create_task(self._watch(), name="withdrawal-watch")

    async def stop(self) -> None:
        for task in (self._task, self._watch_task, *self._urgent):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def redeem_soon(self, channel_id: str) -> None:
        """A channel's client started a withdrawal: redeem what the node holds on it now (no waiting for a round)."""
        try:
            task = asyncio.get_running_loop().create_task(self.redeem_channel(channel_id), name=f"redeem-{channel_id}")
        except RuntimeError:  # no loop (a synchronous caller): the next round redeems it
            return
        self._urgent.add(task)
        task.add_done_callback(self._urgent_done)

    def _urgent_done(self, task: asyncio.Task) -> None:
        self._urgent.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("redeeming a withdrawing channel failed: %s", task.exception())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_seconds)
            with contextlib.suppress(ChainError):
                await self.watch_withdrawals()

    async def watch_withdrawals(self) -> list[str]:
        """Redeem every channel of ours whose client started a withdrawal since the last look; returns them."""
        head = await self.chain.block_number()
        # The first look goes back WATCH_HISTORY_BLOCKS: a withdrawal started while the node was down still counts.
        start = max(head - WATCH_HISTORY_BLOCKS, 0) if self._watched_block is None else self._watched_block + 1
        if start > head:
            return []
        ours = {a.channel_id.lower() for a in self.node.payments.accounts() if a.best_voucher is not None}
        started = [c for c in await self.chain.withdrawals_started(start, head) if c.lower() in ours]
        self._watched_block = head
        for channel_id in started:
            log.info("client of channel %s started a withdrawal: redeeming now", channel_id)
            await self.redeem_channel(channel_id)
        return started

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.every_seconds)
            self._wake.clear()
            try:
                await self.run_round()
                backoff = 1.0
            except ChainError as error:
                self.failures += 1
                self.last_error = str(error)
                self.node.stats.checkpoint_failures.inc()
                log.warning("checkpoint round failed, retrying in %.0f s: %s", backoff, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                self._wake.set()

    async def redeem_vouchers(self, force: bool = False) -> int:
        """Redeem every voucher that pays enough more than the chain has seen; returns OPEN redeemed.

        A channel the chain refuses is parked with its reason; a chain that cannot be reached at all still fails the
        round (ChainError from the reads), to be retried.
        """
        total = 0
        for account in self.node.payments.accounts():
            total += await self.redeem_channel(account.channel_id, force=force)
        return total

    async def redeem_channel(self, channel_id: str, force: bool = True) -> int:
        account = next((a for a in self.node.payments.accounts() if a.channel_id.lower() == channel_id.lower()), None)
        voucher = account.best_voucher if account is not None else None
        if voucher is None:
            return 0
        parked = self.parked.get(account.channel_id)
        if parked is not None and voucher.cumulative_amount <= parked[0]:
            return 0
        state = await self.chain.read_channel(account.channel_id)
        gain = min(voucher.cumulative_amount, state.deposit) - state.redeemed
        if gain <= 0 or (gain < self.redeem_min_amount and not force):
            return 0
        try:
            return await self.chain.redeem(voucher)
        except ChainError as error:
            if not isinstance(error.__cause__, ContractRevert):
                raise  # the chain is down: the whole round retries
            self.parked[account.channel_id] = (voucher.cumulative_amount, str(error))
            log.error("voucher of %d on channel %s refused by the chain, parked (other channels go on): %s",
                      voucher.cumulative_amount, account.channel_id, error)
            return 0

    async def run_round(self, force_redeem: bool = True) -> RoundResult:
        """One redeem + checkpoint round; safe to call directly (tests, shutdown)."""
        self._pending = 0
        redeemed = await self.redeem_vouchers(force=force_redeem)
        receipt_log = self.node.receipt_log
        latest = await self.chain.latest_checkpoint()
        previous = latest.tree_size
        if receipt_log.size <= previous:
            return RoundResult(redeemed, None, None)
        pending = await asyncio.to_thread(self._receipts, previous, receipt_log.size)
        revenue = await self.chain.unreleased_revenue()
        size = payable_size(previous, [r.receipt.price for r in pending], revenue)
        if size == previous:
            log.info("receipts after %d are not yet paid by redeemed vouchers; waiting", previous)
            return RoundResult(redeemed, None, None)
        epoch_receipts = pending[: size - previous]
        with_datanets = await self.chain.adapters_with_datanets({r.receipt.adapter_id for r in epoch_receipts})
        payouts = epoch_payouts(epoch_receipts, await self.chain.split(), with_datanets)
        proof = receipt_log.consistency_proof(previous, size) if previous > 0 else []
        root = receipt_log.root(size)
        epoch = await self.chain.post_checkpoint(size, root, proof, payouts.adapters, payouts.datanets)
        # Recorded only after the chain accepted it: `epoch` set means posted.
        await asyncio.to_thread(receipt_log.store.add_checkpoint, _checkpoint_row(self.node.address, size, root, epoch))
        self.node.stats.checkpoints.inc()
        log.info("posted checkpoint epoch %d at size %d", epoch, size)
        return RoundResult(redeemed, size, epoch)

    def _receipts(self, start: int, stop: int) -> list[SignedReceipt]:
        return [self.node.receipt_log.get(seq) for seq in range(start, stop)]


def _checkpoint_row(node: str, size: int, root: bytes, epoch: int):
    from longtail.attribution.store import Checkpoint

    return Checkpoint(node=node, tree_size=size, root="0x" + root.hex(), created_at=int(time.time()), epoch=epoch)
