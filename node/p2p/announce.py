"""Signed announcements of what a node serves, and the directory of live ones a peer keeps.

An announcement is canonical JSON (sorted keys, compact, UTF-8) signed with eth-account's
`sign_message` (EIP-191) by the node's Ethereum key. The peer id is derived from the same secp256k1 key,
so a receiver checks three things: the signature recovers the announced address, that address is the
one the announced peer id's public key hashes to, and (over gossipsub) the peer id is the message's
libp2p-signed origin. A copy replayed or relayed under another identity fails one of them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address
from libp2p.peer.id import ID

from longtail.node.p2p.protocols import InvalidAnnouncement

_ADAPTER_ID = re.compile(r"^0x[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class Announcement:
    """What a node tells the network about itself; signed by its key, valid until `expires_at`."""

    address: str                          # checksummed chain address of the node
    peer_id: str                          # base58 libp2p peer id, derived from the same key
    p2p_addrs: tuple[str, ...]            # multiaddrs the node listens on, so peers that only heard of it can dial
    http_endpoint: str | None             # None when the node has no reachable HTTP port
    adapters_hot: tuple[str, ...]         # resident on the device: served without a load
    adapters_stored: tuple[str, ...]      # on the node's disk (a superset of hot, as announced)
    prices_per_1k_tokens: Mapping[str, int]  # adapter id -> OPEN base units per 1,000 tokens
    load: int                             # requests queued or running
    free_kv_blocks: int
    timestamp: float                      # unix seconds when signed
    ttl_seconds: float
    signature: str = ""

    @property
    def expires_at(self) -> float:
        return self.timestamp + self.ttl_seconds

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters_hot or adapter_id in self.adapters_stored

    def to_json(self) -> dict:
        body = dataclasses.asdict(self)
        body["p2p_addrs"] = list(self.p2p_addrs)
        body["adapters_hot"] = list(self.adapters_hot)
        body["adapters_stored"] = list(self.adapters_stored)
        # Prices are uint256 amounts: decimal strings keep them exact for any JSON reader.
        body["prices_per_1k_tokens"] = {k: str(v) for k, v in self.prices_per_1k_tokens.items()}
        return body

    def signing_payload(self) -> bytes:
        """The canonical JSON the signature covers: every field but the signature."""
        body = self.to_json()
        del body["signature"]
        return _canonical(body)

    def to_bytes(self) -> bytes:
        return _canonical(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> Announcement:
        """Parse wire bytes; malformed JSON or fields raise `InvalidAnnouncement` (the signature is not checked)."""
        try:
            raw = json.loads(data)
            announcement = cls(
                address=to_checksum_address(raw["address"]), peer_id=str(raw["peer_id"]),
                p2p_addrs=_strings(raw["p2p_addrs"]),
                http_endpoint=None if raw["http_endpoint"] is None else str(raw["http_endpoint"]),
                adapters_hot=_adapter_ids(raw["adapters_hot"]),
                adapters_stored=_adapter_ids(raw["adapters_stored"]),
                prices_per_1k_tokens={_adapter_id(k): int(v) for k, v in raw["prices_per_1k_tokens"].items()},
                load=int(raw["load"]), free_kv_blocks=int(raw["free_kv_blocks"]),
                timestamp=float(raw["timestamp"]), ttl_seconds=float(raw["ttl_seconds"]),
                signature=str(raw["signature"]))
        except InvalidAnnouncement:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InvalidAnnouncement(f"malformed announcement: {type(error).__name__}: {error}") from None
        if set(raw) != {f.name for f in dataclasses.fields(cls)}:
            raise InvalidAnnouncement(f"announcement fields {sorted(raw)} are not the expected ones")
        return announcement


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _adapter_id(value: str) -> str:
    if not isinstance(value, str) or not _ADAPTER_ID.match(value):
        raise InvalidAnnouncement(f"{value!r} is not an adapter id (0x + 64 lowercase hex digits)")
    return value


def _strings(values) -> tuple[str, ...]:
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise InvalidAnnouncement(f"{values!r} is not a list of strings")
    return tuple(values)


def _adapter_ids(values: Iterable[str]) -> tuple[str, ...]:
    if not isinstance(values, list | tuple):
        raise InvalidAnnouncement(f"adapter list is a {type(values).__name__}, not a list")
    return tuple(_adapter_id(v) for v in values)


def address_of_peer_id(peer_id: str) -> str:
    """The Ethereum address of the secp256k1 key a peer id embeds (`InvalidAnnouncement` if it embeds none)."""
    try:
        public_key = ID.from_base58(peer_id).extract_public_key()
        uncompressed = public_key.impl.format(compressed=False)
    except Exception as error:  # base58, multihash, or key decoding: all mean "not a secp256k1 peer id"
        raise InvalidAnnouncement(f"peer id {peer_id!r} does not embed a secp256k1 key: {error}") from None
    return to_checksum_address(keccak(uncompressed[1:])[-20:])


def make_announcement(private_key: bytes, peer_id: str, *, p2p_addrs: Iterable[str] = (),
                      http_endpoint: str | None = None,
                      adapters_hot: Iterable[str] = (), adapters_stored: Iterable[str] = (),
                      price_per_1k_tokens: int | Mapping[str, int] = 0, load: int = 0,
                      free_kv_blocks: int = 0, ttl_seconds: float = 30.0,
                      timestamp: float | None = None) -> Announcement:
    """Build and sign an announcement; one price applies to every adapter unless a mapping is given."""
    hot = tuple(dict.fromkeys(a.lower() for a in adapters_hot))
    stored = tuple(dict.fromkeys([*hot, *(a.lower() for a in adapters_stored)]))
    for adapter_id in stored:
        _adapter_id(adapter_id)
    if isinstance(price_per_1k_tokens, Mapping):
        prices = {k.lower(): int(v) for k, v in price_per_1k_tokens.items()}
    else:
        prices = dict.fromkeys(stored, int(price_per_1k_tokens))
    announcement = Announcement(
        address=Account.from_key(private_key).address, peer_id=peer_id, p2p_addrs=tuple(p2p_addrs),
        http_endpoint=http_endpoint,
        adapters_hot=hot, adapters_stored=stored, prices_per_1k_tokens=prices, load=int(load),
        free_kv_blocks=int(free_kv_blocks), timestamp=round(time.time() if timestamp is None else timestamp, 3),
        ttl_seconds=float(ttl_seconds))
    return sign_announcement(announcement, private_key)


def sign_announcement(announcement: Announcement, private_key: bytes) -> Announcement:
    signed = Account.sign_message(encode_defunct(announcement.signing_payload()), private_key)
    return dataclasses.replace(announcement, signature="0x" + bytes(signed.signature).hex())


def verify_announcement(announcement: Announcement, origin: str | None = None) -> None:
    """Raise `InvalidAnnouncement` unless signer, address, peer id (and gossip origin, if given) agree."""
    try:
        signer = Account.recover_message(encode_defunct(announcement.signing_payload()),
                                         signature=announcement.signature)
    except Exception as error:  # malformed signature bytes of any kind
        raise InvalidAnnouncement(f"announcement signature does not parse: {type(error).__name__}") from None
    if signer != announcement.address:
        raise InvalidAnnouncement(f"announcement for {announcement.address} is signed by {signer}")
    key_address = address_of_peer_id(announcement.peer_id)
    if key_address != signer:
        raise InvalidAnnouncement(f"peer id {announcement.peer_id} is the key of {key_address}, "
                                  f"not of the signer {signer}")
    if origin is not None and origin != announcement.peer_id:
        raise InvalidAnnouncement(f"announcement of {announcement.peer_id} was published by {origin}")


class PeerDirectory:
    """The newest live announcement of each peer; expired ones vanish. Thread-safe (trio writes, asyncio reads)."""

    def __init__(self, clock: Callable[[], float] = time.time, *, max_ttl_seconds: float = 3600.0,
                 max_clock_skew_seconds: float = 60.0) -> None:
        self._clock = clock
        self.max_ttl_seconds = max_ttl_seconds
        self.max_clock_skew_seconds = max_clock_skew_seconds
        self._lock = threading.Lock()
        self._peers: dict[str, Announcement] = {}

    def update(self, announcement: Announcement) -> bool:
        """Keep a verified announcement if it is newer than the one held; False if it was stale or ignored."""
        now = self._clock()
        if announcement.expires_at <= now or announcement.ttl_seconds > self.max_ttl_seconds:
            return False
        if announcement.timestamp > now + self.max_clock_skew_seconds:
            return False  # a clock far ahead would pin the entry past its real TTL
        with self._lock:
            current = self._peers.get(announcement.peer_id)
            if current is not None and current.timestamp >= announcement.timestamp:
                return False
            self._peers[announcement.peer_id] = announcement
            return True

    def remove(self, peer_id: str) -> None:
        with self._lock:
            self._peers.pop(peer_id, None)

    def get(self, peer_id: str) -> Announcement | None:
        return next((a for a in self.live() if a.peer_id == peer_id), None)

    def live(self) -> list[Announcement]:
        now = self._clock()
        with self._lock:
            for peer in [p for p, a in self._peers.items() if a.expires_at <= now]:
                del self._peers[peer]
            return list(self._peers.values())

    def find_peers(self, adapter_id: str) -> list[Announcement]:
        """Live peers holding the adapter: hot (on device) first, then lower load, then lower price."""
        adapter_id = adapter_id.lower()
        holders = [a for a in self.live() if a.holds(adapter_id)]
        return sorted(holders, key=lambda a: (adapter_id not in a.adapters_hot, a.load,
                                              a.prices_per_1k_tokens.get(adapter_id, 0), a.peer_id))
