"""PaymentChannels: deposits, cumulative vouchers that pay only the increase, thawed withdrawals, replay."""

from __future__ import annotations

import pytest

from longtail.contracts.chain import send
from longtail.contracts.channels import channel_id_of
from longtail.contracts.deployment import OPEN, deploy_contract
from longtail.contracts.vouchers import SignedVoucher, recover_voucher_signer, sign_voucher, voucher_digest

from contracts_testkit import TEST_PARAMS, reverts


@pytest.fixture
def channel(world):
    """The client's channel to the node with 100 OPEN deposited."""
    return world.channels.deposit(world.client, world.node.address, 100 * OPEN)


def test_deposit_opens_and_tops_up_one_channel_per_pair(world):
    channels, client, node = world.channels, world.client, world.node
    before = world.token.balance_of(client.address)
    channel_id = channels.deposit(client, node.address, 40 * OPEN)
    assert channel_id == channel_id_of(client.address, node.address)
    assert channels.deposit(client, node.address, 2 * OPEN) == channel_id
    info = channels.get_channel(channel_id)
    assert (info.client, info.node, info.deposit, info.redeemed, info.closing) == (client.address, node.address, 42 * OPEN, 0, False)
    assert world.token.balance_of(client.address) == before - 42 * OPEN
    assert channels.channels_of(client=client.address) == [channel_id]


def test_deposit_with_permit_needs_no_approve(world):
    channels, client = world.channels, world.other_client
    assert world.token.allowance(client.address, channels.address) == 0
    channel_id = channels.deposit_with_permit(client, world.node.address, 9 * OPEN, deadline=world.now() + 600)
    assert channels.get_channel(channel_id).deposit == 9 * OPEN
    assert world.token.allowance(client.address, channels.address) == 0


def test_deposit_reverts(world):
    channels, client = world.channels, world.client
    world.token.approve(client, channels.address, 10 * OPEN)
    f = channels.contract.functions.deposit
    with reverts("ZeroAmount"):
        send(world.anvil.w3, client, f(world.node.address, 0))
    with reverts("ZeroAddress"):
        send(world.anvil.w3, client, f("0x" + "00" * 20, 1))
    with reverts("ClientIsNode", account=client.address):
        send(world.anvil.w3, client, f(client.address, 1))
    with reverts("ERC20InsufficientAllowance"):
        send(world.anvil.w3, client, f(world.node.address, 11 * OPEN))


def test_redeem_pays_only_the_increase(world, channel):
    channels, client, node = world.channels, world.client, world.node
    assert channels.redeem(node, channels.sign_voucher(client, channel, 10 * OPEN)) == 10 * OPEN
    assert channels.redeem(node, channels.sign_voucher(client, channel, 25 * OPEN)) == 15 * OPEN
    assert channels.revenue(node.address) == 25 * OPEN
    assert channels.get_channel(channel).redeemed == 25 * OPEN
    assert [(r.cumulative_amount, r.paid) for r in channels.redemptions(channel_id=channel)] == [
        (10 * OPEN, 10 * OPEN), (25 * OPEN, 15 * OPEN)]


@pytest.mark.parametrize("cumulative", [25 * OPEN, 24 * OPEN])
def test_equal_or_lower_voucher_pays_nothing(world, channel, cumulative):
    channels, client, node = world.channels, world.client, world.node
    channels.redeem(node, channels.sign_voucher(client, channel, 25 * OPEN))
    with reverts("VoucherNotIncreasing", cumulativeAmount=cumulative, redeemed=25 * OPEN):
        channels.redeem(node, channels.sign_voucher(client, channel, cumulative))
    assert channels.revenue(node.address) == 25 * OPEN


def test_voucher_above_deposit_pays_the_deposit_then_nothing(world, channel):
    channels, client, node = world.channels, world.client, world.node
    assert channels.redeem(node, channels.sign_voucher(client, channel, 150 * OPEN)) == 100 * OPEN
    with reverts("ChannelExhausted", deposit=100 * OPEN, redeemed=100 * OPEN):
        channels.redeem(node, channels.sign_voucher(client, channel, 200 * OPEN))


def test_only_the_channel_node_redeems(world, channel):
    channels = world.channels
    voucher = channels.sign_voucher(world.client, channel, OPEN)
    with reverts("NotChannelNode", caller=world.other_node.address, node=world.node.address):
        channels.redeem(world.other_node, voucher)
    with reverts("UnknownChannel"):
        channels.redeem(world.node, SignedVoucher("0x" + "55" * 32, OPEN, voucher.signature))


def test_voucher_replay_across_channel_chain_and_contract_is_rejected(world, channel):
    channels, client, node = world.channels, world.client, world.node
    # Another channel of the same client (to another node): its voucher names that channel.
    other_channel = channels.deposit(client, world.other_node.address, 50 * OPEN)
    foreign = channels.sign_voucher(client, other_channel, 5 * OPEN)
    replayed = SignedVoucher(channel, foreign.cumulative_amount, foreign.signature)
    # Another chain id, and another PaymentChannels deployment on this chain.
    other_chain = sign_voucher(client, channel, 5 * OPEN, chain_id=1, channels_address=channels.address)
    other_contract_address = deploy_contract(world.anvil.w3, world.deployer, "PaymentChannels", world.token.address, 60)
    other_contract = sign_voucher(client, channel, 5 * OPEN, world.chain_id, other_contract_address)
    for voucher in (replayed, other_chain, other_contract):
        with reverts("VoucherSignerMismatch", client=client.address):
            channels.redeem(node, voucher)
    assert channels.revenue(node.address) == 0
    # Signed by someone other than the client.
    with reverts("VoucherSignerMismatch", signer=world.other_client.address):
        channels.redeem(node, channels.sign_voucher(world.other_client, channel, OPEN))


def test_malformed_signatures_are_rejected(world, channel):
    channels, node = world.channels, world.node
    good = channels.sign_voucher(world.client, channel, OPEN)
    with reverts("SignatureLengthInvalid", length=64):
        channels.redeem(node, SignedVoucher(channel, OPEN, good.signature[:-2]))
    raw = bytes.fromhex(good.signature[2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(raw[32:64], "big")
    flipped = raw[:32] + (n - s).to_bytes(32, "big") + bytes([55 - raw[64]])  # the malleable twin
    with reverts("SignatureMalleable"):
        channels.redeem(node, SignedVoucher(channel, OPEN, "0x" + flipped.hex()))


def test_withdraw_after_thaw_refunds_the_rest(world, channel):
    channels, client, node = world.channels, world.client, world.node
    channels.redeem(node, channels.sign_voucher(client, channel, 30 * OPEN))
    with reverts("WithdrawNotStarted"):
        channels.finish_withdraw(client, channel)
    thaw_ends = channels.start_withdraw(client, channel)
    assert thaw_ends >= world.now() + TEST_PARAMS.thaw_period - 1
    assert channels.get_channel(channel).closing
    with reverts("WithdrawAlreadyStarted", thawEndsAt=thaw_ends):
        channels.start_withdraw(client, channel)
    with reverts("StillThawing", thawEndsAt=thaw_ends):
        channels.finish_withdraw(client, channel)
    # A pending redeem still beats the thaw.
    assert channels.redeem(node, channels.sign_voucher(client, channel, 45 * OPEN)) == 15 * OPEN
    world.anvil.increase_time(TEST_PARAMS.thaw_period)
    before = world.token.balance_of(client.address)
    assert channels.finish_withdraw(client, channel) == 55 * OPEN
    assert world.token.balance_of(client.address) == before + 55 * OPEN
    info = channels.get_channel(channel)
    assert (info.deposit, info.redeemed, info.closing) == (45 * OPEN, 45 * OPEN, False)
    # Old vouchers can never pay again; a new deposit continues the same cumulative count.
    with reverts("VoucherNotIncreasing"):
        channels.redeem(node, channels.sign_voucher(client, channel, 45 * OPEN))
    channels.deposit(client, node.address, 10 * OPEN)
    assert channels.redeem(node, channels.sign_voucher(client, channel, 50 * OPEN)) == 5 * OPEN


def test_cancel_withdraw_and_client_only(world, channel):
    channels, client = world.channels, world.client
    with reverts("NotChannelClient", caller=world.node.address, client=client.address):
        channels.start_withdraw(world.node, channel)
    with reverts("WithdrawNotStarted"):
        channels.cancel_withdraw(client, channel)
    channels.start_withdraw(client, channel)
    channels.cancel_withdraw(client, channel)
    assert not channels.get_channel(channel).closing
    with reverts("UnknownChannel"):
        channels.start_withdraw(client, "0x" + "66" * 32)


def test_only_the_ledger_releases_revenue(world, channel):
    with reverts("NotLedger", caller=world.node.address):
        send(world.anvil.w3, world.node, world.channels.contract.functions.releaseRevenue(world.node.address, 1))
    with reverts("LedgerAlreadySet"):
        send(world.anvil.w3, world.deployer, world.channels.contract.functions.setLedger(world.node.address))


def test_python_voucher_digest_and_recovery_match_the_contract(world, channel):
    voucher = world.channels.sign_voucher(world.client, channel, 123)
    assert voucher_digest(channel, 123, world.chain_id, world.channels.address) == world.channels.voucher_digest(channel, 123)
    assert recover_voucher_signer(voucher, world.chain_id, world.channels.address) == world.client.address
    assert recover_voucher_signer(voucher, 1, world.channels.address) != world.client.address
    assert SignedVoucher.from_json(voucher.to_json()) == voucher


def test_signature_that_recovers_nobody_is_rejected(world, channel):
    zero_r = "0x" + "00" * 32 + (1).to_bytes(32, "big").hex() + "1b"  # r = 0: ecrecover returns address(0)
    with reverts("SignatureInvalid"):
        world.channels.redeem(world.node, SignedVoucher(channel, OPEN, zero_r))


def test_deposits_beyond_uint128_are_refused(world):
    huge = 2**128
    world.token.mint(world.deployer, world.client.address, huge)
    with reverts("AmountTooLarge", amount=huge):
        world.channels.deposit(world.client, world.node.address, huge)
    with reverts("AmountTooLarge", amount=huge):
        world.registry.register_node(world.client, huge, "e", b"p")
