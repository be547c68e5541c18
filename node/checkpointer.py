"""The checkpointer: every N receipts or T seconds, redeem vouchers, then post the log's checkpoint.

Redeem first, because a checkpoint can only split revenue the node already
redeemed. A failed round (chain down, revert) is retried with exponential
backoff; nothing is marked done until the chain accepted it, and the next
round starts again from the chain's own latest checkpoint, so a receipt is
never lost or counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from longtail.attribution.receipts import SignedReceipt
from longtail.node.chain import ChainError, ChainGateway
from longtail.node.checkpoints import epoch_payouts, payable_size

log = logging.getLogger("longtail.checkpointer")


@dataclasses.dataclass(frozen=True)
class RoundResult:
    redeemed: int
    posted_size: int | None
    epoch: int | None


class Checkpointer:
    def __init__(self, node, chain: ChainGateway, every_receipts: int, every_seconds: float,
                 redeem_min_amount: int, max_backoff: float = 30.0) -> None:
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

    def notify_receipt(self) -> None:
        self._pending += 1
        if self._pending >= self.every_receipts:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="checkpointer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
        """Redeem every voucher that pays enough more than the chain has seen; returns OPEN redeemed."""
        total = 0
        for account in self.node.payments.accounts():
            voucher = account.best_voucher
            if voucher is None:
                continue
            state = await self.chain.read_channel(account.channel_id)
            gain = voucher.cumulative_amount - state.redeemed
            if gain <= 0 or (gain < self.redeem_min_amount and not force):
                continue
            total += await self.chain.redeem(voucher)
        return total

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
