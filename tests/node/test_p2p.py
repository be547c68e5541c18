"""Three libp2p hosts on loopback with keys from eth-account: gossip announcements, Kademlia providers,
adapter bytes verified by id, inference through the remote's asyncio loop, expiry, and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from eth_account import Account
from eth_utils import keccak

from longtail.node.p2p import (
    AdapterNotFound,
    AdapterRejected,
    AdapterTooLarge,
    P2PError,
    P2PNode,
    P2PStopped,
    P2PTimeout,
    PeerUnreachable,
    RemoteError,
    make_announcement,
)
from longtail.serving.adapter_store import BUNDLE_MAGIC, split_bundle
from longtail.serving.adapter_store import AdapterRejected as BundleRejected
from longtail.serving.peft_format import adapter_id_from_parts, adapter_id_of, canonical_config_bytes

ACCOUNTS = [Account.from_key(keccak(f"longtail p2p network test {i}".encode())) for i in range(4)]
KEYS = [bytes(a.key) for a in ACCOUNTS]
SHIPPED_ADAPTER = Path(__file__).resolve().parents[2] / "data" / "adapters" / "reviews-r4"
OTHER = "0x" + "cd" * 32


def shipped_bundle() -> tuple[str, bytes]:
    """(adapterId, bundle) of a shipped adapter in the store's transfer format."""
    config = canonical_config_bytes(json.loads((SHIPPED_ADAPTER / "adapter_config.json").read_text()))
    weights = (SHIPPED_ADAPTER / "adapter_model.safetensors").read_bytes()
    return adapter_id_of(SHIPPED_ADAPTER), struct.pack("<8sI", BUNDLE_MAGIC, len(config)) + config + weights


def bundle_matches_id(adapter_id: str, data: bytes) -> bool:
    """The verifier a node passes in: the bytes must hash to the id they were asked for."""
    try:
        config, weights = split_bundle(data)
    except BundleRejected:
        return False
    return adapter_id_from_parts(json.loads(config), weights) == adapter_id


def p2p_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("longtail-p2p")]


@contextlib.asynccontextmanager
async def line_of_three(ttl: float = 30.0, node_class=P2PNode):
    """A - B - C on loopback: A dials B, B dials C; A and C are not connected to each other."""
    loop = asyncio.get_running_loop()
    nodes = [node_class(key, ttl_seconds=ttl, timeout=10) for key in KEYS[:3]]
    try:
        for node in nodes:
            await asyncio.to_thread(node.start, loop)
        await nodes[0].connect(nodes[1].listen_addrs()[0])
        await nodes[1].connect(nodes[2].listen_addrs()[0])
        yield nodes
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)


async def announce_until_seen(speaker: P2PNode, listener: P2PNode, seconds: float = 10.0, **fields) -> None:
    """Gossip needs a heartbeat or two after a connection; re-announce (as nodes do every TTL/3) until heard."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent = await speaker.announce(**fields)
        for _ in range(5):
            heard = listener.directory.get(speaker.peer_id.to_base58())
            if heard is not None and heard.timestamp >= sent.timestamp:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{listener!r} never heard {speaker!r}")


def test_peer_id_and_chain_address_come_from_one_key():
    node = P2PNode(KEYS[0])
    assert node.address == ACCOUNTS[0].address
    embedded = node.peer_id.extract_public_key().impl.format(compressed=False)
    assert embedded[1:] == ACCOUNTS[0]._key_obj.public_key.to_bytes()
    assert "0x" + keccak(embedded[1:])[-20:].hex() == ACCOUNTS[0].address.lower()


def test_announcements_cross_the_gossip_mesh_and_find_peers_prefers_the_hot_holder():
    adapter_id, _ = shipped_bundle()

    async def scenario():
        async with line_of_three() as (a, b, c):
            await announce_until_seen(b, a, adapters_stored=[adapter_id, OTHER], price_per_1k_tokens=10, load=0,
                                      http_endpoint="http://127.0.0.1:1")
            # C's announcement reaches A only through B's relay: A never dialled C.
            await announce_until_seen(c, a, adapters_hot=[adapter_id], adapters_stored=[OTHER],
                                      price_per_1k_tokens={adapter_id: 30, OTHER: 5}, load=4, free_kv_blocks=64)
            ranked = a.find_peers(adapter_id)
            assert [p.address for p in ranked] == [c.address, b.address], "hot holder first despite its load"
            assert [p.address for p in a.find_peers(OTHER)] == [b.address, c.address], "then lower load"
            heard_c = a.directory.get(c.peer_id.to_base58())
            assert heard_c.prices_per_1k_tokens == {adapter_id: 30, OTHER: 5}
            assert heard_c.free_kv_blocks == 64 and heard_c.http_endpoint is None
            assert heard_c.p2p_addrs == tuple(c.listen_addrs())
            assert a.directory.get(a.peer_id.to_base58()) is None, "a node does not list itself"
            assert a.announcements_rejected == 0

    asyncio.run(scenario())


class Forger(P2PNode):
    """A peer whose own validator lets anything out, so its forgeries reach the honest peers' checks."""

    def _validate_gossip(self, forwarder, message) -> bool:
        return True


def test_forged_announcements_are_dropped_by_every_honest_peer():
    async def scenario():
        async with line_of_three() as (a, b, c):
            forger = Forger(KEYS[3], ttl_seconds=30, timeout=10)
            await asyncio.to_thread(forger.start, asyncio.get_running_loop())
            try:
                await forger.connect(a.listen_addrs()[0])
                await forger.connect(b.listen_addrs()[0])
                await announce_until_seen(forger, a, adapters_stored=[OTHER], load=50)
                me = forger.peer_id.to_base58()
                genuine = make_announcement(KEYS[3], me, adapters_stored=[OTHER], load=50)
                edited = dataclasses.replace(genuine, load=0, adapters_hot=(OTHER,))  # signature now wrong
                by_another_key = make_announcement(KEYS[0], me, adapters_hot=[OTHER])
                # C's real key signed this, but C never published it: the forger replays it as C.
                replayed = make_announcement(KEYS[2], c.peer_id.to_base58(), adapters_hot=[OTHER])
                expired = make_announcement(KEYS[3], me, adapters_hot=[OTHER], timestamp=time.time() - 100)
                for forgery in (edited, by_another_key, replayed, expired):
                    await forger.publish_announcement(forgery)
                for _ in range(100):
                    if a.announcements_rejected >= 4 and b.announcements_rejected >= 4:
                        break
                    await asyncio.sleep(0.05)
                assert b.announcements_rejected == 4, b.last_rejection
                assert a.announcements_rejected == 4, "each honest peer checks for itself, once per message"
                heard = a.directory.get(me)
                assert heard.load == 50 and heard.adapters_hot == (), "only the genuine announcement counts"
                assert a.directory.get(c.peer_id.to_base58()) is None
                assert [p.peer_id for p in a.find_peers(OTHER)] == [me]
            finally:
                await asyncio.to_thread(forger.stop)

    asyncio.run(scenario())


def test_an_adapter_is_found_through_kademlia_fetched_and_verified_by_id():
    adapter_id, bundle = shipped_bundle()
    corrupted = bundle[:-10] + bytes(10)

    async def scenario():
        async with line_of_three() as (a, b, c):
            c.bundle_provider = lambda wanted: bundle if wanted == adapter_id else None
            b.bundle_provider = lambda wanted: corrupted if wanted == adapter_id else None
            await c.announce(adapters_stored=[adapter_id])  # provides the adapter in the DHT
            providers = []
            for _ in range(50):
                providers = await a.find_providers(adapter_id)
                if c.peer_id.to_base58() in [p.peer_id for p in providers]:
                    break
                await asyncio.sleep(0.1)
            assert c.peer_id.to_base58() in [p.peer_id for p in providers]
            fetched = await a.fetch_adapter(c.peer_id.to_base58(), adapter_id, bundle_matches_id)
            assert fetched == bundle and len(fetched) > 1_000_000
            with pytest.raises(AdapterRejected, match=f"{len(corrupted)} bytes for adapter {adapter_id}"):
                await a.fetch_adapter(b.peer_id.to_base58(), adapter_id, bundle_matches_id)
            with pytest.raises(AdapterNotFound, match=f"adapter {OTHER} is not served here"):
                await a.fetch_adapter(c.peer_id.to_base58(), OTHER, bundle_matches_id)
            with pytest.raises(AdapterTooLarge, match="over the 1000-byte limit"):
                await a.fetch_adapter(c.peer_id.to_base58(), adapter_id, max_bytes=1000)
            with pytest.raises(AdapterNotFound):
                await c.fetch_adapter(a.peer_id.to_base58(), adapter_id)  # A serves no adapters at all

    asyncio.run(scenario())


def test_an_inference_request_runs_on_the_remote_nodes_own_asyncio_loop():
    """C's node runs its asyncio loop on another thread, as a separate process would; A's request is
    answered by C's handler on that loop, and C's errors come back as errors."""
    remote_loop = asyncio.new_event_loop()
    remote_thread = threading.Thread(target=remote_loop.run_forever, name="remote-node-loop", daemon=True)
    remote_thread.start()
    seen = []

    async def handle(request: dict) -> dict:
        seen.append((asyncio.get_running_loop() is remote_loop, threading.current_thread().name))
        if request["body"].get("prompt") == "fail":
            raise ValueError("the engine is out of blocks")
        await asyncio.sleep(float(request["body"].get("think", 0)))
        return {"status": 200, "body": {"choices": [{"text": request["body"]["prompt"][::-1]}],
                                        "paid_with": request["headers"]["X-Longtail-Channel"]}}

    async def scenario():
        loop = asyncio.get_running_loop()
        a, c = (P2PNode(key, timeout=10, handler_timeout=1.0) for key in (KEYS[0], KEYS[2]))
        await asyncio.to_thread(a.start, loop)
        await asyncio.to_thread(c.start, remote_loop)
        try:
            c.infer_handler = handle
            await a.connect(c.listen_addrs()[0])
            peer = c.peer_id.to_base58()
            reply = await a.infer(peer, {"path": "/v1/completions", "headers": {"X-Longtail-Channel": "0x" + "11" * 32},
                                         "body": {"model": OTHER, "prompt": "hello"}})
            assert reply == {"status": 200, "body": {"choices": [{"text": "olleh"}], "paid_with": "0x" + "11" * 32}}
            with pytest.raises(RemoteError, match="ValueError: the engine is out of blocks"):
                await a.infer(peer, {"headers": {}, "body": {"prompt": "fail"}})
            with pytest.raises(RemoteError, match="took longer than 1 s"):  # C's handler deadline
                await a.infer(peer, {"headers": {}, "body": {"prompt": "x", "think": 5}})
            with pytest.raises(P2PTimeout):  # A's own deadline, shorter than C's handler
                await a.infer(peer, {"headers": {}, "body": {"prompt": "x", "think": 0.8}}, timeout=0.3)
            with pytest.raises(RemoteError, match="UNAVAILABLE"):
                await c.infer(a.peer_id.to_base58(), {"body": {}})  # A registered no handler
        finally:
            await asyncio.to_thread(a.stop)
            await asyncio.to_thread(c.stop)

    try:
        asyncio.run(scenario())
    finally:
        remote_loop.call_soon_threadsafe(remote_loop.stop)
        remote_thread.join(5)
        remote_loop.close()
    assert seen and all(on_remote and name == "remote-node-loop" for on_remote, name in seen)


def test_a_stopped_peer_leaves_every_directory_after_its_ttl_and_shutdown_is_clean():
    threads_before = {t.ident for t in threading.enumerate()}

    async def scenario():
        async with line_of_three(ttl=1.5) as (a, b, c):
            await announce_until_seen(c, a, adapters_hot=[OTHER])
            await announce_until_seen(b, a, adapters_stored=[OTHER])
            started = time.monotonic()
            await asyncio.to_thread(c.stop)
            assert time.monotonic() - started < 2.0
            assert c.thread is None and not c.running
            with pytest.raises(P2PStopped):
                await c.announce(adapters_hot=[OTHER])
            assert [p.address for p in a.find_peers(OTHER)] == [c.address, b.address], "until its TTL passes"
            heard_c = a.directory.get(c.peer_id.to_base58())
            stop_seen_at = time.time()
            while a.directory.get(c.peer_id.to_base58()) is not None:
                await b.announce(adapters_stored=[OTHER])  # B stays alive, as nodes re-announce every TTL/3
                await asyncio.sleep(0.25)
                assert time.time() < heard_c.expires_at + 2.0
            assert time.time() >= heard_c.expires_at and time.time() - stop_seen_at < 3.0
            assert [p.address for p in a.find_peers(OTHER)] == [b.address]
            with pytest.raises((PeerUnreachable, P2PError)):
                await a.infer(c.peer_id.to_base58(), {"body": {}})

    asyncio.run(scenario())
    assert p2p_threads() == []
    leftover = [t.name for t in threading.enumerate() if t.ident not in threads_before
                and not t.name.startswith(("Trio thread", "asyncio_"))]  # idle pool workers of trio and asyncio
    assert leftover == [], "every thread the hosts started has ended"


def test_the_seen_message_sweeper_stops_when_the_close_is_cancelled():
    """A service that fails while the host unwinds cancels the host's scope during the close: pubsub's
    seen-message sweeper thread is stopped all the same (that shutdown once left it running)."""
    import trio
    from libp2p.tools.timed_cache.last_seen_cache import LastSeenCache

    class HangingNetwork:
        async def close(self) -> None:
            await trio.sleep_forever()

    host = SimpleNamespace(get_network=HangingNetwork)
    pubsub = SimpleNamespace(seen_messages=LastSeenCache(ttl=120))

    async def unwind() -> None:
        with trio.move_on_after(0.1):  # cancelled from outside, before the close's own 2 s deadline
            await P2PNode._close_connections(host, pubsub)

    trio.run(unwind)
    assert not pubsub.seen_messages._thread.is_alive()
