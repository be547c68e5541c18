"""OpenToken: ERC-20 transfers and allowances, EIP-2612 permit, the devnet mint role."""

from __future__ import annotations

from longtail.contracts.deployment import OPEN

from contracts_testkit import reverts


def test_transfer_moves_balance_and_keeps_supply(world):
    token, a, b = world.token, world.client, world.other_client
    supply = token.total_supply()
    before_a, before_b = token.balance_of(a.address), token.balance_of(b.address)
    token.transfer(a, b.address, 5 * OPEN)
    assert token.balance_of(a.address) == before_a - 5 * OPEN
    assert token.balance_of(b.address) == before_b + 5 * OPEN
    assert token.total_supply() == supply
    assert token.transfers(from_block=0, to=b.address)[-1]["value"] == 5 * OPEN


def test_transfer_more_than_balance_reverts_with_numbers(world):
    token, a = world.token, world.client
    balance = token.balance_of(a.address)
    with reverts("ERC20InsufficientBalance", sender=a.address, balance=balance, needed=balance + 1):
        token.transfer(a, world.other_client.address, balance + 1)


def test_transfer_to_zero_address_reverts(world):
    with reverts("ERC20InvalidReceiver"):
        world.token.transfer(world.client, "0x" + "00" * 20, 1)


def test_transfer_from_spends_allowance_and_reverts_beyond_it(world):
    token, owner, spender = world.token, world.client, world.other_client
    token.approve(owner, spender.address, 3 * OPEN)
    fn = token.contract.functions.transferFrom(owner.address, spender.address, 2 * OPEN)
    from longtail.contracts.chain import send
    send(world.anvil.w3, spender, fn)
    assert token.allowance(owner.address, spender.address) == 1 * OPEN
    with reverts("ERC20InsufficientAllowance", spender=spender.address, allowance=1 * OPEN, needed=2 * OPEN):
        send(world.anvil.w3, spender, fn)


def test_approve_zero_spender_reverts(world):
    with reverts("ERC20InvalidSpender"):
        world.token.approve(world.client, "0x" + "00" * 20, 1)


def test_permit_sets_allowance_once(world):
    token, owner, spender = world.token, world.client, world.other_client
    permit = token.sign_permit(owner, spender.address, 7 * OPEN, deadline=world.now() + 3600)
    token.permit(world.deployer, permit)  # anyone may submit it
    assert token.allowance(owner.address, spender.address) == 7 * OPEN
    assert token.nonce(owner.address) == 1
    # The nonce moved on, so the same signature now recovers to someone else.
    with reverts("PermitInvalidSigner", owner=owner.address):
        token.permit(world.deployer, permit)


def test_permit_expired_or_forged_reverts(world):
    token, owner, spender = world.token, world.client, world.other_client
    expired = token.sign_permit(owner, spender.address, 1, deadline=world.now() - 1)
    with reverts("PermitExpired", deadline=expired.deadline):
        token.permit(owner, expired)
    forged = token.sign_permit(world.other_client, spender.address, 1, deadline=world.now() + 60)
    forged = type(forged)(**{**forged.__dict__, "owner": owner.address})
    with reverts("PermitInvalidSigner", owner=owner.address):
        token.permit(owner, forged)


def test_mint_role_and_closing(world):
    token, admin, minter = world.token, world.deployer, world.other_client
    supply = token.total_supply()
    with reverts("NotMinter", caller=minter.address):
        token.mint(minter, minter.address, 1)
    with reverts("NotAdmin", caller=minter.address):
        token.set_minter(minter, minter.address, True)
    token.set_minter(admin, minter.address, True)
    token.mint(minter, world.client.address, 3 * OPEN)
    assert token.total_supply() == supply + 3 * OPEN
    with reverts("ERC20InvalidReceiver"):
        token.mint(minter, "0x" + "00" * 20, 1)
    with reverts("NotAdmin"):
        token.close_minting(minter)
    token.close_minting(admin)
    with reverts("MintingIsClosed"):
        token.mint(admin, admin.address, 1)
    with reverts("MintingIsClosed"):
        token.close_minting(admin)
    assert token.total_supply() == supply + 3 * OPEN
