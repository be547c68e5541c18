"""Three libp2p hosts on loopback: identity, signed announcements, adapter bytes, inference, expiry."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from eth_utils import keccak

from contracts.anvil import DEV_ACCOUNTS
from node.p2p import P2PError, P2PNode
from node.p2p.host import Announcement, sign_announcement, verify_announcement

KEYS = [bytes(DEV_ACCOUNTS[i].key) for i in (1, 2, 3)]
ADAPTER = "0x" + "ab" * 32


async def start_three(ttl=30.0):
    loop = asyncio.get_running_loop()
    nodes = [P2PNode(key, ttl_seconds=ttl, timeout=10) for key in KEYS]
    for node in nodes:
        await asyncio.to_thread(node.start, loop)
    for node in nodes[1:]:
        await nodes[0].connect(node.addrs[0])
    await nodes[1].connect(nodes[2].addrs[0])
    return nodes


async def stop_all(nodes):
    for node in nodes:
        await asyncio.to_thread(node.stop)


def fields(hot=(), stored=(), load=0):
    return {"http_endpoint": None, "adapters_hot": tuple(hot), "adapters_stored": tuple(stored),
            "price_per_1k_tokens": 10, "load": load, "free_kv_blocks": 100}


def test_peer_id_and_chain_address_come_from_one_key():
    node = P2PNode(KEYS[0])
    assert node.address == DEV_ACCOUNTS[1].address
    public = bytes.fromhex(node.public_key[2:])
    assert "0x" + keccak(public[1:])[-20:].hex() == node.address.lower()
    assert node.peer_id.to_base58().startswith("16Uiu2")


def test_a_forged_announcement_is_rejected():
    honest = P2PNode(KEYS[0])
    other = P2PNode(KEYS[1])
    announcement = sign_announcement(Announcement(address=honest.address, peer_id=honest.peer_id.to_base58(),
                                                  public_key=honest.public_key, timestamp=1.0, ttl_seconds=30,
                                                  **fields()), KEYS[0])
    verify_announcement(announcement)
    with pytest.raises(P2PError):
        verify_announcement(dataclasses.replace(announcement, load=0, adapters_hot=(ADAPTER,)))
    with pytest.raises(P2PError):
        verify_announcement(sign_announcement(announcement, KEYS[1]))  # another key signs for this address
    with pytest.raises(P2PError):
        verify_announcement(announcement, sender=other.peer_id)  # relayed by someone else


def test_announcements_discovery_adapter_fetch_and_inference():
    async def scenario():
        nodes = await start_three(ttl=30.0)
        try:
            bundle = b"LTAB" + b"\x01" * 1000
            nodes[2].bundle_provider = lambda adapter_id: bundle if adapter_id == ADAPTER else None

            async def answer(request):
                return {"status": 200, "body": {"echo": request["body"]["prompt"], "served_by": nodes[1].address}}
            nodes[1].infer_handler = answer
            await nodes[1].announce(**fields(stored=(ADAPTER,), load=0))
            await nodes[2].announce(**fields(hot=(ADAPTER,), load=5))
            for _ in range(50):
                if len(nodes[0].directory.live()) == 2:
                    break
                await asyncio.sleep(0.1)
            found = nodes[0].directory.find_peers(ADAPTER)
            assert [a.address for a in found] == [nodes[2].address, nodes[1].address], "hot holder first"
            fetched = await nodes[0].fetch_adapter(found[0].peer_id, ADAPTER)
            assert fetched == bundle
            with pytest.raises(P2PError, match="refused"):
                await nodes[0].fetch_adapter(found[0].peer_id, "0x" + "cd" * 32)
            reply = await nodes[0].infer(nodes[1].peer_id.to_base58(), {"body": {"prompt": "hi"}})
            assert reply == {"status": 200, "body": {"echo": "hi", "served_by": nodes[1].address}}
        finally:
            await stop_all(nodes)
    asyncio.run(scenario())


def test_a_vanished_peer_leaves_the_directory_after_its_ttl():
    async def scenario():
        nodes = await start_three(ttl=1.0)
        try:
            await nodes[1].announce(**fields(hot=(ADAPTER,)))
            for _ in range(30):
                if nodes[0].directory.live():
                    break
                await asyncio.sleep(0.05)
            assert nodes[0].directory.find_peers(ADAPTER)
            await asyncio.to_thread(nodes[1].stop)
            await asyncio.sleep(1.2)
            assert nodes[0].directory.find_peers(ADAPTER) == []
            with pytest.raises(P2PError):
                await nodes[0].infer(nodes[1].peer_id.to_base58(), {"body": {}})
        finally:
            await stop_all(nodes)
    asyncio.run(scenario())
