"""Receipts: EIP-712 digest and signature agree with eth-account; verification names why it fails."""

from __future__ import annotations

import dataclasses
import json

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import keccak
from hypothesis import given
from hypothesis import strategies as st

from longtail.attribution.receipts import (
    AttributionMismatch,
    AttributionVector,
    DigestMismatch,
    InvalidSignature,
    MalformedReceipt,
    MatchedSpan,
    Receipt,
    ReceiptDomain,
    ReceiptError,
    RecordCredit,
    SignedReceipt,
    WrongDomain,
    WrongSigner,
    address_of,
    attribution_hash,
    receipt_digest,
    recover_signer,
    sign_receipt,
    typed_data,
    verify_receipt,
)

NODE_KEY = "0x" + "4c" * 32
OTHER_KEY = "0x" + "5d" * 32
DOMAIN = ReceiptDomain(chain_id=31337, verifying_contract="0x5fbdb2315678afecb367f032d93f642f64180aa3")
DATANET_A = "0x" + "0a" * 32
DATANET_B = "0x" + "0b" * 32
VECTOR = AttributionVector((DATANET_A, DATANET_B), (6500, 3500))


def make_receipt(**changes) -> Receipt:
    fields = dict(
        node=address_of(NODE_KEY), seq=7, request_id="0x" + "01" * 32, client="0x" + "c1" * 20,
        channel_id="0x" + "ce" * 32, base_model_id="0x" + "ba" * 32, adapter_id="0x" + "ad" * 32,
        prompt_hash="0x" + keccak(text="hello").hex(), output_hash="0x" + keccak(text="world").hex(),
        prompt_tokens=12, output_tokens=34, price=10**21 + 5, attribution_hash=VECTOR.hash, timestamp=1_764_000_000,
    )
    fields.update(changes)
    return Receipt(**fields)


def signed_example() -> SignedReceipt:
    spans = (MatchedSpan(3, 15, DATANET_A, 2, (RecordCredit("legal-00001", "0x" + "e1" * 20),)),)
    return sign_receipt(make_receipt(), NODE_KEY, DOMAIN, VECTOR, spans)


def test_digest_and_signature_equal_eth_accounts_typed_data_path():
    receipt = make_receipt()
    message = encode_typed_data(full_message=typed_data(receipt, DOMAIN))
    assert receipt_digest(receipt, DOMAIN) == _hash_eip191_message(message)
    signed = signed_example()
    assert signed.signature == Account.sign_message(message, NODE_KEY).signature
    assert Account.recover_message(message, signature=signed.signature) == receipt.node
    assert verify_receipt(signed, DOMAIN, expected_signer=receipt.node) == receipt.node


def test_json_body_round_trips_canonically():
    signed = signed_example()
    body = signed.to_canonical_json()
    again = SignedReceipt.from_json(body)
    assert again == signed and again.to_canonical_json() == body
    data = json.loads(body)
    assert data["receipt"]["price"] == str(10**21 + 5)
    assert set(data) == {"version", "domain", "receipt", "digest", "signature", "attribution", "spans"}
    assert data["digest"] == "0x" + receipt_digest(signed.receipt, DOMAIN).hex()
    verify_receipt(again, DOMAIN)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Receipt) if f.name != "attribution_hash"])
def test_changing_any_field_breaks_the_signature(field):
    signed = signed_example()
    original = getattr(signed.receipt, field)
    if isinstance(original, int):
        changed = original + 1
    elif len(original) == 42:
        changed = address_of(OTHER_KEY) if field == "node" else "0x" + "77" * 20
    else:
        changed = original[:-1] + ("0" if original[-1] != "0" else "1")
    tampered = dataclasses.replace(signed, receipt=dataclasses.replace(signed.receipt, **{field: changed}))
    with pytest.raises(InvalidSignature, match="recovers"):
        verify_receipt(tampered, DOMAIN)
    # The same edit in a served JSON body is caught by its stated digest before any signature check.
    body = signed.to_json()
    body["receipt"] = tampered.receipt.to_json()
    with pytest.raises(DigestMismatch):
        SignedReceipt.from_json(body)


def test_changed_attribution_is_named():
    signed = signed_example()
    other = AttributionVector((DATANET_A, DATANET_B), (5000, 5000))
    with pytest.raises(AttributionMismatch, match="hashes to"):
        verify_receipt(dataclasses.replace(signed, attribution=other), DOMAIN)
    forged = dataclasses.replace(signed, attribution=other,
                                 receipt=dataclasses.replace(signed.receipt, attribution_hash=other.hash))
    with pytest.raises(InvalidSignature):
        verify_receipt(forged, DOMAIN)
    stray = dataclasses.replace(signed, spans=(MatchedSpan(0, 9, "0x" + "0c" * 32, 1),))
    with pytest.raises(AttributionMismatch, match="no weight"):
        verify_receipt(stray, DOMAIN)


def test_wrong_signer_and_foreign_key_are_told_apart():
    signed = signed_example()
    with pytest.raises(WrongSigner) as error:
        verify_receipt(signed, DOMAIN, expected_signer=address_of(OTHER_KEY))
    assert error.value.actual == address_of(NODE_KEY) and error.value.expected == address_of(OTHER_KEY)
    # Signed by another key while naming our node: the signature does not recover the named node.
    impostor = sign_receipt(make_receipt(node=address_of(OTHER_KEY)), OTHER_KEY, DOMAIN, VECTOR)
    claimed = dataclasses.replace(impostor, receipt=dataclasses.replace(impostor.receipt, node=address_of(NODE_KEY)))
    with pytest.raises(InvalidSignature, match="names node " + address_of(NODE_KEY)):
        verify_receipt(claimed, DOMAIN)
    with pytest.raises(WrongSigner):
        sign_receipt(make_receipt(), OTHER_KEY, DOMAIN, VECTOR)


@pytest.mark.parametrize("field, other", [
    ("chain_id", 1), ("verifying_contract", "0x" + "99" * 20), ("name", "Shorttail"), ("version", "2")])
def test_wrong_domain_names_the_field(field, other):
    signed = signed_example()
    expected = dataclasses.replace(DOMAIN, **{field: other})
    with pytest.raises(WrongDomain) as error:
        verify_receipt(signed, expected)
    assert error.value.field == {"chain_id": "chainId", "verifying_contract": "verifyingContract"}.get(field, field)
    # A body that lies about its domain still fails: the signature was made under the real one.
    relabelled = dataclasses.replace(signed, domain=expected)
    with pytest.raises(InvalidSignature):
        verify_receipt(relabelled, expected)


def test_malformed_signatures_are_refused_with_the_reason():
    signed = signed_example()
    digest = receipt_digest(signed.receipt, DOMAIN)
    with pytest.raises(InvalidSignature, match="64|65"):
        recover_signer(digest, signed.signature[:64])
    with pytest.raises(InvalidSignature, match="v is 29"):
        recover_signer(digest, signed.signature[:64] + bytes([29]))
    high_s = (0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
              - int.from_bytes(signed.signature[32:64], "big")).to_bytes(32, "big")
    with pytest.raises(InvalidSignature, match="malleable"):
        recover_signer(digest, signed.signature[:32] + high_s + bytes([55 - signed.signature[64]]))


def test_attribution_hash_is_abi_encoded_and_validated():
    expected = keccak(abi_encode(["bytes32[]", "uint16[]"], [[bytes.fromhex(DATANET_A[2:]), bytes.fromhex(DATANET_B[2:])],
                                                            [6500, 3500]]))
    assert attribution_hash([DATANET_A, DATANET_B], [6500, 3500]) == "0x" + expected.hex()
    assert AttributionVector().hash == "0x" + keccak(abi_encode(["bytes32[]", "uint16[]"], [[], []])).hex()
    assert AttributionVector.from_weights({DATANET_B: 1, DATANET_A: 9999, "0x" + "0c" * 32: 0}).datanet_ids == (
        DATANET_A, DATANET_B)
    with pytest.raises(AttributionMismatch, match="ascending"):
        attribution_hash([DATANET_B, DATANET_A], [5000, 5000])
    with pytest.raises(AttributionMismatch, match="sum to 9999"):
        attribution_hash([DATANET_A, DATANET_B], [5000, 4999])
    with pytest.raises(AttributionMismatch, match="not in 1..10000"):
        attribution_hash([DATANET_A, DATANET_B], [10000, 0])
    with pytest.raises(AttributionMismatch, match="2 datanet ids but 1"):
        attribution_hash([DATANET_A, DATANET_B], [10000])


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=24, unique=True), st.data())
def test_attribution_hash_matches_eth_abi_for_any_vector(ids, data):
    """The hash is built word by word for speed; eth-abi's generic encoder is the definition it must equal."""
    ids = sorted(ids)
    cuts = sorted(data.draw(st.lists(st.integers(1, 9999), min_size=len(ids) - 1, max_size=len(ids) - 1,
                                     unique=True)))
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, 10_000], strict=True)]
    expected = keccak(abi_encode(["bytes32[]", "uint16[]"], [ids, weights]))
    assert attribution_hash(["0x" + i.hex() for i in ids], weights) == "0x" + expected.hex()


@pytest.mark.parametrize("changes, field", [
    (dict(seq=-1), "seq"), (dict(prompt_tokens=2**32), "promptTokens"), (dict(client="0x1234"), "client"),
    (dict(request_id="0x" + "zz" * 32), "requestId"), (dict(price=2**256), "price"), (dict(timestamp=True), "timestamp")])
def test_malformed_fields_name_themselves(changes, field):
    with pytest.raises(MalformedReceipt) as error:
        make_receipt(**changes)
    assert error.value.field == field


def test_missing_members_in_a_body_are_reported():
    body = signed_example().to_json()
    del body["receipt"]["outputHash"]
    with pytest.raises(ReceiptError, match="outputHash"):
        SignedReceipt.from_json(body)
