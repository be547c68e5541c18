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


def test_request_authorization_digest_is_the_eip712_document_and_binds_every_field():
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    from longtail.attribution.receipts import keccak
    from longtail.contracts.vouchers import VoucherSigner
    from longtail.node.vouchers import (
        VoucherDomain,
        recover_authorization_signer,
        request_authorization_typed_data,
        sign_request_authorization,
    )

    domain = VoucherDomain(31337, "0x" + "22" * 20)
    client = Account.from_key(bytes(range(1, 33)))
    channel = "0x" + "01" * 32
    auth = sign_request_authorization(VoucherSigner(domain, client.key), channel, "reviews-r4", keccak(b"prompt"), 16,
                                      2_000_000_000)
    typed = encode_typed_data(full_message=request_authorization_typed_data(domain, auth))
    assert Account.recover_message(typed, signature=bytes.fromhex(auth.signature[2:])) == client.address
    assert recover_authorization_signer(domain, auth) == client.address
    # Any field changed (another channel, model, prompt, length, nonce, expiry or deployment): another signer.
    import dataclasses

    for changed in (dataclasses.replace(auth, channel_id="0x" + "02" * 32),
                    dataclasses.replace(auth, model_hash=keccak(b"legal-r8")),
                    dataclasses.replace(auth, prompt_hash=keccak(b"other")),
                    dataclasses.replace(auth, max_tokens=17),
                    dataclasses.replace(auth, nonce="0x" + "ff" * 32),
                    dataclasses.replace(auth, expires_at=2_000_000_001)):
        assert recover_authorization_signer(domain, changed) != client.address
    assert recover_authorization_signer(VoucherDomain(1, "0x" + "22" * 20), auth) != client.address
