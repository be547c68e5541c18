"""Property: over random sequences of deposits, vouchers, redeems, checkpoints, claims, distributions and
withdrawals, no OPEN appears or vanishes, every contract holds exactly what it owes, and every party's
balance equals what an independent model says it is owed (so nobody is ever paid more than was paid for it).

Adversarial actors take part (issue 20): a node that lies in its checkpoints (pays an adapter's Datanet part to
a Datanet of its own, or releases revenue without receipts), clients that withdraw between redeems, and a sybil
challenger that "proves" the node's own throwaway receipts to get its stake back. Their attempts must revert or
cost them; honest parties' balances follow the model whatever they do.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
from eth_utils import keccak
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longtail.contracts.channels import channel_id_of
from longtail.contracts.payouts import BASE_MODEL_ADAPTER, Allocation, distribution_leaf_data
from longtail.contracts.registry import AdapterRegistration, datanet_id
from longtail.contracts.vouchers import SignedVoucher

from contracts_testkit import (
    TEST_PARAMS,
    consistency_proof,
    inclusion_path,
    leaf_hash,
    make_receipt,
    mth,
    reverts,
    sign_receipt,
)

ADAPTER_X = "0x" + keccak(b"prop-adapter-x").hex()  # one Datanet, 100%
ADAPTER_Y = "0x" + keccak(b"prop-adapter-y").hex()  # no Datanets
LEAVES = [leaf_hash(keccak(b"leaf" + i.to_bytes(4, "big"))) for i in range(200)]


@pytest.fixture(scope="module")
def market(base_world):
    """Two registered nodes, a Datanet and two adapters; rolled back after this module."""
    world = base_world
    snapshot = world.anvil.snapshot()
    world.register_node(world.node)
    world.register_node(world.other_node)
    datanet = world.registry.register_datanet(world.datanet_owner, "prop", "0x" + "0a" * 32, 3)
    base = "0x" + keccak(b"base").hex()
    world.registry.register_adapter(world.adapter_owner, AdapterRegistration(ADAPTER_X, base, ((datanet, 10_000),), 1, "x"))
    world.registry.register_adapter(world.adapter_owner, AdapterRegistration(ADAPTER_Y, base, (), 1, "y"))
    # A Datanet of the node's own, trained on by no adapter: where a lying node would send Datanet revenue.
    own = world.registry.register_datanet(world.node, "own", "0x" + "0b" * 32, 1)
    for client in (world.client, world.other_client):
        world.token.approve(client, world.channels.address, 2**255)
    yield world, (datanet, own)
    world.anvil.revert(snapshot)


@dataclasses.dataclass
class ChannelModel:
    deposit: int = 0
    deposited_ever: int = 0
    redeemed: int = 0
    voucher: int = 0
    signature: str | None = None
    thawing: bool = False


@dataclasses.dataclass
class Model:
    balances: dict[str, int]
    channels: dict[tuple[int, int], ChannelModel] = dataclasses.field(default_factory=lambda: defaultdict(ChannelModel))
    revenue: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    claimable: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    pool: int = 0
    log_size: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    signed: dict[tuple[int, int], int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    stake: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(lambda: TEST_PARAMS.min_stake))
    burned: int = 0
    slashed_leaves: set = dataclasses.field(default_factory=set)


amount = st.integers(min_value=1, max_value=10_000)
side = st.integers(min_value=0, max_value=1)
operation = st.one_of(
    st.tuples(st.just("deposit"), side, side, amount),
    st.tuples(st.just("pay"), side, side, amount),
    st.tuples(st.just("redeem"), side, side),
    st.tuples(st.just("checkpoint"), side, st.integers(0, 100), st.integers(0, 100), st.integers(0, 100),
              st.integers(1, 20)),
    st.tuples(st.just("claim"), st.integers(0, 3)),
    st.tuples(st.just("lie"), side, st.integers(1, 100)),
    st.tuples(st.just("sybil_slash"), side, st.integers(0, 30)),
    st.tuples(st.just("distribute")),
    st.tuples(st.just("start_withdraw"), side, side),
    st.tuples(st.just("finish_withdraw"), side, side),
)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(operation, min_size=4, max_size=14))
# Every adversary at least once, whatever the random draw: a lie, two sybil slashes (the second leaves the node
# under the minimum stake, so its next checkpoint is refused), a withdrawal between redeems, the sybil's claim.
@example(operations=[("deposit", 0, 0, 9_000), ("pay", 0, 0, 3_000), ("redeem", 0, 0),
                     ("checkpoint", 0, 100, 0, 0, 5), ("pay", 0, 0, 2_000), ("redeem", 0, 0), ("lie", 0, 100),
                     ("sybil_slash", 0, 2), ("sybil_slash", 0, 3), ("checkpoint", 0, 50, 50, 0, 2),
                     ("start_withdraw", 0, 0), ("pay", 0, 0, 1_000), ("redeem", 0, 0), ("finish_withdraw", 0, 0),
                     ("claim", 3), ("distribute",)])
def test_random_sequences_conserve_open_and_never_overpay(market, operations):
    world, datanet = market
    snapshot = world.anvil.snapshot()
    try:
        _run(world, datanet, operations)
    finally:
        world.anvil.revert(snapshot)


def _run(world, datanets: tuple[str, str], operations) -> None:
    datanet, own = datanets
    token, channels, ledger = world.token, world.channels, world.ledger
    clients, nodes = (world.client, world.other_client), (world.node, world.other_node)
    sybil = world.challenger
    claimers = (world.node, world.other_node, world.adapter_owner, sybil)
    holders = [a.address for a in world.anvil.accounts] + [world.registry.address, channels.address, ledger.address]
    supply = token.total_supply()
    model = Model(balances={h: token.balance_of(h) for h in holders})
    split = ledger.split()

    for op in operations:
        kind = op[0]
        if kind == "deposit":
            _, c, n, value = op
            channels.deposit(clients[c], nodes[n].address, value)
            model.channels[c, n].deposit += value
            model.channels[c, n].deposited_ever += value
            model.balances[clients[c].address] -= value
            model.balances[channels.address] += value
        elif kind == "pay":
            # The client signs for more service: the cumulative amount grows.
            _, c, n, value = op
            channel = model.channels[c, n]
            channel.voucher += value
            channel.signature = channels.sign_voucher(clients[c], _channel_id(world, c, n), channel.voucher).signature
            model.signed[c, n] = channel.voucher
        elif kind == "redeem":
            _, c, n = op
            channel = model.channels[c, n]
            if channel.signature is None:
                continue
            voucher = SignedVoucher(_channel_id(world, c, n), channel.voucher, channel.signature)
            payable = min(channel.voucher, channel.deposit) - channel.redeemed
            if channel.deposited_ever == 0:
                # Never opened: the contract knows no such channel.
                with reverts("UnknownChannel"):
                    channels.redeem(nodes[n], voucher)
            elif channel.voucher <= channel.redeemed:
                with reverts("VoucherNotIncreasing"):
                    channels.redeem(nodes[n], voucher)
            elif payable <= 0:
                with reverts("ChannelExhausted"):
                    channels.redeem(nodes[n], voucher)
            else:
                assert channels.redeem(nodes[n], voucher) == payable
                channel.redeemed += payable
                model.revenue[nodes[n].address] += payable
        elif kind == "checkpoint":
            _, n, px, py, pb, grow = op
            node = nodes[n].address
            available = model.revenue[node]
            rx, ry, rb = available * px // 300, available * py // 300, available * pb // 300
            x_owner, x_datanets = rx * split.adapter_share_bps // 10_000, rx * split.datanet_share_bps // 10_000
            y_owner = ry * split.adapter_share_bps // 10_000 + ry * split.datanet_share_bps // 10_000
            previous = model.log_size[node]
            size = min(previous + grow, len(LEAVES))
            proof = consistency_proof(previous, LEAVES[:size]) if 0 < previous < size else []
            if model.stake[node] < TEST_PARAMS.min_stake:
                with reverts("NodeNotActive"):  # slashed below the minimum: no more checkpoints
                    ledger.post_checkpoint(nodes[n], size, mth(LEAVES[:size]), proof)
                _check(world, model, holders, supply)
                continue
            lines = [Allocation(a, r) for a, r in ((ADAPTER_X, rx), (ADAPTER_Y, ry), (BASE_MODEL_ADAPTER, rb)) if r]
            datanets = [Allocation(datanet, x_datanets)] if x_datanets else []
            if len(lines) > size - previous:
                # Revenue needs receipts: each paid line must come with at least one new receipt in the log.
                with reverts("RevenueWithoutReceipts"):
                    ledger.post_checkpoint(nodes[n], size, mth(LEAVES[:size]), proof, lines, datanets)
                _check(world, model, holders, supply)
                continue
            ledger.post_checkpoint(nodes[n], size, mth(LEAVES[:size]), proof, lines, datanets)
            model.log_size[node] = size
            revenue = rx + ry + rb
            model.revenue[node] -= revenue
            model.claimable[world.adapter_owner.address] += x_owner + y_owner
            model.pool += x_datanets
            model.claimable[node] += revenue - x_owner - x_datanets - y_owner
            model.balances[channels.address] -= revenue
            model.balances[ledger.address] += revenue
        elif kind == "lie":
            # The node sends an adapter's Datanet part to its own Datanet; the ledger must refuse it whole.
            _, n, share = op
            node = nodes[n].address
            rx = model.revenue[node] * share // 100
            part = rx * split.datanet_share_bps // 10_000
            previous = model.log_size[node]
            size = min(previous + 1, len(LEAVES))
            if part == 0 or size == previous or model.stake[node] < TEST_PARAMS.min_stake:
                continue
            proof = consistency_proof(previous, LEAVES[:size]) if previous else []
            with reverts("DatanetOverpaid", cap=0, amount=part):
                ledger.post_checkpoint(nodes[n], size, mth(LEAVES[:size]), proof, [Allocation(ADAPTER_X, rx)],
                                       [Allocation(own, part)])
        elif kind == "sybil_slash":
            # The node signs a throwaway receipt its checkpoint does not hold and proves it from a second account.
            _, n, seq = op
            node = nodes[n]
            size = model.log_size[node.address]
            if seq >= size or (n, seq) in model.slashed_leaves:
                continue
            receipt = make_receipt(node.address, seq, salt=b"throwaway")
            signature = sign_receipt(node, receipt, world.chain_id, ledger.address)
            slashed = ledger.prove_mismatch(sybil, receipt, signature, LEAVES[seq], inclusion_path(seq, LEAVES[:size]))
            assert slashed == min(TEST_PARAMS.slash_amount, model.stake[node.address])
            model.slashed_leaves.add((n, seq))
            model.stake[node.address] -= slashed
            reward = slashed * 1_000 // 10_000
            model.claimable[sybil.address] += reward
            model.burned += slashed - reward
            model.balances[world.registry.address] -= slashed
            model.balances[ledger.address] += slashed
            # The pair (node + sybil) never gets back more than a tenth of what the node lost.
            assert reward * 10 <= slashed
        elif kind == "claim":
            account = claimers[op[1]]
            owed = model.claimable[account.address]
            if owed == 0:
                with reverts("NothingToClaim"):
                    ledger.claim(account)
                continue
            assert ledger.claim(account) == owed
            model.claimable[account.address] = 0
            model.balances[account.address] += owed
            model.balances[ledger.address] -= owed
        elif kind == "distribute":
            if model.pool == 0:
                continue
            leaf = leaf_hash(distribution_leaf_data(world.contributor.address, model.pool))
            distribution = ledger.publish_distribution(world.datanet_owner, datanet, leaf, 1, model.pool)
            ledger.claim_distribution(world.deployer, distribution, 0, world.contributor.address, model.pool, [])
            model.balances[world.contributor.address] += model.pool
            model.balances[ledger.address] -= model.pool
            model.pool = 0
        elif kind == "start_withdraw":
            _, c, n = op
            channel = model.channels[c, n]
            if channel.deposit == 0 or channel.thawing:
                continue
            channels.start_withdraw(clients[c], _channel_id(world, c, n))
            channel.thawing = True
        elif kind == "finish_withdraw":
            _, c, n = op
            channel = model.channels[c, n]
            if not channel.thawing:
                continue
            world.anvil.increase_time(TEST_PARAMS.thaw_period)
            refund = channel.deposit - channel.redeemed
            assert channels.finish_withdraw(clients[c], _channel_id(world, c, n)) == refund
            channel.deposit, channel.thawing = channel.redeemed, False
            model.balances[clients[c].address] += refund
            model.balances[channels.address] -= refund
        _check(world, model, holders, supply)


def _check(world, model: Model, holders: list[str], supply: int) -> None:
    token = world.token
    actual = {h: token.balance_of(h) for h in holders}
    # Nothing appears or vanishes: every unit is held by a known account or contract.
    assert token.total_supply() == supply
    assert sum(actual.values()) == supply
    # Every party holds exactly what it is owed, no more.
    assert actual == model.balances
    # Each contract holds exactly its liabilities.
    escrow = sum(c.deposit - c.redeemed for c in model.channels.values())
    assert actual[world.channels.address] == escrow + sum(model.revenue.values())
    assert actual[world.ledger.address] == sum(model.claimable.values()) + model.pool + model.burned
    assert world.ledger.burned() == model.burned
    assert world.ledger.datanet_pool(_pool_id(world)) == model.pool
    # No node was ever paid beyond what its client signed for, nor beyond what was deposited.
    for (c, n), channel in model.channels.items():
        assert channel.redeemed <= model.signed[c, n]
        assert channel.redeemed <= channel.deposited_ever
        assert world.channels.get_channel(_channel_id(world, c, n)).redeemed == channel.redeemed


def _channel_id(world, c: int, n: int) -> str:
    clients, nodes = (world.client, world.other_client), (world.node, world.other_node)
    return channel_id_of(clients[c].address, nodes[n].address)


def _pool_id(world) -> str:
    return datanet_id("prop", world.datanet_owner.address, "0x" + "0a" * 32, 3)
