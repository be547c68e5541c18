"""Signed announcements and the peer directory, without a network: what a peer accepts and how it ranks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from eth_account import Account
from eth_utils import keccak
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID

from longtail.node.p2p.announce import (
    Announcement,
    PeerDirectory,
    address_of_peer_id,
    make_announcement,
    sign_announcement,
    verify_announcement,
)
from longtail.node.p2p.protocols import InvalidAnnouncement

KEYS = [keccak(f"longtail p2p announce test {i}".encode()) for i in range(3)]
HOT = "0x" + "ab" * 32
COLD = "0x" + "cd" * 32


def peer_id_of(key: bytes) -> str:
    return ID.from_pubkey(create_new_key_pair(key).public_key).to_base58()


def announcement(key: bytes, *, timestamp: float = 1000.0, ttl: float = 30.0, **fields) -> Announcement:
    return make_announcement(key, peer_id_of(key), ttl_seconds=ttl, timestamp=timestamp, **fields)


def test_a_peer_id_names_the_same_account_as_the_key():
    for key in KEYS:
        account = Account.from_key(key)
        assert address_of_peer_id(peer_id_of(key)) == account.address
        # the libp2p key inside the peer id is the account's public key, not just something hashing alike
        embedded = ID.from_base58(peer_id_of(key)).extract_public_key().impl.format(compressed=False)
        assert embedded[1:] == account._key_obj.public_key.to_bytes()


def test_a_signed_announcement_round_trips_and_verifies():
    signed = announcement(KEYS[0], http_endpoint="http://127.0.0.1:8080", adapters_hot=[HOT],
                          adapters_stored=[COLD], price_per_1k_tokens={HOT: 2**200, COLD: 7}, load=3,
                          free_kv_blocks=12, p2p_addrs=["/ip4/127.0.0.1/tcp/4001"])
    assert signed.adapters_stored == (HOT, COLD), "hot adapters are also stored"
    again = Announcement.from_bytes(signed.to_bytes())
    assert again == signed
    assert again.prices_per_1k_tokens[HOT] == 2**200, "uint256 prices survive JSON exactly"
    verify_announcement(again, origin=signed.peer_id)


def test_one_price_applies_to_every_adapter():
    signed = announcement(KEYS[0], adapters_hot=[HOT], adapters_stored=[COLD], price_per_1k_tokens=9)
    assert signed.prices_per_1k_tokens == {HOT: 9, COLD: 9}


@pytest.mark.parametrize("forge, reason", [
    (lambda a: dataclasses.replace(a, load=0, adapters_hot=(COLD,)), "signed by"),  # edited after signing
    (lambda a: sign_announcement(a, KEYS[1]), "signed by"),  # another key signs for this address
    (lambda a: sign_announcement(dataclasses.replace(a, address=Account.from_key(KEYS[1]).address), KEYS[1]),
     "is the key of"),  # a valid signature by someone whose key is not the peer id's
    (lambda a: dataclasses.replace(a, signature="0x1234"), "does not parse"),
])
def test_forged_announcements_fail_verification(forge, reason):
    honest = announcement(KEYS[0], adapters_hot=[HOT], load=9)
    with pytest.raises(InvalidAnnouncement, match=reason):
        verify_announcement(forge(honest))


def test_an_announcement_published_by_another_peer_is_refused():
    honest = announcement(KEYS[0], adapters_hot=[HOT])
    with pytest.raises(InvalidAnnouncement, match="was published by"):
        verify_announcement(honest, origin=peer_id_of(KEYS[1]))


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"address": "0x12"}'])
def test_malformed_bytes_are_invalid_announcements(data):
    with pytest.raises(InvalidAnnouncement):
        Announcement.from_bytes(data)


def test_an_unknown_field_or_a_bad_adapter_id_is_refused():
    body = announcement(KEYS[0]).to_json()
    with pytest.raises(InvalidAnnouncement, match="fields"):
        Announcement.from_bytes(json.dumps({**body, "extra": 1}).encode())
    with pytest.raises(InvalidAnnouncement, match="not an adapter id"):
        Announcement.from_bytes(json.dumps({**body, "adapters_hot": ["legal-r8"]}).encode())


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_directory_keeps_the_newest_live_announcement_and_forgets_expired_ones():
    clock = Clock(1000.0)
    directory = PeerDirectory(clock)
    first = announcement(KEYS[0], timestamp=1000.0, ttl=10, adapters_hot=[HOT])
    newer = announcement(KEYS[0], timestamp=1005.0, ttl=10, adapters_stored=[HOT])
    assert directory.update(first)
    assert directory.update(newer)
    assert not directory.update(first), "an older announcement never replaces a newer one"
    assert directory.get(first.peer_id) == newer
    clock.now = 1014.9
    assert directory.find_peers(HOT) == [newer]
    clock.now = 1015.0
    assert directory.live() == [] and directory.find_peers(HOT) == []
    assert not directory.update(newer), "an expired announcement is not taken back"


def test_the_directory_refuses_clocks_far_ahead_and_endless_ttls():
    directory = PeerDirectory(Clock(1000.0), max_ttl_seconds=600, max_clock_skew_seconds=60)
    assert not directory.update(announcement(KEYS[0], timestamp=1100.0))
    assert not directory.update(announcement(KEYS[0], timestamp=1000.0, ttl=10**6))
    assert directory.update(announcement(KEYS[0], timestamp=1030.0))


def test_find_peers_ranks_hot_holders_first_then_load_then_price():
    directory = PeerDirectory(Clock(1000.0))
    cold_idle = announcement(KEYS[0], adapters_stored=[HOT], load=0, price_per_1k_tokens=1)
    hot_busy = announcement(KEYS[1], adapters_hot=[HOT], load=7, price_per_1k_tokens=50)
    hot_busy_dear = announcement(KEYS[2], adapters_hot=[HOT, COLD], load=7, price_per_1k_tokens=80)
    for a in (cold_idle, hot_busy, hot_busy_dear):
        directory.update(a)
    assert directory.find_peers(HOT) == [hot_busy, hot_busy_dear, cold_idle]
    assert directory.find_peers(COLD.upper().replace("0X", "0x")) == [hot_busy_dear], "ids match case-blind"
    assert directory.find_peers("0x" + "ee" * 32) == []
