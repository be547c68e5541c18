"""Voucher recovery on the request path: the direct digest (`contracts.vouchers.VoucherDomain`), recovered
with libsecp256k1 through `attribution.receipts.recover_signer`, which also refuses malleable (high-s)
signatures the chain would refuse to redeem. The node and the client use this class; the digest and the
signature are `contracts.vouchers`' own. Request authorizations (below) are this module's own EIP-712 type.
"""

from __future__ import annotations

import dataclasses
import os

from hexbytes import HexBytes

from longtail.attribution.receipts import recover_signer
from longtail.contracts.vouchers import (
    EIP712_DOMAIN_FIELDS,
    InvalidVoucher,
    SignedVoucher,
    VoucherSigner,
    keccak,
    voucher_domain,
)
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


# --- request authorizations ----------------------------------------------------------------------------------
#
# A channel id is public (it is on chain), so the channel header alone proves nothing about who is asking. Every
# paid request carries the channel client's EIP-712 signature over what decides its price (model, prompt, max
# tokens), a fresh nonce and an expiry; the node serves it only if the channel's client signed it, once, before it
# expires (docs/security.md, attack 8). Same domain as vouchers (PaymentChannels), a different type: a signature of
# one can never pass for the other.

AUTH_NONCE_HEADER = "X-Longtail-Auth-Nonce"
AUTH_EXPIRES_HEADER = "X-Longtail-Auth-Expires"
AUTH_SIGNATURE_HEADER = "X-Longtail-Auth-Signature"
#: The longest an authorization may be valid for: the node remembers each nonce until its expiry.
MAX_AUTHORIZATION_SECONDS = 300

REQUEST_AUTHORIZATION_TYPE = ("RequestAuthorization(bytes32 channelId,bytes32 modelHash,bytes32 promptHash,"
                              "uint32 maxTokens,bytes32 nonce,uint64 expiresAt)")
REQUEST_AUTHORIZATION_TYPEHASH = keccak(REQUEST_AUTHORIZATION_TYPE.encode())
REQUEST_AUTHORIZATION_FIELDS = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "modelHash", "type": "bytes32"},
    {"name": "promptHash", "type": "bytes32"},
    {"name": "maxTokens", "type": "uint32"},
    {"name": "nonce", "type": "bytes32"},
    {"name": "expiresAt", "type": "uint64"},
]


@dataclasses.dataclass(frozen=True)
class RequestAuthorization:
    """The client's consent to one request on its channel. `model_hash` = keccak256(model id as sent, UTF-8);
    `prompt_hash` = the receipt's promptHash (keccak256 of the prompt, or of the chat messages as canonical JSON)."""

    channel_id: str
    model_hash: bytes
    prompt_hash: bytes
    max_tokens: int
    nonce: str
    expires_at: int
    signature: str

    def headers(self) -> dict[str, str]:
        return {AUTH_NONCE_HEADER: self.nonce, AUTH_EXPIRES_HEADER: str(self.expires_at),
                AUTH_SIGNATURE_HEADER: self.signature}


def request_authorization_digest(domain: _Domain, channel_id: str, model_hash: bytes, prompt_hash: bytes,
                                 max_tokens: int, nonce: str, expires_at: int) -> bytes:
    if not 0 <= max_tokens < 2**32 or not 0 <= expires_at < 2**64:
        raise InvalidVoucher("maxTokens or expiresAt out of range")
    struct = keccak(REQUEST_AUTHORIZATION_TYPEHASH + _b32(channel_id) + _b32(model_hash) + _b32(prompt_hash)
                    + max_tokens.to_bytes(32, "big") + _b32(nonce) + expires_at.to_bytes(32, "big"))
    return keccak(b"\x19\x01" + domain.separator + struct)


def request_authorization_typed_data(domain: _Domain, auth: RequestAuthorization) -> dict:
    """The EIP-712 document a wallet shows for an authorization (the tests hold it equal to the direct digest)."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, "RequestAuthorization": REQUEST_AUTHORIZATION_FIELDS},
        "primaryType": "RequestAuthorization",
        "domain": voucher_domain(domain.chain_id, domain.channels_address),
        "message": {"channelId": _b32(auth.channel_id), "modelHash": _b32(auth.model_hash),
                    "promptHash": _b32(auth.prompt_hash), "maxTokens": auth.max_tokens, "nonce": _b32(auth.nonce),
                    "expiresAt": auth.expires_at},
    }


def sign_request_authorization(signer: VoucherSigner, channel_id: str, model: str, prompt_hash: bytes,
                               max_tokens: int, expires_at: int, nonce: str | None = None) -> RequestAuthorization:
    """The channel client's authorization, signed with its voucher signer (same domain, key parsed once)."""
    nonce = nonce or "0x" + os.urandom(32).hex()
    model_hash = keccak(model.encode("utf-8"))
    digest = request_authorization_digest(signer.domain, channel_id, model_hash, prompt_hash, max_tokens, nonce,
                                          expires_at)
    signature = "0x" + signer.sign_digest(digest).hex()
    return RequestAuthorization(channel_id.lower(), model_hash, bytes(prompt_hash), max_tokens, nonce.lower(),
                                expires_at, signature)


def recover_authorization_signer(domain: _Domain, auth: RequestAuthorization) -> str:
    digest = request_authorization_digest(domain, auth.channel_id, auth.model_hash, auth.prompt_hash,
                                          auth.max_tokens, auth.nonce, auth.expires_at)
    try:
        raw = bytes.fromhex(auth.signature[2:])
    except ValueError as error:
        raise InvalidVoucher(f"authorization signature is not hex: {error}") from error
    return recover_signer(digest, raw)


def parse_authorization(headers, channel_id: str | None, model: str, prompt_hash: bytes,
                        max_tokens: int) -> RequestAuthorization | None:
    """The authorization a request's headers carry, bound to the request as the node parsed it (None if absent).

    Raises BadRequest for malformed headers; whether the signature is the channel client's is the intake's check.
    """
    from longtail.node.errors import BadRequest

    nonce, expires, signature = (headers.get(h) for h in (AUTH_NONCE_HEADER, AUTH_EXPIRES_HEADER,
                                                          AUTH_SIGNATURE_HEADER))
    if nonce is None and expires is None and signature is None:
        return None
    if channel_id is None or nonce is None or expires is None or signature is None:
        raise BadRequest(f"an authorization needs X-Longtail-Channel, {AUTH_NONCE_HEADER}, {AUTH_EXPIRES_HEADER} "
                         f"and {AUTH_SIGNATURE_HEADER}")
    if not (isinstance(nonce, str) and nonce.startswith("0x") and len(nonce) == 66 and _is_hex(nonce[2:])):
        raise BadRequest(f"{AUTH_NONCE_HEADER} must be a 0x-prefixed 32-byte hex value")
    if not (isinstance(expires, str) and expires.isascii() and expires.isdigit() and len(expires) <= 19):
        raise BadRequest(f"{AUTH_EXPIRES_HEADER} must be a unix time in seconds")
    if not (isinstance(signature, str) and signature.startswith("0x") and len(signature) == 132
            and _is_hex(signature[2:])):
        raise BadRequest(f"{AUTH_SIGNATURE_HEADER} must be a 65-byte 0x-hex signature")
    if not 0 <= max_tokens < 2**32:
        raise BadRequest("max_tokens is out of range")
    return RequestAuthorization(channel_id.lower(), keccak(model.encode("utf-8")), bytes(prompt_hash), max_tokens,
                                nonce.lower(), int(expires), signature.lower())


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text.isascii()


def _b32(value: str | bytes) -> bytes:
    raw = bytes(HexBytes(value))
    if len(raw) != 32:
        raise InvalidVoucher(f"expected 32 bytes, got {len(raw)}")
    return raw
