"""The payout split, as pure functions that mirror AttributionLedger.postCheckpoint exactly.

Per checkpoint the node declares gross revenue r_a per adapter (adapter id 0 = the bare base model):
- the adapter owner gets floor(r_a * adapter_share_bps / 10000);
- floor(r_a * datanet_share_bps / 10000) is the adapter's Datanet part: split among Datanets by the
  price-weighted attribution of its receipts (largest remainder, so the parts add up exactly), or paid to
  the adapter owner when the adapter has no Datanets;
- the node keeps the rest, rounding dust included; base-model revenue is the node's alone.
The node feeds `plan_payouts` the epoch's receipts and posts the result; an auditor runs the same
function over the same receipts and compares with the chain.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Iterable

from eth_abi import encode as abi_encode

TOTAL_BPS = 10_000
BASE_MODEL_ADAPTER = "0x" + "00" * 32


class PayoutError(ValueError):
    """Charges cannot be split as the contract requires."""


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One checkpoint line: an adapter's gross revenue or a Datanet's payout (id as 0x-hex)."""

    id: str
    amount: int


@dataclasses.dataclass(frozen=True)
class PayoutSplit:
    """The ledger's immutable share parameters, in basis points of adapter revenue."""

    adapter_share_bps: int
    datanet_share_bps: int


@dataclasses.dataclass(frozen=True)
class Charge:
    """What one receipt contributes: its adapter, its price and its Datanet weights (bps summing to 10000)."""

    adapter_id: str
    price: int
    datanet_weights: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckpointPayouts:
    """The allocations to post and what each party receives from them."""

    adapters: tuple[Allocation, ...]
    datanets: tuple[Allocation, ...]
    revenue: int
    adapter_owner_amounts: tuple[Allocation, ...]
    node_amount: int


def split_adapter_revenue(revenue: int, has_datanets: bool, split: PayoutSplit) -> tuple[int, int]:
    """(adapter owner's amount, Datanet part) of one adapter line, as the contract computes them."""
    owner = revenue * split.adapter_share_bps // TOTAL_BPS
    datanet_part = revenue * split.datanet_share_bps // TOTAL_BPS
    if not has_datanets:
        return owner + datanet_part, 0
    return owner, datanet_part


def plan_payouts(charges: Iterable[Charge], split: PayoutSplit, adapters_with_datanets: Collection[str]) -> CheckpointPayouts:
    """Aggregate one epoch's charges into the checkpoint's adapter and Datanet allocations."""
    with_datanets = {a.lower() for a in adapters_with_datanets}
    revenue_by_adapter: dict[str, int] = defaultdict(int)
    weight_by_adapter: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for charge in charges:
        adapter = charge.adapter_id.lower()
        if charge.price < 0:
            raise PayoutError(f"negative price {charge.price} for adapter {adapter}")
        revenue_by_adapter[adapter] += charge.price
        for datanet, weight in charge.datanet_weights:
            weight_by_adapter[adapter][datanet.lower()] += charge.price * weight

    datanet_totals: dict[str, int] = defaultdict(int)
    owner_amounts: list[Allocation] = []
    paid_out = 0
    for adapter, revenue in sorted(revenue_by_adapter.items()):
        if adapter == BASE_MODEL_ADAPTER:
            continue
        owner, part = split_adapter_revenue(revenue, adapter in with_datanets, split)
        owner_amounts.append(Allocation(adapter, owner))
        paid_out += owner + part
        if part == 0:
            continue
        weights = {d: w for d, w in weight_by_adapter[adapter].items() if w > 0}
        if not weights:
            raise PayoutError(f"adapter {adapter} has Datanets but its receipts carry no Datanet weights")
        for datanet, amount in _largest_remainder(part, weights).items():
            datanet_totals[datanet] += amount
    total_revenue = sum(revenue_by_adapter.values())
    return CheckpointPayouts(
        adapters=tuple(Allocation(a, r) for a, r in sorted(revenue_by_adapter.items())),
        datanets=tuple(Allocation(d, v) for d, v in sorted(datanet_totals.items()) if v > 0),
        revenue=total_revenue,
        adapter_owner_amounts=tuple(owner_amounts),
        node_amount=total_revenue - paid_out,
    )


def _largest_remainder(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split `total` in proportion to `weights` into integers that sum to `total` exactly."""
    weight_sum = sum(weights.values())
    shares = {key: total * w // weight_sum for key, w in weights.items()}
    leftover = total - sum(shares.values())
    # Highest fractional part first; ties go to the smaller id so every party computes the same split.
    order = sorted(weights, key=lambda key: (-(total * weights[key] % weight_sum), key))
    for key in order[:leftover]:
        shares[key] += 1
    return shares


def distribution_leaf_data(account: str, amount: int) -> bytes:
    """Leaf data of one Datanet distribution entry: abi.encode(address account, uint256 amount).

    The distribution tree is an RFC 9162 tree over these leaves (leaf hash SHA-256(0x00 || data)), in the
    order the Datanet owner chooses; `attribution.merkle` builds it and its inclusion proofs.
    """
    return abi_encode(["address", "uint256"], [account, int(amount)])
