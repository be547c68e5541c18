"""Receipts: the EIP-712 record a node signs for every request, its verification and its JSON body.

The struct and domain are fixed by DESIGN.md. The digest is computed here with
plain ABI words and keccak (equal to eth-account's `encode_typed_data`, tested),
and signed with libsecp256k1 through coincurve, because eth-account's generic
typed-data path costs about a millisecond per receipt and a node signs thousands
per second.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import coincurve
from eth_abi import encode as abi_encode
from eth_utils import is_hex_address, to_checksum_address
from sha3 import keccak_256

from longtail.attribution.merkle import leaf_hash

DOMAIN_NAME = "Longtail"
DOMAIN_VERSION = "1"
TOTAL_BPS = 10_000
BODY_VERSION = 1
# secp256k1 group order; signatures with s above half of it are malleable and refused.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

# (solidity name, python field, solidity type), in the struct's order.
RECEIPT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("node", "node", "address"),
    ("seq", "seq", "uint64"),
    ("requestId", "request_id", "bytes32"),
    ("client", "client", "address"),
    ("channelId", "channel_id", "bytes32"),
    ("baseModelId", "base_model_id", "bytes32"),
    ("adapterId", "adapter_id", "bytes32"),
    ("promptHash", "prompt_hash", "bytes32"),
    ("outputHash", "output_hash", "bytes32"),
    ("promptTokens", "prompt_tokens", "uint32"),
    ("outputTokens", "output_tokens", "uint32"),
    ("price", "price", "uint256"),
    ("attributionHash", "attribution_hash", "bytes32"),
    ("timestamp", "timestamp", "uint64"),
)


def keccak(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's, not SHA3-256) in C: ~1 µs where eth-utils' pure dispatch costs ~20 µs on the CI CPU,
    and a paid request hashes a dozen times on each side."""
    return keccak_256(data).digest()


RECEIPT_TYPE = "Receipt(" + ",".join(f"{t} {n}" for n, _, t in RECEIPT_FIELDS) + ")"
RECEIPT_TYPEHASH = keccak(RECEIPT_TYPE.encode())
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
DOMAIN_TYPEHASH = keccak(DOMAIN_TYPE.encode())


class ReceiptError(ValueError):
    """Base class: a receipt or its body is not what a verifier can accept."""


class MalformedReceipt(ReceiptError):
    """A field has the wrong type, length or range."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"receipt field {field}={value!r:.100}: {why}")
        self.field, self.value, self.why = field, value, why


class InvalidSignature(ReceiptError):
    """The signature is malformed or does not recover to the receipt's `node`."""


class WrongSigner(ReceiptError):
    """The receipt is validly signed, but by a node other than the one expected."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"receipt signed by node {actual}, expected {expected}")
        self.expected, self.actual = expected, actual


class WrongDomain(ReceiptError):
    """The receipt was signed for another chain, contract, name or version."""

    def __init__(self, field: str, expected: object, actual: object) -> None:
        super().__init__(f"receipt domain {field} is {actual!r}, expected {expected!r}")
        self.field, self.expected, self.actual = field, expected, actual


class AttributionMismatch(ReceiptError):
    """The body's attribution vector does not hash to the signed attributionHash, or is invalid."""


class DigestMismatch(ReceiptError):
    """The digest stated in a body is not the digest of its receipt."""


# --- records ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReceiptDomain:
    """The EIP-712 domain receipts are signed under: the chain and its AttributionLedger."""

    chain_id: int
    verifying_contract: str
    name: str = DOMAIN_NAME
    version: str = DOMAIN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "verifying_contract",
                           _address("verifyingContract", self.verifying_contract, "not an address"))

    @property
    def separator(self) -> bytes:
        return _domain_separator(self.name, self.version, self.chain_id, self.verifying_contract)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "chainId": self.chain_id,
                "verifyingContract": self.verifying_contract}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReceiptDomain:
        return cls(chain_id=int(data["chainId"]), verifying_contract=str(data["verifyingContract"]),
                   name=str(data.get("name", DOMAIN_NAME)), version=str(data.get("version", DOMAIN_VERSION)))


@dataclasses.dataclass(frozen=True)
class Receipt:
    """DESIGN.md's Receipt struct: addresses checksummed, 32-byte values as 0x-hex, numbers as ints."""

    node: str
    seq: int
    request_id: str
    client: str
    channel_id: str
    base_model_id: str
    adapter_id: str
    prompt_hash: str
    output_hash: str
    prompt_tokens: int
    output_tokens: int
    price: int
    attribution_hash: str
    timestamp: int

    def __post_init__(self) -> None:
        for solidity_name, field, kind in RECEIPT_FIELDS:
            object.__setattr__(self, field, _normalize(solidity_name, getattr(self, field), kind))

    def to_json(self) -> dict[str, Any]:
        """camelCase keys as in the struct; price as a decimal string (uint256 exceeds JSON's safe ints)."""
        out: dict[str, Any] = {}
        for solidity_name, field, _ in RECEIPT_FIELDS:
            value = getattr(self, field)
            out[solidity_name] = str(value) if field == "price" else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Receipt:
        missing = [name for name, _, _ in RECEIPT_FIELDS if name not in data]
        if missing:
            raise MalformedReceipt(missing[0], None, "missing")
        extra = sorted(set(data) - {name for name, _, _ in RECEIPT_FIELDS})
        if extra:
            raise MalformedReceipt(extra[0], data[extra[0]], "not a Receipt field")
        return cls(**{field: data[name] for name, field, _ in RECEIPT_FIELDS})


@dataclasses.dataclass(frozen=True)
class AttributionVector:
    """Datanet weights in basis points: ids ascending, weights summing to 10000, or both empty."""

    datanet_ids: tuple[str, ...] = ()
    weights_bps: tuple[int, ...] = ()
    # How the weights were computed (docs/attribution.md, "Payment weight"): served in the body so an auditor can
    # recompute them; not part of attributionHash, whose encoding DESIGN.md fixes.
    evidence: dict[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datanet_ids", tuple(_hex32("datanetIds", d) for d in self.datanet_ids))
        object.__setattr__(self, "weights_bps", tuple(int(w) for w in self.weights_bps))
        validate_attribution(self.datanet_ids, self.weights_bps)
        if self.evidence is not None and not isinstance(self.evidence, dict):
            raise MalformedReceipt("attribution.evidence", self.evidence, "not an object")

    @functools.cached_property
    def hash(self) -> str:
        return attribution_hash(self.datanet_ids, self.weights_bps)

    @classmethod
    def from_weights(cls, weights: dict[str, int], evidence: dict[str, Any] | None = None) -> AttributionVector:
        """Build from {datanetId: bps}, sorting ids and dropping zero weights."""
        items = sorted((_hex32("datanetIds", k), int(v)) for k, v in weights.items() if int(v))
        return cls(tuple(k for k, _ in items), tuple(v for _, v in items), evidence)

    def to_json(self) -> dict[str, Any]:
        body = {"datanetIds": list(self.datanet_ids), "weightsBps": list(self.weights_bps)}
        if self.evidence is not None:
            body["evidence"] = self.evidence
        return body

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttributionVector:
        return cls(tuple(data.get("datanetIds", ())), tuple(data.get("weightsBps", ())), data.get("evidence"))


@dataclasses.dataclass(frozen=True)
class RecordCredit:
    """A record that contains a matched span, and who contributed it."""

    record_id: str
    contributor: str

    def to_json(self) -> dict[str, Any]:
        return {"recordId": self.record_id, "contributor": self.contributor}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordCredit:
        return cls(str(data["recordId"]), str(data["contributor"]))


@dataclasses.dataclass(frozen=True)
class MatchedSpan:
    """Output tokens [start, end) found verbatim in a Datanet, with how often and in which records."""

    start: int
    end: int
    datanet_id: str
    occurrences: int
    records: tuple[RecordCredit, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "datanetId": self.datanet_id,
                "occurrences": self.occurrences, "records": [r.to_json() for r in self.records]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MatchedSpan:
        return cls(int(data["start"]), int(data["end"]), str(data["datanetId"]), int(data["occurrences"]),
                   tuple(RecordCredit.from_json(r) for r in data.get("records", ())))


@dataclasses.dataclass(frozen=True)
class SignedReceipt:
    """A receipt, its 65-byte signature (r || s || v, v in {27, 28}) and the body served beside it."""

    receipt: Receipt
    signature: bytes
    domain: ReceiptDomain
    attribution: AttributionVector = dataclasses.field(default_factory=lambda: AttributionVector())
    spans: tuple[MatchedSpan, ...] = ()

    @functools.cached_property
    def digest(self) -> bytes:
        return receipt_digest(self.receipt, self.domain)

    @functools.cached_property
    def leaf_hash(self) -> bytes:
        """The receipt's leaf in the node's Merkle log (attribution/merkle.py)."""
        return leaf_hash(self.digest)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": BODY_VERSION,
            "domain": self.domain.to_json(),
            "receipt": self.receipt.to_json(),
            "digest": "0x" + self.digest.hex(),
            "signature": "0x" + self.signature.hex(),
            "attribution": self.attribution.to_json(),
            "spans": [s.to_json() for s in self.spans],
        }

    def to_canonical_json(self) -> bytes:
        """Sorted keys, no whitespace, UTF-8: the bytes stored and served."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes) -> SignedReceipt:
        """Parse a body; checks that a stated digest matches the receipt (the signature is checked by verify)."""
        if isinstance(data, str | bytes):
            data = json.loads(data)
        try:
            signature = _hex_bytes("signature", data["signature"])
            signed = cls(
                receipt=Receipt.from_json(data["receipt"]),
                signature=signature,
                domain=ReceiptDomain.from_json(data["domain"]),
                attribution=AttributionVector.from_json(data.get("attribution") or {}),
                spans=tuple(MatchedSpan.from_json(s) for s in data.get("spans") or ()),
            )
        except (KeyError, TypeError) as error:
            raise MalformedReceipt("body", str(error), "missing or mistyped member") from error
        stated = data.get("digest")
        if stated is not None and stated.lower() != "0x" + signed.digest.hex():
            raise DigestMismatch(f"body states digest {stated}, the receipt's digest is 0x{signed.digest.hex()}")
        return signed


@dataclasses.dataclass(frozen=True)
class ReceiptDraft:
    """Everything a receipt needs except what the log assigns: the node (its key) and `seq`."""

    request_id: str
    client: str
    channel_id: str
    base_model_id: str
    adapter_id: str
    prompt_hash: str
    output_hash: str
    prompt_tokens: int
    output_tokens: int
    price: int
    timestamp: int
    attribution: AttributionVector = dataclasses.field(default_factory=lambda: AttributionVector())
    spans: tuple[MatchedSpan, ...] = ()

    def to_receipt(self, node: str, seq: int) -> Receipt:
        return Receipt(node=node, seq=seq, request_id=self.request_id, client=self.client,
                       channel_id=self.channel_id, base_model_id=self.base_model_id, adapter_id=self.adapter_id,
                       prompt_hash=self.prompt_hash, output_hash=self.output_hash,
                       prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens, price=self.price,
                       attribution_hash=self.attribution.hash, timestamp=self.timestamp)


# --- hashing ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(abi_encode(
        ["bytes32", "bytes32", "bytes32", "uint256", "address"],
        [DOMAIN_TYPEHASH, keccak(name.encode()), keccak(version.encode()), chain_id, verifying_contract],
    ))


def _word(value: str | int, kind: str) -> bytes:
    # Every Receipt member is a static type, so its EIP-712 encoding is its 32-byte ABI word.
    if kind == "bytes32":
        return bytes.fromhex(value[2:])  # type: ignore[index]
    if kind == "address":
        return b"\x00" * 12 + bytes.fromhex(value[2:])  # type: ignore[index]
    return int(value).to_bytes(32, "big")


def receipt_struct_hash(receipt: Receipt) -> bytes:
    """hashStruct(Receipt) of EIP-712."""
    return keccak(RECEIPT_TYPEHASH + b"".join(_word(getattr(receipt, f), t) for _, f, t in RECEIPT_FIELDS))


def receipt_digest(receipt: Receipt, domain: ReceiptDomain) -> bytes:
    """keccak256(0x1901 || domainSeparator || hashStruct(receipt)): what is signed and what the log stores."""
    return keccak(b"\x19\x01" + domain.separator + receipt_struct_hash(receipt))


def typed_data(receipt: Receipt, domain: ReceiptDomain) -> dict[str, Any]:
    """The full EIP-712 message, for wallets and for eth-account's `encode_typed_data`."""
    message = {name: (int(getattr(receipt, f)) if t.startswith("uint") else getattr(receipt, f))
               for name, f, t in RECEIPT_FIELDS}
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "Receipt": [{"name": n, "type": t} for n, _, t in RECEIPT_FIELDS],
        },
        "primaryType": "Receipt",
        "domain": domain.to_json(),
        "message": message,
    }


def validate_attribution(datanet_ids: Sequence[str | bytes], weights_bps: Sequence[int]) -> None:
    """Raise AttributionMismatch unless ids are strictly ascending and weights are 1..10000 summing to 10000."""
    if len(datanet_ids) != len(weights_bps):
        raise AttributionMismatch(f"{len(datanet_ids)} datanet ids but {len(weights_bps)} weights")
    if not datanet_ids:
        return
    raw = [_id_bytes(d) for d in datanet_ids]
    for previous, current in zip(raw, raw[1:], strict=False):
        if previous >= current:
            raise AttributionMismatch(f"datanet ids must be strictly ascending: 0x{previous.hex()} before 0x{current.hex()}")
    for ident, weight in zip(raw, weights_bps, strict=True):
        if not 0 < weight <= TOTAL_BPS:
            raise AttributionMismatch(f"weight {weight} of datanet 0x{ident.hex()} is not in 1..{TOTAL_BPS}")
    if sum(weights_bps) != TOTAL_BPS:
        raise AttributionMismatch(f"weights sum to {sum(weights_bps)}, not {TOTAL_BPS}")


def attribution_hash(datanet_ids: Sequence[str | bytes], weights_bps: Sequence[int]) -> str:
    """keccak256(abi.encode(bytes32[] datanetIds, uint16[] weightsBps)) after validation, as 0x-hex."""
    validate_attribution(datanet_ids, weights_bps)
    return "0x" + keccak(_encode_attribution(datanet_ids, weights_bps)).hex()


def _encode_attribution(datanet_ids: Sequence[str | bytes], weights_bps: Sequence[int]) -> bytes:
    """abi.encode(bytes32[], uint16[]) for validated input, word by word (eth-abi's generic encoder costs ~0.1 ms
    a receipt; tests hold the two equal): two head offsets, then each array as its length and its words."""
    count = len(datanet_ids)
    words = [(64).to_bytes(32, "big"), (96 + 32 * count).to_bytes(32, "big"), count.to_bytes(32, "big")]
    words += [_id_bytes(d) for d in datanet_ids]
    words.append(count.to_bytes(32, "big"))
    words += [int(w).to_bytes(32, "big") for w in weights_bps]
    return b"".join(words)


# --- signing and verification -----------------------------------------------------------------------

def _private_key(private_key: bytes | str) -> coincurve.PrivateKey:
    raw = bytes.fromhex(private_key[2:] if private_key.startswith("0x") else private_key) \
        if isinstance(private_key, str) else bytes(private_key)
    return coincurve.PrivateKey(raw)


def address_of(private_key: bytes | str) -> str:
    """The checksummed Ethereum address of a private key."""
    public = _private_key(private_key).public_key.format(compressed=False)[1:]
    return to_checksum_address(keccak(public)[-20:])


class ReceiptSigner:
    """Signs receipts for one node key and domain; holds the parsed key so each signature is one libsecp256k1 call."""

    def __init__(self, private_key: bytes | str, domain: ReceiptDomain) -> None:
        self._key = _private_key(private_key)
        self.domain = domain
        self.address = to_checksum_address(keccak(self._key.public_key.format(compressed=False)[1:])[-20:])

    def sign_digest(self, digest: bytes) -> bytes:
        # libsecp256k1 signs RFC 6979 deterministic, low-s: the same bytes eth-account produces.
        recoverable = self._key.sign_recoverable(digest, hasher=None)
        return recoverable[:64] + bytes([recoverable[64] + 27])

    def sign(self, receipt: Receipt, attribution: AttributionVector | None = None,
             spans: Sequence[MatchedSpan] = ()) -> SignedReceipt:
        attribution = attribution if attribution is not None else AttributionVector()
        if receipt.node != self.address:
            raise WrongSigner(expected=receipt.node, actual=self.address)
        if attribution.hash != receipt.attribution_hash:
            raise AttributionMismatch(f"attribution vector hashes to {attribution.hash}, "
                                      f"receipt carries {receipt.attribution_hash}")
        digest = receipt_digest(receipt, self.domain)
        signed = SignedReceipt(receipt, self.sign_digest(digest), self.domain, attribution, tuple(spans))
        signed.__dict__["digest"] = digest  # the cached property's own slot: the digest is hashed once per receipt
        return signed


def sign_receipt(receipt: Receipt, private_key: bytes | str, domain: ReceiptDomain,
                 attribution: AttributionVector | None = None, spans: Sequence[MatchedSpan] = ()) -> SignedReceipt:
    """Sign one receipt (for many, keep a ReceiptSigner)."""
    return ReceiptSigner(private_key, domain).sign(receipt, attribution, spans)


def recover_signer(digest: bytes, signature: bytes) -> str:
    """The address whose key produced `signature` over `digest`; InvalidSignature if none can."""
    if len(signature) != 65:
        raise InvalidSignature(f"signature is {len(signature)} bytes, expected 65 (r || s || v)")
    v = signature[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature v is {v}, expected 27 or 28")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < s <= SECP256K1_N // 2:
        raise InvalidSignature("signature s is zero or in the upper half of the curve order (malleable)")
    try:
        public = coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v - 27]), digest, hasher=None)
    except Exception as error:  # coincurve raises plain Exception for unrecoverable signatures
        raise InvalidSignature(f"signature does not recover a public key: {error}") from error
    return _address_of(public.format(compressed=False)[1:])


@functools.lru_cache(maxsize=4096)
def _address_of(public_key: bytes) -> str:
    # A node's receipts and a client's vouchers recover the same few keys: two keccaks saved per signature.
    return to_checksum_address(keccak(public_key)[-20:])


def verify_receipt(signed: SignedReceipt, domain: ReceiptDomain, expected_signer: str | None = None) -> str:
    """Check domain, attribution vector and signature; returns the signer or raises the reason it fails.

    Order matters for the message: the domain and the attribution vector are
    compared first so that a wrong chain or an edited vector is named as such,
    not reported as a bare signature mismatch.
    """
    for field, expected, actual in (("chainId", domain.chain_id, signed.domain.chain_id),
                                    ("verifyingContract", domain.verifying_contract, signed.domain.verifying_contract),
                                    ("name", domain.name, signed.domain.name),
                                    ("version", domain.version, signed.domain.version)):
        if expected != actual:
            raise WrongDomain(field, expected, actual)
    if signed.attribution.hash != signed.receipt.attribution_hash:
        raise AttributionMismatch(f"body's attribution vector hashes to {signed.attribution.hash}, "
                                  f"the signed attributionHash is {signed.receipt.attribution_hash}")
    for span in signed.spans:
        if span.datanet_id not in signed.attribution.datanet_ids:
            raise AttributionMismatch(f"span [{span.start}, {span.end}) names datanet {span.datanet_id}, "
                                      "which has no weight in the attribution vector")
    # The domain equals the body's (checked above), so the body's digest is the one to recover from.
    recovered = recover_signer(signed.digest, signed.signature)
    if recovered != signed.receipt.node:
        raise InvalidSignature(f"signature recovers {recovered}, but the receipt names node {signed.receipt.node}: "
                               "a field was changed after signing, or another key signed it")
    if expected_signer is not None and _checksum(expected_signer) != recovered:
        raise WrongSigner(expected=_checksum(expected_signer), actual=recovered)
    return recovered


# --- field normalization ----------------------------------------------------------------------------

_UINT_BITS = {"uint32": 32, "uint64": 64, "uint256": 256}


def _normalize(field: str, value: object, kind: str) -> str | int:
    if kind == "address":
        return _address(field, value, "not a 20-byte 0x-hex address")
    if kind == "bytes32":
        return _hex32(field, value)
    if isinstance(value, bool):
        raise MalformedReceipt(field, value, f"{kind} must be an integer")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise MalformedReceipt(field, value, f"{kind} must be an integer")
    if not 0 <= value < 1 << _UINT_BITS[kind]:
        raise MalformedReceipt(field, value, f"out of range for {kind}")
    return value


@functools.lru_cache(maxsize=4096)
def _checksum(address: str) -> str:
    # Nodes and clients repeat across receipts; the keccak behind checksumming is the costly part.
    return to_checksum_address(address)


def _address(field: str, value: object, why: str) -> str:
    """`value` checksummed, or MalformedReceipt(field, value, why) when it is not a 0x-hex address."""
    checksummed = _checksum_if_address(value) if isinstance(value, str) else None
    if checksummed is None:
        raise MalformedReceipt(field, value, why)
    return checksummed


@functools.lru_cache(maxsize=4096)
def _checksum_if_address(value: str) -> str | None:
    """The checksummed form of a 0x-hex address, None for anything else; a repeated address costs one lookup."""
    return to_checksum_address(value) if is_hex_address(value) else None


def _hex32(field: str, value: object) -> str:
    if isinstance(value, bytes | bytearray) and len(value) == 32:
        return "0x" + bytes(value).hex()
    if isinstance(value, str) and len(value) == 66 and value[:2] in ("0x", "0X"):
        try:
            bytes.fromhex(value[2:])
        except ValueError:
            pass
        else:
            return value.lower()
    raise MalformedReceipt(field, value, "not 32 bytes as 0x-hex")


def _id_bytes(value: str | bytes) -> bytes:
    return bytes.fromhex(_hex32("datanetIds", value)[2:])


def _hex_bytes(field: str, value: object) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise MalformedReceipt(field, value, "not 0x-hex")
    try:
        return bytes.fromhex(value[2:])
    except ValueError as error:
        raise MalformedReceipt(field, value, "not 0x-hex") from error
