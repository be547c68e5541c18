"""`P2PNode`: one node's py-libp2p host (gossipsub announcements, Kademlia provider records, and the
adapter and inference stream protocols), run on its own trio thread and used from asyncio.

Every public coroutine is an asyncio coroutine; it crosses into trio through `TrioThread.call` and
raises a `P2PError` subclass on failure. Protocol handlers run on trio and reach the node's asyncio
code through `TrioThread.to_asyncio` (see `node/p2p/bridge.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

import trio
from eth_account import Account
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from longtail.node.p2p.announce import Announcement, PeerDirectory, make_announcement, verify_announcement
from longtail.node.p2p.bridge import TrioThread
from longtail.node.p2p.protocols import (
    ADAPTER_PROTOCOL,
    ANNOUNCE_TOPIC,
    DEFAULT_MAX_BUNDLE_BYTES,
    INFER_PROTOCOL,
    MAX_ANNOUNCEMENT_BYTES,
    MAX_INFER_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    AdapterNotFound,
    AdapterRejected,
    AdapterTooLarge,
    FrameTooLarge,
    InvalidAnnouncement,
    P2PError,
    P2PStopped,
    PeerUnreachable,
    Status,
    parse_reply,
    read_frame,
    write_error,
    write_frame,
    write_reply,
)

log = logging.getLogger(__name__)


class _QuietClosedDhtStreams(logging.Filter):
    """py-libp2p 0.8.1 warns "Failed to read DHT message from stream: " (with an empty reason) each time
    a peer closes a Kademlia stream after a fire-and-forget ADD_PROVIDER; that is normal, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Failed to read DHT message from stream: %s" and record.args
                    and str(record.args[0]) == "")


logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(_QuietClosedDhtStreams())

BundleProvider = Callable[[str], bytes | None]
BundleVerifier = Callable[[str, bytes], bool]
InferHandler = Callable[[dict], Awaitable[dict]]

_ADAPTER_ID = re.compile(r"^0x[0-9a-f]{64}$")
_KECCAK_256_MULTIHASH = bytes([0x1B, 0x20])  # multicodec keccak-256, 32-byte digest


def provider_key(adapter_id: str) -> str:
    """The DHT key of an adapter: the keccak-256 multihash of its content, which is what its id already is."""
    return (_KECCAK_256_MULTIHASH + bytes.fromhex(adapter_id.removeprefix("0x"))).hex()


@dataclasses.dataclass(frozen=True)
class Provider:
    """A peer that Kademlia says provides an adapter, with the addresses it gave."""

    peer_id: str
    addrs: tuple[str, ...]


class P2PNode:
    """One node's libp2p host on its own trio thread; the public coroutines are called from asyncio.

    `bundle_provider(adapter_id) -> bytes | None` serves `/longtail/adapter/1` (called on a worker
    thread); `infer_handler(request) -> reply`, an asyncio coroutine function, serves `/longtail/infer/1`
    on the loop given to `start`.
    """

    def __init__(self, private_key: bytes, listen: str = "/ip4/127.0.0.1/tcp/0", *, ttl_seconds: float = 30.0,
                 timeout: float = 30.0, handler_timeout: float = 300.0,
                 max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES, kademlia: bool = True,
                 gossip_heartbeat_seconds: int = 1) -> None:
        self.private_key = bytes(private_key)
        self.address = Account.from_key(self.private_key).address
        self._key_pair = create_new_key_pair(self.private_key)
        self.peer_id = ID.from_pubkey(self._key_pair.public_key)
        self.listen = listen
        self.ttl_seconds = ttl_seconds
        self.timeout = timeout
        self.handler_timeout = handler_timeout
        self.max_bundle_bytes = max_bundle_bytes
        self.kademlia = kademlia
        self.gossip_heartbeat_seconds = gossip_heartbeat_seconds
        self.directory = PeerDirectory()
        self.bundle_provider: BundleProvider | None = None
        self.infer_handler: InferHandler | None = None
        self.announcements_rejected = 0
        self.last_rejection: str | None = None
        self.addrs: list[str] = []
        self._bridge = TrioThread(f"longtail-p2p-{self.peer_id.to_base58()[-8:]}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host = None
        self._pubsub: Pubsub | None = None
        self._dht: KadDHT | None = None
        self._background: trio.Nursery | None = None
        self._provided: set[str] = set()
        self._provided_with_table_size = 0

    def __repr__(self) -> str:
        return f"P2PNode({self.address}, {self.peer_id.to_base58()}, {'running' if self.running else 'stopped'})"

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._bridge.running

    @property
    def thread(self):
        """The trio thread while running (tests check that `stop` leaves none behind)."""
        return self._bridge.thread

    def start(self, loop: asyncio.AbstractEventLoop | None = None, timeout: float = 15.0) -> None:
        """Start the host and block until it listens; `loop` is where `infer_handler` runs.

        Blocking: from asyncio, call `await asyncio.to_thread(node.start, loop)` (or `await node.astart()`).
        """
        self._loop = loop
        self._bridge.start(self._serve, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the host and join its thread; calls in flight fail with `P2PStopped`. Idempotent."""
        self._bridge.stop(timeout)

    async def astart(self, timeout: float = 15.0) -> None:
        """`start` from asyncio, with the running loop as the handler loop."""
        await asyncio.to_thread(self.start, asyncio.get_running_loop(), timeout)

    async def astop(self, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    @contextlib.asynccontextmanager
    async def _serve(self) -> AsyncIterator[None]:
        """The trio side: host, gossipsub, Kademlia and handlers, alive while the bridge runs."""
        host = new_host(key_pair=self._key_pair)
        gossipsub = GossipSub(protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4,
                              degree_high=12, heartbeat_initial_delay=0.1,
                              heartbeat_interval=self.gossip_heartbeat_seconds)
        # strict_signing: every gossip message carries its origin's libp2p signature, so the announcement's
        # peer id can be checked against the real publisher, not just the neighbour that relayed it.
        pubsub = Pubsub(host, gossipsub, strict_signing=True)
        dht = KadDHT(host, DHTMode.SERVER) if self.kademlia else None
        self._provided, self._provided_with_table_size = set(), 0  # a fresh DHT after a restart
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(host.run(listen_addrs=[Multiaddr(self.listen)]))
            # Runs after the services below have stopped and before host.run exits (the stack unwinds LIFO).
            stack.push_async_callback(self._close_connections, host, pubsub)
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(gossipsub))
            if dht is not None:
                await stack.enter_async_context(background_trio_service(dht))
            background = await stack.enter_async_context(trio.open_nursery())
            await pubsub.wait_until_ready()
            pubsub.set_topic_validator(ANNOUNCE_TOPIC, self._validate_gossip, False)
            subscription = await pubsub.subscribe(ANNOUNCE_TOPIC)
            host.set_stream_handler(ADAPTER_PROTOCOL, self._serve_adapter)
            host.set_stream_handler(INFER_PROTOCOL, self._serve_infer)
            if dht is not None:
                host.get_network().register_notifee(_RoutingTableFeeder(self, background))
            background.start_soon(self._receive_announcements, subscription)
            self._host, self._pubsub, self._dht, self._background = host, pubsub, dht, background
            self.addrs = [str(a) for a in host.get_addrs()]
            try:
                yield
            finally:
                background.cancel_scope.cancel()
                self._host = self._pubsub = self._dht = self._background = None

    @staticmethod
    async def _close_connections(host, pubsub: Pubsub) -> None:
        """What leaving py-libp2p 0.8.1's host.run leaves undone: it cancels the swarm without closing
        every connection (a peer keeps a live-looking connection to a dead host, and the socket leaks),
        and Pubsub never stops the sweeper thread of its seen-message cache. The thread is stopped even when the
        close is cancelled from outside (a service that failed cancels the host's scope while it unwinds): a
        cancellation is no Exception, and it had skipped the stop and left the thread running."""
        try:
            with trio.move_on_after(2), contextlib.suppress(Exception):
                await host.get_network().close()
        finally:
            pubsub.seen_messages.stop()

    # --- connections ------------------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """This host's full multiaddrs (`/ip4/.../tcp/N/p2p/<peer id>`), for peers to dial."""
        return list(self.addrs)

    async def connect(self, multiaddr: str) -> str:
        """Dial a peer by its full multiaddr; returns its peer id."""
        try:
            info = info_from_p2p_addr(Multiaddr(multiaddr))
        except Exception as error:  # multiaddr parsing raises several unrelated types
            raise P2PError(f"{multiaddr!r} is not a /p2p/ multiaddr: {error}") from None

        async def dial() -> str:
            try:
                await self._host.connect(info)
            except Exception as error:  # transport, security and muxer failures alike
                raise PeerUnreachable(info.peer_id.to_base58(), "connect", f"{type(error).__name__}: {error}") \
                    from None
            if self._dht is not None:
                await self._dht.add_peer(info.peer_id)
            return info.peer_id.to_base58()

        return await self._bridge.call(dial, timeout=self.timeout, what=f"connect to {multiaddr}")

    def connected_peers(self) -> list[str]:
        host = self._host
        return [p.to_base58() for p in host.get_connected_peers()] if host is not None else []

    # --- announcements (gossipsub) ----------------------------------------------------------------

    async def announce(self, *, http_endpoint: str | None = None, adapters_hot: Iterable[str] = (),
                       adapters_stored: Iterable[str] = (), price_per_1k_tokens: int | Mapping[str, int] = 0,
                       load: int = 0, free_kv_blocks: int = 0) -> Announcement:
        """Sign this node's announcement, publish it on the gossip topic, and provide new adapters in the DHT."""
        announcement = make_announcement(
            self.private_key, self.peer_id.to_base58(), http_endpoint=http_endpoint, adapters_hot=adapters_hot,
            adapters_stored=adapters_stored, price_per_1k_tokens=price_per_1k_tokens, load=load,
            free_kv_blocks=free_kv_blocks, ttl_seconds=self.ttl_seconds, p2p_addrs=self.addrs)
        await self.publish_announcement(announcement)
        if self._dht is not None:
            await self._bridge.call(self._provide, announcement.adapters_stored, timeout=self.timeout,
                                    what="provide adapters")
        return announcement

    async def publish_announcement(self, announcement: Announcement) -> None:
        """Publish an already signed announcement as is (receivers verify it; see `_validate_gossip`)."""
        data = announcement.to_bytes()

        async def publish() -> None:
            await self._pubsub.publish(ANNOUNCE_TOPIC, data)

        await self._bridge.call(publish, timeout=self.timeout, what="publish announcement")

    def find_peers(self, adapter_id: str) -> list[Announcement]:
        """Live announcers of an adapter, hot holders first, then lower load (see `PeerDirectory`)."""
        return self.directory.find_peers(adapter_id)

    def _validate_gossip(self, forwarder: ID, message) -> bool:
        """Gossipsub topic validator: an invalid announcement is neither delivered nor relayed."""
        try:
            if len(message.data) > MAX_ANNOUNCEMENT_BYTES:
                raise InvalidAnnouncement(f"announcement of {len(message.data)} bytes is over the limit")
            announcement = Announcement.from_bytes(message.data)
            verify_announcement(announcement, origin=ID(message.from_id).to_base58())
            if announcement.expires_at <= time.time():
                raise InvalidAnnouncement(f"announcement of {announcement.peer_id} has expired")
        except InvalidAnnouncement as error:
            self.announcements_rejected += 1
            self.last_rejection = str(error)
            log.info("dropped an announcement relayed by %s: %s", forwarder, error)
            return False
        return True

    async def _receive_announcements(self, subscription) -> None:
        me = self.peer_id.to_base58()
        while True:
            message = await subscription.get()
            try:
                announcement = Announcement.from_bytes(message.data)  # the validator has verified it
            except InvalidAnnouncement:
                continue
            if announcement.peer_id == me or not self.directory.update(announcement):
                continue
            # The signed announcement is the peer's own word for where it listens: remember it so that
            # fetch_adapter and infer can dial a peer known only through gossip.
            addrs = [Multiaddr(a) for a in announcement.p2p_addrs if _is_multiaddr(a)]
            if addrs and self._host is not None:
                peer = ID.from_base58(announcement.peer_id)
                self._host.get_peerstore().add_addrs(peer, [_strip_p2p(a) for a in addrs], 0)

    # --- provider records (Kademlia) --------------------------------------------------------------

    async def _provide(self, adapter_ids: tuple[str, ...]) -> None:
        """Provide each adapter not provided yet; provide all again when the routing table has grown,
        because records sent while this node knew fewer peers reached fewer of the closest ones."""
        dht = self._dht
        table_size = dht.get_routing_table_size()
        wanted = set(adapter_ids)
        grew = table_size > self._provided_with_table_size
        todo = wanted if grew else wanted - self._provided
        for adapter_id in self._provided - wanted:  # stop republishing what this node no longer holds
            dht.provider_store.providing_keys.discard(bytes.fromhex(provider_key(adapter_id)))
        self._provided = wanted
        self._provided_with_table_size = max(self._provided_with_table_size, table_size)
        if todo and self._background is not None:
            self._background.start_soon(self._provide_all, sorted(todo))

    async def _provide_all(self, adapter_ids: list[str]) -> None:
        limiter = trio.CapacityLimiter(4)

        async def one(adapter_id: str) -> None:
            async with limiter:
                with trio.move_on_after(self.timeout):
                    try:
                        await self._dht.provide(provider_key(adapter_id))
                    except Exception as error:  # the next announcement round tries again
                        log.info("providing %s failed: %s", adapter_id, error)

        async with trio.open_nursery() as nursery:
            for adapter_id in adapter_ids:
                nursery.start_soon(one, adapter_id)

    async def find_providers(self, adapter_id: str, count: int = 20) -> list[Provider]:
        """Peers that Kademlia lists as providers of the adapter (this node excluded); their addresses
        are remembered so `fetch_adapter` can dial them. Records live 48 h in py-libp2p: check liveness
        with the directory or just try them."""
        if self._dht is None:
            raise P2PError("this node runs without Kademlia (kademlia=False)")
        key = provider_key(_checked_adapter_id(adapter_id))

        async def lookup() -> list[Provider]:
            found: dict[str, Provider] = {}
            for info in await self._dht.find_providers(key, count):
                if info.peer_id == self.peer_id or info.peer_id.to_base58() in found:
                    continue
                if info.addrs:
                    self._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 0)
                found[info.peer_id.to_base58()] = Provider(info.peer_id.to_base58(), tuple(map(str, info.addrs)))
            return list(found.values())

        return await self._bridge.call(lookup, timeout=self.timeout, what=f"find providers of {adapter_id}")

    # --- /longtail/adapter/1 ----------------------------------------------------------------------

    async def fetch_adapter(self, peer_id: str, adapter_id: str, verify: BundleVerifier | None = None, *,
                            max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        """An adapter's bundle from a peer; if `verify(adapter_id, data)` is given and says False,
        raises `AdapterRejected`. Over `max_bytes` (default `max_bundle_bytes`): `AdapterTooLarge`."""
        adapter_id = _checked_adapter_id(adapter_id)
        limit = self.max_bundle_bytes if max_bytes is None else max_bytes
        request = json.dumps({"adapter_id": adapter_id, "max_bytes": limit}).encode()

        async def ask() -> bytes:
            try:
                frame = await self._exchange(peer_id, ADAPTER_PROTOCOL, request, limit + 1)
            except FrameTooLarge as error:  # a server that ignores our limit
                raise AdapterTooLarge(peer_id, Status.TOO_LARGE, str(error)) from None
            return parse_reply(frame, peer_id, {Status.NOT_FOUND: AdapterNotFound, Status.TOO_LARGE: AdapterTooLarge})

        data = await self._bridge.call(ask, timeout=timeout or self.timeout,
                                       what=f"fetch adapter {adapter_id} from {peer_id}")
        if verify is not None and not await asyncio.to_thread(verify, adapter_id, data):
            raise AdapterRejected(adapter_id, peer_id, len(data))
        return data

    async def _serve_adapter(self, stream) -> None:
        try:
            with trio.move_on_after(self.timeout):
                try:
                    request = json.loads(await read_frame(stream, 4096))
                    adapter_id = _checked_adapter_id(request["adapter_id"])
                    asked_limit = int(request.get("max_bytes", self.max_bundle_bytes))
                except (P2PError, ValueError, KeyError, TypeError) as error:
                    await write_error(stream, Status.BAD_REQUEST, f"bad adapter request: {error}")
                    return
                provider = self.bundle_provider
                bundle = None
                if provider is not None:
                    try:
                        bundle = await trio.to_thread.run_sync(provider, adapter_id)
                    except LookupError:  # the store's "not here"
                        bundle = None
                if bundle is None:
                    await write_error(stream, Status.NOT_FOUND, f"adapter {adapter_id} is not served here")
                    return
                limit = min(asked_limit, self.max_bundle_bytes)
                if len(bundle) > limit:
                    await write_error(stream, Status.TOO_LARGE, f"adapter {adapter_id} is {len(bundle)} bytes, "
                                      f"over the {limit}-byte limit", size=len(bundle), limit=limit)
                    return
                await write_reply(stream, Status.OK, bytes(bundle))
        except Exception as error:  # the asker gets the reason if the stream still works; this host goes on
            with contextlib.suppress(Exception):
                await write_error(stream, Status.ERROR, f"{type(error).__name__}: {error}")
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    # --- /longtail/infer/1 ------------------------------------------------------------------------

    async def infer(self, peer_id: str, request: dict, *, timeout: float | None = None) -> dict:
        """Send an inference request (the HTTP body and payment headers, as the handler expects them)
        to a peer and return its JSON reply."""
        payload = json.dumps(request).encode()
        if len(payload) > MAX_REQUEST_BYTES:
            raise P2PError(f"inference request of {len(payload)} bytes is over the {MAX_REQUEST_BYTES}-byte limit")

        async def ask() -> dict:
            frame = await self._exchange(peer_id, INFER_PROTOCOL, payload, MAX_INFER_REPLY_BYTES)
            return json.loads(parse_reply(frame, peer_id))

        return await self._bridge.call(ask, timeout=timeout or self.timeout, what=f"infer on {peer_id}")

    async def _serve_infer(self, stream) -> None:
        try:
            with trio.move_on_after(self.timeout) as reading:
                try:
                    request = json.loads(await read_frame(stream, MAX_REQUEST_BYTES))
                    if not isinstance(request, dict):
                        raise TypeError(f"request is a JSON {type(request).__name__}, not an object")
                except (P2PError, ValueError, TypeError) as error:
                    await write_error(stream, Status.BAD_REQUEST, f"bad inference request: {error}")
                    return
            if reading.cancelled_caught:
                return
            handler, loop = self.infer_handler, self._loop
            if handler is None or loop is None:
                await write_error(stream, Status.UNAVAILABLE, "this peer serves no inference")
                return
            reply = await self._bridge.to_asyncio(loop, handler(request), timeout=self.handler_timeout)
            await write_reply(stream, Status.OK, json.dumps(reply).encode())
        except Exception as error:  # includes the handler's own errors and its timeout
            with contextlib.suppress(Exception):
                await write_error(stream, Status.ERROR, f"{type(error).__name__}: {error}")
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    # --- shared -----------------------------------------------------------------------------------

    async def _exchange(self, peer_id: str, protocol: str, request: bytes, reply_limit: int) -> bytes:
        """Open a stream, send one frame, read one frame back (trio side)."""
        if self._host is None:
            raise P2PStopped("the libp2p host is not running")
        try:
            peer = ID.from_base58(peer_id)
        except Exception:  # base58 / multihash decoding errors
            raise P2PError(f"{peer_id!r} is not a peer id") from None
        try:
            stream = await self._host.new_stream(peer, [protocol])
        except Exception as error:  # no route, dial failure, protocol refused
            raise PeerUnreachable(peer_id, protocol, f"{type(error).__name__}: {error}") from None
        try:
            await write_frame(stream, request)
            return await read_frame(stream, reply_limit)
        except P2PError:
            raise
        except Exception as error:  # reset or closed mid-exchange
            raise P2PError(f"{protocol} with {peer_id} failed: {type(error).__name__}: {error}") from None
        finally:
            with contextlib.suppress(Exception):
                await stream.close()


class _RoutingTableFeeder(INotifee):
    """Adds every newly connected peer to the Kademlia routing table (inbound ones too, once identify
    has told us where they listen), so provider records reach peers that dialled us."""

    def __init__(self, node: P2PNode, nursery: trio.Nursery) -> None:
        self.node, self.nursery = node, nursery

    async def connected(self, network, conn) -> None:
        self.nursery.start_soon(self._add, conn.muxed_conn.peer_id)

    async def _add(self, peer: ID) -> None:
        for _ in range(10):
            dht = self.node._dht
            if dht is None:
                return
            with contextlib.suppress(Exception):
                if await dht.add_peer(peer):
                    return
            await trio.sleep(0.2)

    async def disconnected(self, network, conn) -> None:
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network, stream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network, stream) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network, multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network, multiaddr) -> None:
        await trio.lowlevel.checkpoint()


def _checked_adapter_id(adapter_id: str) -> str:
    adapter_id = str(adapter_id).lower()
    if not _ADAPTER_ID.match(adapter_id):
        raise P2PError(f"{adapter_id!r} is not an adapter id (0x + 64 hex digits)")
    return adapter_id


def _is_multiaddr(text: str) -> bool:
    try:
        Multiaddr(text)
    except Exception:  # multiaddr raises several types for bad input
        return False
    return True


def _strip_p2p(addr: Multiaddr) -> Multiaddr:
    """The transport part of a multiaddr (the peerstore keys addresses by peer id already)."""
    with contextlib.suppress(Exception):
        return addr.decapsulate(Multiaddr(f"/p2p/{addr.value_for_protocol('p2p')}"))
    return addr
