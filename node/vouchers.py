"""Voucher recovery on the request path: the direct digest (`contracts.vouchers.VoucherDomain`), recovered
with libsecp256k1 through `attribution.receipts.recover_signer`, which also refuses malleable (high-s)
signatures the chain would refuse to redeem. The node and the client use this class; the digest and the
signature are `contracts.vouchers`' own.
"""

from __future__ import annotations

from longtail.attribution.receipts import recover_signer
from longtail.contracts.vouchers import InvalidVoucher, SignedVoucher
from longtail.contracts.vouchers import VoucherDomain as _Domain


class VoucherDomain(_Domain):
    """`contracts.vouchers.VoucherDomain` plus the node's recovery."""

    def recover(self, voucher: SignedVoucher) -> str:
        """The checksummed address that signed `voucher`; raises for a malformed or malleable signature."""
        signature = voucher.signature
        try:
            raw = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
        except ValueError as error:
            raise InvalidVoucher(f"voucher signature is not hex: {error}") from error
        return recover_signer(self.digest(voucher.channel_id, voucher.cumulative_amount), raw)
