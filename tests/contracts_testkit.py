"""Helpers for the contract tests: an independent RFC 9162 oracle, receipt signing, and the test world.

The Merkle functions below are written straight from RFC 9162 §2.1 (recursive MTH, PATH and SUBPROOF),
independently of attribution.merkle, so the on-chain verifiers are checked against the RFC's text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from longtail.contracts.anvil import Anvil
from longtail.contracts.chain import ContractRevert
from longtail.contracts.client import LongtailContracts
from longtail.contracts.deployment import OPEN, DeployParams

TEST_PARAMS = DeployParams(
    initial_supply=10_000_000 * OPEN,
    min_stake=1_000 * OPEN,
    unstake_delay=7 * 24 * 3600,
    thaw_period=24 * 3600,
    adapter_share_bps=2_000,
    datanet_share_bps=1_000,
    dispute_window=24 * 3600,
    dispute_bond=10 * OPEN,
    slash_amount=500 * OPEN,
)


# --- RFC 9162 §2.1, recursive ------------------------------------------------------------------

def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(hashes: list[bytes]) -> bytes:
    """MTH over leaf hashes."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = _k(len(hashes))
    return node_hash(mth(hashes[:k]), mth(hashes[k:]))


def inclusion_path(m: int, hashes: list[bytes]) -> list[bytes]:
    """PATH(m, D[n])."""
    n = len(hashes)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return inclusion_path(m, hashes[:k]) + [mth(hashes[k:])]
    return inclusion_path(m - k, hashes[k:]) + [mth(hashes[:k])]


def consistency_proof(m: int, hashes: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""
    return _subproof(m, hashes, True)


def _subproof(m: int, hashes: list[bytes], complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [mth(hashes)]
    k = _k(n)
    if m <= k:
        return _subproof(m, hashes[:k], complete) + [mth(hashes[k:])]
    return _subproof(m - k, hashes[k:], False) + [mth(hashes[:k])]


# --- receipts (DESIGN.md field list) ------------------------------------------------------------

RECEIPT_TYPES = [
    {"name": "node", "type": "address"},
    {"name": "seq", "type": "uint64"},
    {"name": "requestId", "type": "bytes32"},
    {"name": "client", "type": "address"},
    {"name": "channelId", "type": "bytes32"},
    {"name": "baseModelId", "type": "bytes32"},
    {"name": "adapterId", "type": "bytes32"},
    {"name": "promptHash", "type": "bytes32"},
    {"name": "outputHash", "type": "bytes32"},
    {"name": "promptTokens", "type": "uint32"},
    {"name": "outputTokens", "type": "uint32"},
    {"name": "price", "type": "uint256"},
    {"name": "attributionHash", "type": "bytes32"},
    {"name": "timestamp", "type": "uint64"},
]
DOMAIN_TYPES = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def make_receipt(node: str, seq: int, price: int = 1000, client: str = "0x" + "22" * 20, salt: bytes = b"") -> dict:
    """A receipt message with deterministic, seq-dependent hashes."""
    tag = seq.to_bytes(8, "big") + salt
    return {
        "node": node, "seq": seq, "requestId": keccak(b"req" + tag), "client": client,
        "channelId": keccak(b"chan"), "baseModelId": keccak(b"base"), "adapterId": keccak(b"adapter"),
        "promptHash": keccak(b"prompt" + tag), "outputHash": keccak(b"output" + tag), "promptTokens": 12,
        "outputTokens": 34, "price": price, "attributionHash": keccak(b"attr"), "timestamp": 1_700_000_000 + seq,
    }


def receipt_typed_data(receipt: dict, chain_id: int, ledger: str) -> dict:
    return {
        "types": {"EIP712Domain": DOMAIN_TYPES, "Receipt": RECEIPT_TYPES},
        "primaryType": "Receipt",
        "domain": {"name": "Longtail", "version": "1", "chainId": chain_id, "verifyingContract": ledger},
        "message": receipt,
    }


def receipt_digest(receipt: dict, chain_id: int, ledger: str) -> bytes:
    signable = encode_typed_data(full_message=receipt_typed_data(receipt, chain_id, ledger))
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def sign_receipt(signer: LocalAccount, receipt: dict, chain_id: int, ledger: str) -> bytes:
    signed = Account.sign_message(encode_typed_data(full_message=receipt_typed_data(receipt, chain_id, ledger)),
                                  signer.key)
    return bytes(signed.signature)


# --- the test world -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class World:
    """A deployed contract set on a shared anvil, with named funded actors."""

    anvil: Anvil
    contracts: LongtailContracts
    deployer: LocalAccount
    node: LocalAccount
    client: LocalAccount
    adapter_owner: LocalAccount
    datanet_owner: LocalAccount
    challenger: LocalAccount
    other_node: LocalAccount
    other_client: LocalAccount
    contributor: LocalAccount

    @property
    def token(self):
        return self.contracts.token

    @property
    def registry(self):
        return self.contracts.registry

    @property
    def channels(self):
        return self.contracts.channels

    @property
    def ledger(self):
        return self.contracts.ledger

    @property
    def chain_id(self) -> int:
        return self.contracts.deployment.chain_id

    def now(self) -> int:
        return self.anvil.w3.eth.get_block("latest")["timestamp"]

    def register_node(self, node: LocalAccount | None = None, stake: int = TEST_PARAMS.min_stake) -> LocalAccount:
        node = node or self.node
        self.registry.register_node(node, stake, "http://127.0.0.1:8000", b"\x00\x25peer")
        return node


@contextlib.contextmanager
def reverts(name: str, **expected_args):
    """Expect a ContractRevert with custom error `name` (and, if given, these decoded argument values)."""
    with pytest.raises(ContractRevert) as info:
        yield info
    assert info.value.name == name, f"expected {name}, got {info.value}"
    for key, value in expected_args.items():
        assert info.value.args_by_name[key] == value, f"{name}.{key}: {info.value.args_by_name[key]!r} != {value!r}"
