"""Attacks on the contracts from issue 20, each performed on a real anvil deployment; a test fails if the attack works.

Attack 2 (self-slashing through a sybil), 6 (Datanet revenue redirected), 7 (revenue without receipts).
"""

from __future__ import annotations

from eth_utils import keccak

from longtail.contracts.deployment import OPEN
from longtail.contracts.payouts import BASE_MODEL_ADAPTER, Allocation, Charge, plan_payouts
from longtail.contracts.registry import AdapterRegistration

from contracts_testkit import (
    TEST_PARAMS,
    consistency_proof,
    inclusion_path,
    leaf_hash,
    make_receipt,
    mth,
    receipt_digest,
    reverts,
    sign_receipt,
)

ADAPTER = "0x" + keccak(b"attack-adapter").hex()


def _setup(world):
    """A staked node with 1,000 OPEN redeemed, a victim Datanet the adapter trained on, and the node's own Datanet."""
    world.register_node()
    victim = world.registry.register_datanet(world.datanet_owner, "victim", "0x" + "01" * 32, 5)
    own = world.registry.register_datanet(world.node, "node's own", "0x" + "02" * 32, 1)
    base = "0x" + keccak(b"base").hex()
    world.registry.register_adapter(world.adapter_owner, AdapterRegistration(ADAPTER, base, ((victim, 10_000),), 100, "u"))
    channel = world.channels.deposit(world.client, world.node.address, 2_000 * OPEN)
    world.channels.redeem(world.node, world.channels.sign_voucher(world.client, channel, 1_000 * OPEN))
    return victim, own


def _leaves(world, size: int, node=None, price: int = 1000):
    node = node or world.node
    receipts = [make_receipt(node.address, seq, price=price) for seq in range(size)]
    return receipts, [leaf_hash(receipt_digest(r, world.chain_id, world.ledger.address)) for r in receipts]


# --- attack 2: self-slashing through a sybil ------------------------------------------------------------

def test_self_slash_through_a_sybil_costs_the_node_most_of_the_slash(world):
    """The node signs a throwaway receipt, checkpoints a log without it and "proves" the mismatch from a second
    account it controls, to take stake out at once instead of waiting for the unstake delay."""
    _setup(world)
    node, sybil = world.node, world.other_client
    receipts, leaves = _leaves(world, 4)
    posted = list(leaves)
    posted[2] = leaf_hash(b"not the receipt the node signed")
    world.ledger.post_checkpoint(node, 4, mth(posted), [])
    signature = sign_receipt(node, receipts[2], world.chain_id, world.ledger.address)
    # The node wants all its stake out without the unstake delay.
    world.registry.request_unstake(node, TEST_PARAMS.min_stake)
    before = world.token.balance_of(node.address) + world.token.balance_of(sybil.address)
    slashed = world.ledger.prove_mismatch(sybil, receipts[2], signature, posted[2], inclusion_path(2, posted))
    assert slashed == TEST_PARAMS.slash_amount
    world.ledger.claim(sybil)
    gained = world.token.balance_of(node.address) + world.token.balance_of(sybil.address) - before
    # The attack worked if the pair got the slashed stake back; now they get a tenth and the rest is burned.
    assert gained == slashed // 10
    assert world.ledger.burned() == slashed - gained
    assert gained < slashed
    # And the unbonding rest still waits for the delay.
    with reverts("UnbondingNotReady"):
        world.registry.withdraw_stake(node)


def test_stake_under_an_open_dispute_cannot_leave(world):
    """A node that hid a receipt tries to withdraw its stake while the honest dispute about it is still open."""
    _setup(world)
    node = world.node
    receipts, leaves = _leaves(world, 4)
    posted = list(leaves)
    posted[1] = leaf_hash(b"hidden")
    world.ledger.post_checkpoint(node, 4, mth(posted), [])
    signature = sign_receipt(node, receipts[1], world.chain_id, world.ledger.address)
    world.registry.request_unstake(node, TEST_PARAMS.min_stake)
    # An honest client disputes just before the unbonding ends.
    world.anvil.increase_time(TEST_PARAMS.unstake_delay - TEST_PARAMS.dispute_window // 2)
    world.token.approve(world.challenger, world.ledger.address, TEST_PARAMS.dispute_bond)
    dispute = world.ledger.open_dispute(world.challenger, receipts[1], signature)
    assert world.ledger.open_disputes(node.address) == 1
    world.anvil.increase_time(TEST_PARAMS.dispute_window // 2 + 10)
    with reverts("StakeUnderDispute", node=node.address, openDisputes=1):
        world.registry.withdraw_stake(node)
    world.anvil.increase_time(TEST_PARAMS.dispute_window)
    assert world.ledger.resolve_dispute(world.challenger, dispute) == TEST_PARAMS.slash_amount
    assert world.ledger.open_disputes(node.address) == 0
    assert world.registry.get_node(node.address).unbonding == TEST_PARAMS.min_stake - TEST_PARAMS.slash_amount
    world.registry.withdraw_stake(node)  # what is left leaves once no dispute is open


# --- attack 6: Datanet revenue redirected ------------------------------------------------------------------

def test_checkpoint_cannot_pay_an_adapters_datanet_part_to_another_datanet(world):
    victim, own = _setup(world)
    split = world.ledger.split()
    honest = plan_payouts([Charge(ADAPTER, 500 * OPEN, ((victim, 10_000),))], split, {ADAPTER})
    part = honest.datanets[0].amount
    _, leaves = _leaves(world, 3)
    # The attack: the Datanet part goes to a Datanet the node owns, which the adapter was not trained on.
    with reverts("DatanetOverpaid", datanetId=bytes.fromhex(own[2:]), cap=0, amount=part):
        world.ledger.post_checkpoint(world.node, 3, mth(leaves), [], list(honest.adapters), [Allocation(own, part)])
    # Half-and-half is refused too; so is listing the victim twice to take more than its part.
    with reverts("DatanetOverpaid"):
        world.ledger.post_checkpoint(world.node, 3, mth(leaves), [], list(honest.adapters),
                                     sorted([Allocation(own, part // 2), Allocation(victim, part - part // 2)], key=lambda a: a.id))
    with reverts("DatanetsNotSorted", index=1):
        world.ledger.post_checkpoint(world.node, 3, mth(leaves), [], list(honest.adapters),
                                     [Allocation(victim, part), Allocation(victim, 0)])
    world.ledger.post_checkpoint(world.node, 3, mth(leaves), [], list(honest.adapters), list(honest.datanets))
    assert world.ledger.datanet_pool(victim) == part
    assert world.ledger.datanet_pool(own) == 0


# --- attack 7: revenue without receipts ---------------------------------------------------------------------

def test_revenue_is_released_only_by_a_checkpoint_that_adds_receipts(world):
    _setup(world)
    _, leaves = _leaves(world, 4)
    pay = [Allocation(BASE_MODEL_ADAPTER, 100 * OPEN)]
    # The attack: revenue released at tree size 0, so no paid receipt can ever be disputed.
    with reverts("RevenueWithoutReceipts", previousSize=0, treeSize=0, adapterLines=1):
        world.ledger.post_checkpoint(world.node, 0, b"\x00" * 32, [], pay)
    world.ledger.post_checkpoint(world.node, 2, mth(leaves[:2]), [], pay)
    # Same size again: no new receipt, no new revenue.
    with reverts("RevenueWithoutReceipts", previousSize=2, treeSize=2, adapterLines=1):
        world.ledger.post_checkpoint(world.node, 2, mth(leaves[:2]), [], pay)
    # Two paid lines need at least two new receipts.
    two = [Allocation(BASE_MODEL_ADAPTER, OPEN), Allocation(ADAPTER, OPEN)]
    with reverts("RevenueWithoutReceipts", previousSize=2, treeSize=3, adapterLines=2):
        world.ledger.post_checkpoint(world.node, 3, mth(leaves[:3]), consistency_proof(2, leaves[:3]), two)
