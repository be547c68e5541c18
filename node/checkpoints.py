"""What a checkpoint pays, computed from receipts: one function for the node and its auditor.

A checkpoint at size S pays the receipts in (previous size, S]: their prices
aggregated per adapter and split per Datanet by each receipt's attribution
vector, exactly as `contracts.payouts.plan_payouts` mirrors the ledger. The
node posts the largest S whose receipts its redeemed revenue already covers,
so every receipt is paid in exactly one checkpoint, in log order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from longtail.attribution.receipts import SignedReceipt
from longtail.contracts.payouts import Charge, CheckpointPayouts, PayoutSplit, plan_payouts


def charges_of(receipts: Sequence[SignedReceipt]) -> list[Charge]:
    return [Charge(adapter_id=r.receipt.adapter_id, price=r.receipt.price,
                   datanet_weights=tuple(zip(r.attribution.datanet_ids, r.attribution.weights_bps, strict=True)))
            for r in receipts]


def epoch_payouts(receipts: Sequence[SignedReceipt], split: PayoutSplit,
                  adapters_with_datanets: Collection[str]) -> CheckpointPayouts:
    return plan_payouts(charges_of(receipts), split, adapters_with_datanets)


def payable_size(previous_size: int, prices: Sequence[int], available_revenue: int) -> int:
    """The largest size S >= previous_size whose receipts (previous_size, S] cost at most the revenue.

    `prices[i]` is the price of receipt `previous_size + i`.
    """
    size, spent = previous_size, 0
    for price in prices:
        if spent + price > available_revenue:
            break
        spent += price
        size += 1
    return size
