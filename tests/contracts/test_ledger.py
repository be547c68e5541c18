"""AttributionLedger: consistent checkpoints, the payout split, claims, Datanet distributions, disputes."""

from __future__ import annotations

import dataclasses

import pytest
from eth_utils import keccak

from longtail.contracts.chain import hex32
from longtail.contracts.deployment import OPEN, deploy_contract
from longtail.contracts.payouts import (
    BASE_MODEL_ADAPTER,
    Allocation,
    Charge,
    distribution_leaf_data,
    plan_payouts,
)
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

# The challenger's bounded share of a slash (AttributionLedger.CHALLENGER_REWARD_BPS); the rest is burned.
REWARD = TEST_PARAMS.slash_amount * 1_000 // 10_000

ADAPTER_X = "0x" + keccak(b"adapter-x").hex()  # trained on Datanets A and B
ADAPTER_Y = "0x" + keccak(b"adapter-y").hex()  # no Datanets


@dataclasses.dataclass(frozen=True)
class Market:
    datanet_a: str
    datanet_b: str
    channel: str


@pytest.fixture
def market(world) -> Market:
    """A registered node with 1,000 OPEN of redeemed revenue, two Datanets and two adapters."""
    world.register_node()
    a = world.registry.register_datanet(world.datanet_owner, "A", "0x" + "01" * 32, 5)
    b = world.registry.register_datanet(world.datanet_owner, "B", "0x" + "02" * 32, 7)
    base = "0x" + keccak(b"base").hex()
    world.registry.register_adapter(world.adapter_owner, AdapterRegistration(
        ADAPTER_X, base, ((a, 6_000), (b, 4_000)), 100, "uri-x"))
    world.registry.register_adapter(world.adapter_owner, AdapterRegistration(ADAPTER_Y, base, (), 100, "uri-y"))
    channel = world.channels.deposit(world.client, world.node.address, 2_000 * OPEN)
    world.channels.redeem(world.node, world.channels.sign_voucher(world.client, channel, 1_000 * OPEN))
    return Market(a, b, channel)


def _log(world, size: int, node=None, salt: bytes = b"") -> tuple[list[dict], list[bytes]]:
    """`size` receipts signed by the node, and their RFC 9162 leaf hashes."""
    node = node or world.node
    receipts = [make_receipt(node.address, seq, salt=salt) for seq in range(size)]
    leaves = [leaf_hash(receipt_digest(r, world.chain_id, world.ledger.address)) for r in receipts]
    return receipts, leaves


def _post(world, leaves, size, previous=0, **allocations) -> int:
    proof = consistency_proof(previous, leaves[:size]) if 0 < previous < size else []
    return world.ledger.post_checkpoint(world.node, size, mth(leaves[:size]), proof, **allocations)


# --- checkpoints -----------------------------------------------------------------------------------

def test_checkpoints_grow_with_consistency_proofs(world, market):
    _, leaves = _log(world, 33)
    previous = 0
    # Powers of two, their neighbours and odd sizes exercise every branch of the RFC 9162 verifier.
    for epoch, size in enumerate([1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33], start=1):
        assert _post(world, leaves, size, previous) == epoch
        previous = size
    latest = world.ledger.latest_checkpoint(world.node.address)
    assert (latest.tree_size, latest.epoch, latest.root_hash) == (33, 12, hex32(mth(leaves)))
    # Same size again: same root, empty proof.
    assert _post(world, leaves, 33, 33) == 13
    records = world.ledger.checkpoints(world.node.address)
    assert [r.tree_size for r in records] == [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 33]


def test_rewriting_history_is_rejected(world, market):
    _, leaves = _log(world, 12)
    _post(world, leaves, 6)
    rewritten = list(leaves)
    rewritten[3] = leaf_hash(b"a receipt the node would rather forget")
    with reverts("InconsistentCheckpoint", previousSize=6, treeSize=12):
        world.ledger.post_checkpoint(world.node, 12, mth(rewritten), consistency_proof(6, rewritten))
    honest_proof = consistency_proof(6, leaves)
    with reverts("InconsistentCheckpoint"):
        world.ledger.post_checkpoint(world.node, 12, mth(leaves), honest_proof[:-1])
    with reverts("InconsistentCheckpoint"):
        world.ledger.post_checkpoint(world.node, 12, mth(leaves), [])
    with reverts("InconsistentCheckpoint"):
        world.ledger.post_checkpoint(world.node, 6, mth(rewritten[:6]), [])
    with reverts("TreeShrank", previousSize=6, treeSize=5):
        world.ledger.post_checkpoint(world.node, 5, mth(leaves[:5]), [])
    world.ledger.post_checkpoint(world.node, 12, mth(leaves), honest_proof)


def test_only_active_nodes_post(world):
    with reverts("NodeNotActive", node=world.other_node.address):
        world.ledger.post_checkpoint(world.other_node, 1, b"\x00" * 32, [])


# --- the split ---------------------------------------------------------------------------------------

def test_checkpoint_splits_revenue_among_node_adapter_owners_and_datanets(world, market):
    ledger, split = world.ledger, world.ledger.split()
    charges = [
        Charge(ADAPTER_X, 400 * OPEN, ((market.datanet_a, 10_000),)),
        Charge(ADAPTER_X, 200 * OPEN, ((market.datanet_a, 5_000), (market.datanet_b, 5_000))),
        Charge(ADAPTER_Y, 300 * OPEN),
        Charge(BASE_MODEL_ADAPTER, 100 * OPEN),
    ]
    plan = plan_payouts(charges, split, adapters_with_datanets={ADAPTER_X})
    # X: owner 20% of 600, Datanets 10% of 600 split 500:100 by weighted price; Y: owner 30% of 300.
    assert {a.id: a.amount for a in plan.datanets} == {market.datanet_a: 50 * OPEN, market.datanet_b: 10 * OPEN}
    assert plan.node_amount == 1_000 * OPEN - 120 * OPEN - 60 * OPEN - 90 * OPEN
    _, leaves = _log(world, 4)
    ledger_before = world.token.balance_of(ledger.address)
    ledger.post_checkpoint(world.node, 4, mth(leaves), [], plan.adapters, plan.datanets)
    assert ledger.claimable(world.node.address) == plan.node_amount == 730 * OPEN
    assert ledger.claimable(world.adapter_owner.address) == 210 * OPEN
    assert ledger.datanet_pool(market.datanet_a) == 50 * OPEN
    assert ledger.datanet_pool(market.datanet_b) == 10 * OPEN
    assert world.channels.revenue(world.node.address) == 0
    assert world.token.balance_of(ledger.address) == ledger_before + 1_000 * OPEN
    record = ledger.checkpoints(world.node.address)[-1]
    assert (record.revenue, record.node_amount) == (1_000 * OPEN, 730 * OPEN)
    assert set(record.adapter_owner_amounts) == {Allocation(ADAPTER_X, 120 * OPEN), Allocation(ADAPTER_Y, 90 * OPEN)}
    assert set(record.datanets) == set(plan.datanets)


def test_split_rules_are_enforced(world, market):
    ledger, node = world.ledger, world.node
    _, leaves = _log(world, 2)
    root = mth(leaves)
    with reverts("DatanetTotalMismatch", expected=10 * OPEN, declared=9 * OPEN):
        ledger.post_checkpoint(node, 2, root, [], [Allocation(ADAPTER_X, 100 * OPEN)],
                               [Allocation(market.datanet_a, 9 * OPEN)])
    unknown = "0x" + "99" * 32
    with reverts("UnknownAdapter", adapterId=bytes.fromhex(unknown[2:])):
        ledger.post_checkpoint(node, 2, root, [], [Allocation(unknown, 1)])
    # A Datanet that none of the checkpoint's adapters was registered with gets nothing (registered or not).
    with reverts("DatanetOverpaid", cap=0, amount=10 * OPEN):
        ledger.post_checkpoint(node, 2, root, [], [Allocation(ADAPTER_X, 100 * OPEN)], [Allocation(unknown, 10 * OPEN)])
    with reverts("RevenueTooLow", revenue=1_000 * OPEN, requested=1_001 * OPEN):
        ledger.post_checkpoint(node, 2, root, [], [Allocation(BASE_MODEL_ADAPTER, 1_001 * OPEN)])


def test_claims_pay_out_and_empty_claims_revert(world, market):
    ledger, node = world.ledger, world.node
    _, leaves = _log(world, 1)
    ledger.post_checkpoint(node, 1, mth(leaves), [], [Allocation(ADAPTER_Y, 1_000 * OPEN)])
    before = world.token.balance_of(node.address)
    assert ledger.claim(node) == 700 * OPEN
    assert world.token.balance_of(node.address) == before + 700 * OPEN
    assert ledger.claim(world.adapter_owner) == 300 * OPEN
    with reverts("NothingToClaim", account=node.address):
        ledger.claim(node)


# --- Datanet distributions --------------------------------------------------------------------------

@pytest.fixture
def pool(world, market) -> str:
    """Datanet A's pool holding 60 OPEN."""
    _, leaves = _log(world, 1)
    world.ledger.post_checkpoint(world.node, 1, mth(leaves), [], [Allocation(ADAPTER_X, 600 * OPEN)],
                                 [Allocation(market.datanet_a, 60 * OPEN)])
    return market.datanet_a


def test_distribution_pays_contributors_by_proof_once(world, pool):
    ledger, owner = world.ledger, world.datanet_owner
    entries = [(world.contributor.address, 25 * OPEN), (world.other_client.address, 15 * OPEN),
               (world.challenger.address, 20 * OPEN)]
    leaves = [leaf_hash(distribution_leaf_data(a, v)) for a, v in entries]
    distribution = ledger.publish_distribution(owner, pool, mth(leaves), len(leaves), 60 * OPEN)
    assert ledger.datanet_pool(pool) == 0
    for index, (account, amount) in enumerate(entries):
        before = world.token.balance_of(account)
        ledger.claim_distribution(world.deployer, distribution, index, account, amount, inclusion_path(index, leaves))
        assert world.token.balance_of(account) == before + amount
        assert ledger.is_distribution_claimed(distribution, index)
    with reverts("AlreadyClaimed", distributionId=distribution, leafIndex=0):
        ledger.claim_distribution(world.deployer, distribution, 0, *entries[0], inclusion_path(0, leaves))
    info = ledger.get_distribution(distribution)
    assert (info.total, info.claimed, info.leaf_count) == (60 * OPEN, 60 * OPEN, 3)


def test_distribution_reverts(world, pool):
    ledger, owner = world.ledger, world.datanet_owner
    with reverts("NotDatanetOwner", caller=world.node.address, owner=owner.address):
        ledger.publish_distribution(world.node, pool, b"\x01" * 32, 1, OPEN)
    with reverts("PoolTooLow", pool=60 * OPEN, requested=61 * OPEN):
        ledger.publish_distribution(owner, pool, b"\x01" * 32, 1, 61 * OPEN)
    with reverts("EmptyDistribution"):
        ledger.publish_distribution(owner, pool, b"\x01" * 32, 0, OPEN)
    with reverts("UnknownDatanet"):
        ledger.publish_distribution(owner, "0x" + "98" * 32, b"\x01" * 32, 1, OPEN)
    # A root whose entries add up to more than the total cannot drain more than the total.
    entries = [(world.contributor.address, 8 * OPEN), (world.other_client.address, 8 * OPEN)]
    leaves = [leaf_hash(distribution_leaf_data(a, v)) for a, v in entries]
    distribution = ledger.publish_distribution(owner, pool, mth(leaves), 2, 10 * OPEN)
    with reverts("InvalidDistributionProof", leafIndex=0):
        ledger.claim_distribution(owner, distribution, 0, entries[0][0], 9 * OPEN, inclusion_path(0, leaves))
    ledger.claim_distribution(owner, distribution, 0, *entries[0], inclusion_path(0, leaves))
    with reverts("DistributionOverdrawn", remaining=2 * OPEN, amount=8 * OPEN):
        ledger.claim_distribution(owner, distribution, 1, *entries[1], inclusion_path(1, leaves))
    with reverts("UnknownDistribution", distributionId=7):
        ledger.claim_distribution(owner, 7, 0, *entries[0], [])


# --- disputes -------------------------------------------------------------------------------------------

@pytest.fixture
def hidden(world, market):
    """The node signed 8 receipts but checkpointed a log where receipt 5 was replaced by another leaf."""
    receipts, leaves = _log(world, 8)
    posted = list(leaves)
    posted[5] = leaf_hash(receipt_digest(make_receipt(world.node.address, 5, price=1), world.chain_id,
                                         world.ledger.address))
    world.ledger.post_checkpoint(world.node, 8, mth(posted), [])
    signatures = [sign_receipt(world.node, r, world.chain_id, world.ledger.address) for r in receipts]
    return receipts, signatures, posted


def test_receipt_digest_matches_the_eip712_typed_data(world, market):
    receipt = make_receipt(world.node.address, 3)
    digest = receipt_digest(receipt, world.chain_id, world.ledger.address)
    assert world.ledger.receipt_digest(receipt) == digest
    assert world.ledger.receipt_leaf_hash(receipt) == leaf_hash(digest)


def test_unanswered_dispute_slashes_the_node(world, hidden):
    receipts, signatures, _ = hidden
    ledger, challenger = world.ledger, world.challenger
    dispute = ledger.open_dispute(challenger, receipts[5], signatures[5])
    info = ledger.get_dispute(dispute)
    assert (info.status, info.seq, info.tree_size, info.bond) == ("open", 5, 8, TEST_PARAMS.dispute_bond)
    with reverts("DisputeWindowOpen", disputeId=dispute):
        ledger.resolve_dispute(world.deployer, dispute)
    world.anvil.increase_time(TEST_PARAMS.dispute_window + 1)
    with reverts("DisputeWindowClosed", disputeId=dispute):
        ledger.answer_dispute(world.node, dispute, [])
    assert ledger.resolve_dispute(world.deployer, dispute) == TEST_PARAMS.slash_amount
    assert world.registry.get_node(world.node.address).stake == TEST_PARAMS.min_stake - TEST_PARAMS.slash_amount
    assert ledger.claimable(challenger.address) == REWARD + TEST_PARAMS.dispute_bond
    assert ledger.burned() == TEST_PARAMS.slash_amount - REWARD
    assert ledger.get_dispute(dispute).status == "slashed"
    assert not world.registry.is_active_node(world.node.address)
    with reverts("DisputeNotOpen", disputeId=dispute, status=3):
        ledger.resolve_dispute(world.deployer, dispute)
    # The same evidence cannot be used twice.
    with reverts("AlreadyPenalized"):
        ledger.open_dispute(challenger, receipts[5], signatures[5])


def test_answered_dispute_pays_the_bond_to_the_node(world, hidden):
    receipts, signatures, posted = hidden
    ledger = world.ledger
    dispute = ledger.open_dispute(world.challenger, receipts[2], signatures[2])
    with reverts("InvalidInclusionProof", seq=2, treeSize=8):
        ledger.answer_dispute(world.node, dispute, inclusion_path(3, posted))
    ledger.answer_dispute(world.node, dispute, inclusion_path(2, posted))
    assert ledger.get_dispute(dispute).status == "answered"
    assert ledger.claimable(world.node.address) == TEST_PARAMS.dispute_bond
    assert world.registry.get_node(world.node.address).stake == TEST_PARAMS.min_stake
    world.anvil.increase_time(TEST_PARAMS.dispute_window + 1)
    with reverts("DisputeNotOpen", status=2):
        ledger.resolve_dispute(world.deployer, dispute)
    with reverts("UnknownDispute", disputeId=99):
        ledger.resolve_dispute(world.deployer, 99)


def test_dispute_needs_a_covered_receipt_signed_by_the_node(world, hidden):
    receipts, signatures, _ = hidden
    late = make_receipt(world.node.address, 8)
    with reverts("ReceiptNotCovered", seq=8, treeSize=8):
        world.ledger.open_dispute(world.challenger, late, sign_receipt(world.node, late, world.chain_id,
                                                                       world.ledger.address))
    forged = sign_receipt(world.other_node, receipts[5], world.chain_id, world.ledger.address)
    with reverts("ReceiptSignerMismatch", signer=world.other_node.address, node=world.node.address):
        world.ledger.open_dispute(world.challenger, receipts[5], forged)
    other_chain = sign_receipt(world.node, receipts[5], 1, world.ledger.address)
    with reverts("ReceiptSignerMismatch"):
        world.ledger.open_dispute(world.challenger, receipts[5], other_chain)


def test_mismatch_proof_slashes_at_once(world, hidden):
    receipts, signatures, posted = hidden
    ledger, challenger = world.ledger, world.challenger
    with reverts("LeafMatches"):
        ledger.prove_mismatch(challenger, receipts[4], signatures[4], posted[4], inclusion_path(4, posted))
    with reverts("InvalidInclusionProof"):
        ledger.prove_mismatch(challenger, receipts[5], signatures[5], posted[4], inclusion_path(4, posted))
    slashed = ledger.prove_mismatch(challenger, receipts[5], signatures[5], posted[5], inclusion_path(5, posted))
    assert slashed == TEST_PARAMS.slash_amount
    assert ledger.claimable(challenger.address) == REWARD
    with reverts("AlreadyPenalized"):
        ledger.prove_mismatch(challenger, receipts[5], signatures[5], posted[5], inclusion_path(5, posted))
    before = world.token.balance_of(challenger.address)
    ledger.claim(challenger)
    assert world.token.balance_of(challenger.address) == before + REWARD


def test_unbonding_stake_is_still_slashable(world, hidden):
    receipts, signatures, posted = hidden
    world.registry.request_unstake(world.node, TEST_PARAMS.min_stake)
    world.ledger.prove_mismatch(world.challenger, receipts[5], signatures[5], posted[5], inclusion_path(5, posted))
    info = world.registry.get_node(world.node.address)
    assert (info.stake, info.unbonding) == (0, TEST_PARAMS.min_stake - TEST_PARAMS.slash_amount)


def test_ledger_constructor_checks_its_parameters(world):
    args = (world.token.address, world.registry.address, world.channels.address)
    with reverts("InvalidSplit", adapterShareBps=9_000, datanetShareBps=2_000):
        deploy_contract(world.anvil.w3, world.deployer, "AttributionLedger", *args, 9_000, 2_000, 3600, 1, 1)
    with reverts("DisputeWindowTooLong", disputeWindow=TEST_PARAMS.unstake_delay):
        deploy_contract(world.anvil.w3, world.deployer, "AttributionLedger", *args, 2_000, 1_000,
                        TEST_PARAMS.unstake_delay, 1, 1)
