"""Vouchers (DESIGN.md, fixed): EIP-712 `Voucher(bytes32 channelId,uint256 cumulativeAmount)`.

Domain {name "Longtail", version "1", chainId, verifyingContract = PaymentChannels}: a voucher signed for
one chain or one PaymentChannels deployment never verifies on another. Pure functions; no chain access.

One digest: every paid request carries a voucher, so `VoucherDomain` computes the EIP-712 digest directly
(the struct is two static words: one keccak once the domain separator is cached) and signs it with
libsecp256k1, about 0.1 ms against eth-account's generic typed-data encoder's 0.4 ms. `voucher_typed_data`
is the same message as the document a wallet shows and signs; the tests hold eth-account's encoding of it
and `recover_voucher_signer` (eth-account's recovery, kept as the independent check) equal to the direct path.
"""

from __future__ import annotations

import dataclasses
import functools

import coincurve
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from sha3 import keccak_256

DOMAIN_NAME = "Longtail"
DOMAIN_VERSION = "1"

EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
VOUCHER_FIELDS = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "cumulativeAmount", "type": "uint256"},
]


class InvalidVoucher(ValueError):
    """A voucher's fields or signature are malformed."""


@dataclasses.dataclass(frozen=True)
class SignedVoucher:
    """A client's promise: everything paid on `channel_id` so far, with its 65-byte signature (0x-hex)."""

    channel_id: str
    cumulative_amount: int
    signature: str

    def to_json(self) -> dict:
        return {"channel_id": self.channel_id, "cumulative_amount": str(self.cumulative_amount),
                "signature": self.signature}

    @classmethod
    def from_json(cls, data: dict) -> SignedVoucher:
        try:
            return cls(channel_id=str(data["channel_id"]).lower(), cumulative_amount=int(data["cumulative_amount"]),
                       signature=str(data["signature"]).lower())
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidVoucher(f"malformed voucher JSON: {error}") from error


def voucher_domain(chain_id: int, channels_address: str) -> dict:
    """The EIP-712 domain of vouchers for one PaymentChannels deployment."""
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": int(chain_id),
            "verifyingContract": to_checksum_address(channels_address)}


def voucher_typed_data(channel_id: str | bytes, cumulative_amount: int, chain_id: int, channels_address: str) -> dict:
    """The full EIP-712 typed-data document for a voucher (what wallets display and sign)."""
    if cumulative_amount < 0 or cumulative_amount >= 2**256:
        raise InvalidVoucher(f"cumulative amount {cumulative_amount} is not a uint256")
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, "Voucher": VOUCHER_FIELDS},
        "primaryType": "Voucher",
        "domain": voucher_domain(chain_id, channels_address),
        "message": {"channelId": _bytes32(channel_id), "cumulativeAmount": int(cumulative_amount)},
    }


def keccak(data: bytes) -> bytes:
    """Keccak-256 in C (a voucher is hashed twice per paid request, on the client and on the node)."""
    return keccak_256(data).digest()


DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint256 cumulativeAmount)")


@dataclasses.dataclass(frozen=True)
class VoucherDomain:
    """Vouchers of one PaymentChannels deployment: the digest and the client's signature."""

    chain_id: int
    channels_address: str

    @functools.cached_property
    def separator(self) -> bytes:
        return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "uint256", "address"],
                                 [DOMAIN_TYPEHASH, keccak(DOMAIN_NAME.encode()), keccak(DOMAIN_VERSION.encode()),
                                  int(self.chain_id), to_checksum_address(self.channels_address)]))

    def digest(self, channel_id: str | bytes, cumulative_amount: int) -> bytes:
        """keccak256(0x1901 || domainSeparator || hashStruct(voucher)); equals PaymentChannels.voucherDigest."""
        if not 0 <= cumulative_amount < 2**256:
            raise InvalidVoucher(f"cumulative amount {cumulative_amount} is not a uint256")
        struct = keccak(VOUCHER_TYPEHASH + _bytes32(channel_id) + int(cumulative_amount).to_bytes(32, "big"))
        return keccak(b"\x19\x01" + self.separator + struct)

    def sign(self, private_key: bytes | str, channel_id: str | bytes, cumulative_amount: int) -> SignedVoucher:
        """The client's signature (r || s || v, v in {27, 28}): RFC 6979 low-s, byte for byte eth-account's."""
        return VoucherSigner(self, private_key).sign(channel_id, cumulative_amount)


class VoucherSigner:
    """One client key's vouchers for one deployment; holds the parsed key, so each voucher is one libsecp256k1
    call (parsing a key derives its public key: as long again as the signature)."""

    def __init__(self, domain: VoucherDomain, private_key: bytes | str) -> None:
        self.domain = domain
        self._key = coincurve.PrivateKey(bytes(HexBytes(private_key)))

    def sign_digest(self, digest: bytes) -> bytes:
        """r || s || v (v in {27, 28}) over a digest of this domain: RFC 6979 low-s, byte for byte eth-account's."""
        recoverable = self._key.sign_recoverable(digest, hasher=None)
        return recoverable[:64] + bytes([recoverable[64] + 27])

    def sign(self, channel_id: str | bytes, cumulative_amount: int) -> SignedVoucher:
        signature = self.sign_digest(self.domain.digest(channel_id, cumulative_amount))
        return SignedVoucher(channel_id="0x" + _bytes32(channel_id).hex(), cumulative_amount=int(cumulative_amount),
                             signature="0x" + signature.hex())


def voucher_digest(channel_id: str | bytes, cumulative_amount: int, chain_id: int, channels_address: str) -> bytes:
    """The 32-byte EIP-712 digest; equals PaymentChannels.voucherDigest on chain."""
    return VoucherDomain(chain_id, channels_address).digest(channel_id, cumulative_amount)


def sign_voucher(signer: LocalAccount | str, channel_id: str | bytes, cumulative_amount: int, chain_id: int,
                 channels_address: str) -> SignedVoucher:
    """Sign a voucher with the client's key (an eth-account account or a hex private key)."""
    return VoucherDomain(chain_id, channels_address).sign(_key(signer), channel_id, cumulative_amount)


def recover_voucher_signer(voucher: SignedVoucher, chain_id: int, channels_address: str) -> str:
    """The checksummed address that signed `voucher` for this chain and contract."""
    typed = voucher_typed_data(voucher.channel_id, voucher.cumulative_amount, chain_id, channels_address)
    signature = bytes(HexBytes(voucher.signature))
    if len(signature) != 65:
        raise InvalidVoucher(f"voucher signature is {len(signature)} bytes, expected 65")
    try:
        return Account.recover_message(encode_typed_data(full_message=typed), signature=signature)
    except Exception as error:  # eth-keys raises several types for bad r/s/v
        raise InvalidVoucher(f"voucher signature does not recover: {error}") from error


def _bytes32(value: str | bytes) -> bytes:
    raw = bytes(HexBytes(value))
    if len(raw) != 32:
        raise InvalidVoucher(f"channel id must be 32 bytes, got {len(raw)}")
    return raw


def _key(signer: LocalAccount | str):
    return signer.key if hasattr(signer, "key") else signer
