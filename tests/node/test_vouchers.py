"""The direct voucher digest, signature and recovery equal eth-account's typed-data path byte for byte."""

from __future__ import annotations

import os

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from longtail.attribution.receipts import InvalidSignature
from longtail.contracts.vouchers import (
    SignedVoucher,
    recover_voucher_signer,
    sign_voucher,
    voucher_typed_data,
)
from longtail.node.vouchers import VoucherDomain

CHANNELS = "0x" + "5f" * 20


@pytest.mark.parametrize("chain_id", [1, 31337])
def test_digest_signature_and_signer_match_eth_account(chain_id):
    domain = VoucherDomain(chain_id, CHANNELS)
    for amount in (0, 1, 10**16 + 7, 2**256 - 1):
        account = Account.from_key(os.urandom(32))
        channel = "0x" + os.urandom(32).hex()
        typed = encode_typed_data(full_message=voucher_typed_data(channel, amount, chain_id, CHANNELS))
        assert domain.digest(channel, amount) == keccak(b"\x19" + typed.version + typed.header + typed.body)
        fast = domain.sign(account.key, channel, amount)
        assert fast.signature == "0x" + bytes(Account.sign_message(typed, account.key).signature).hex()
        assert fast == sign_voucher(account, channel, amount, chain_id, CHANNELS)
        assert domain.recover(fast) == recover_voucher_signer(fast, chain_id, CHANNELS) == account.address


def test_a_voucher_for_another_chain_recovers_someone_else_and_bad_signatures_are_refused():
    account = Account.from_key(os.urandom(32))
    channel = "0x" + "01" * 32
    voucher = VoucherDomain(1, CHANNELS).sign(account.key, channel, 5)
    assert VoucherDomain(31337, CHANNELS).recover(voucher) != account.address
    raw = bytes.fromhex(voucher.signature[2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = raw[:32] + (n - int.from_bytes(raw[32:64], "big")).to_bytes(32, "big") + bytes([55 - raw[64]])  # 27 <-> 28
    with pytest.raises(InvalidSignature, match="malleable"):
        VoucherDomain(1, CHANNELS).recover(SignedVoucher(channel, 5, "0x" + high_s.hex()))
    with pytest.raises(InvalidSignature):
        VoucherDomain(1, CHANNELS).recover(SignedVoucher(channel, 5, "0x" + "11" * 64))
