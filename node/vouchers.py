"""Vouchers on the request path: the EIP-712 digest computed directly, signed and recovered with libsecp256k1.

Every paid request carries a voucher the client signs and the node recovers.
`contracts.vouchers` goes through eth-account's generic typed-data encoder
(about 0.4 ms a voucher, several times that on a node whose cores the engine
keeps busy). The struct is two static words, so its digest is one keccak once
the domain separator is cached: the same bytes (tested against
`contracts.vouchers`), the same RFC 6979 low-s signatures.
"""

from __future__ import annotations

import dataclasses
import functools

import coincurve
from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address

from attribution.receipts import recover_signer
from contracts.vouchers import DOMAIN_NAME, DOMAIN_VERSION, InvalidVoucher, SignedVoucher

DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
VOUCHER_TYPEHASH = keccak(text="Voucher(bytes32 channelId,uint256 cumulativeAmount)")


@dataclasses.dataclass(frozen=True)
class VoucherDomain:
    """Vouchers of one PaymentChannels deployment: digest, sign, recover."""

    chain_id: int
    channels_address: str

    @functools.cached_property
    def separator(self) -> bytes:
        return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "uint256", "address"],
                                 [DOMAIN_TYPEHASH, keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION),
                                  int(self.chain_id), to_checksum_address(self.channels_address)]))

    def digest(self, channel_id: str, cumulative_amount: int) -> bytes:
        """keccak256(0x1901 || domainSeparator || hashStruct(voucher)); equals PaymentChannels.voucherDigest."""
        if not 0 <= cumulative_amount < 2**256:
            raise InvalidVoucher(f"cumulative amount {cumulative_amount} is not a uint256")
        channel = bytes.fromhex(channel_id[2:] if channel_id[:2] in ("0x", "0X") else channel_id)
        if len(channel) != 32:
            raise InvalidVoucher(f"channel id must be 32 bytes, got {len(channel)}")
        struct = keccak(VOUCHER_TYPEHASH + channel + cumulative_amount.to_bytes(32, "big"))
        return keccak(b"\x19\x01" + self.separator + struct)

    def sign(self, private_key: bytes, channel_id: str, cumulative_amount: int) -> SignedVoucher:
        """The client's signature (r || s || v, v in {27, 28}), byte for byte what eth-account produces."""
        recoverable = coincurve.PrivateKey(bytes(private_key)).sign_recoverable(
            self.digest(channel_id, cumulative_amount), hasher=None)
        signature = recoverable[:64] + bytes([recoverable[64] + 27])
        return SignedVoucher(channel_id=channel_id.lower(), cumulative_amount=int(cumulative_amount),
                             signature="0x" + signature.hex())

    def recover(self, voucher: SignedVoucher) -> str:
        """The checksummed address that signed `voucher`; raises for a malformed or malleable (high-s) signature,
        which the chain would refuse to redeem anyway."""
        signature = voucher.signature
        try:
            raw = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
        except ValueError as error:
            raise InvalidVoucher(f"voucher signature is not hex: {error}") from error
        return recover_signer(self.digest(voucher.channel_id, voucher.cumulative_amount), raw)
