"""A py-libp2p host for a Longtail node, and the one bridge between trio and asyncio.

py-libp2p runs on trio; the node (aiohttp) runs on asyncio. The host lives in
a dedicated thread with its own `trio.run`. The bridge is one mechanism in each
direction:
- asyncio → trio: `await self._call(fn, ...)` runs `trio.from_thread.run(fn, ...)`
  in a worker thread (`asyncio.to_thread`), so an asyncio caller awaits a trio
  coroutine without blocking its loop;
- trio → asyncio: a protocol handler schedules the node's coroutine with
  `asyncio.run_coroutine_threadsafe(coro, loop)` and awaits the future from a
  trio worker thread (`trio.to_thread.run_sync(future.result)`).

Protocols (length-prefixed frames: 4-byte big-endian length, then the bytes):
- `/longtail/announce/1`: a signed announcement pushed to every connected peer;
- `/longtail/adapter/1`: ask a peer for an adapter's bundle by id (the caller verifies it by id);
- `/longtail/infer/1`: an OpenAI-style request (payment headers as fields) in, the JSON response out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import struct
import threading
import time
from collections.abc import Awaitable, Callable

import trio
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address
from libp2p import new_host
from libp2p.crypto.secp256k1 import Secp256k1PublicKey, create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

ANNOUNCE = TProtocol("/longtail/announce/1")
ADAPTER = TProtocol("/longtail/adapter/1")
INFER = TProtocol("/longtail/infer/1")
MAX_FRAME = 64 * 2**20
MAX_ANNOUNCEMENT = 64 * 2**10


class P2PError(RuntimeError):
    """A peer is unreachable, refused, or answered something malformed."""


@dataclasses.dataclass(frozen=True)
class Announcement:
    """What a node tells its peers about itself; signed by its key, valid until `expires_at`."""

    address: str
    peer_id: str
    public_key: str              # uncompressed secp256k1, 0x-hex: binds the peer id to the chain address
    http_endpoint: str | None
    adapters_hot: tuple[str, ...]
    adapters_stored: tuple[str, ...]
    price_per_1k_tokens: int
    load: int
    free_kv_blocks: int
    timestamp: float
    ttl_seconds: float
    signature: str = ""

    @property
    def expires_at(self) -> float:
        return self.timestamp + self.ttl_seconds

    def payload(self) -> bytes:
        body = {k: v for k, v in dataclasses.asdict(self).items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Announcement:
        raw = json.loads(data)
        raw["adapters_hot"] = tuple(raw.get("adapters_hot", ()))
        raw["adapters_stored"] = tuple(raw.get("adapters_stored", ()))
        return cls(**raw)


def sign_announcement(announcement: Announcement, private_key: bytes) -> Announcement:
    signed = Account.sign_message(encode_defunct(announcement.payload()), private_key)
    return dataclasses.replace(announcement, signature="0x" + bytes(signed.signature).hex())


def verify_announcement(announcement: Announcement, sender: ID | None = None) -> None:
    """Raise P2PError unless the signature, the address, the public key and the peer id all agree."""
    try:
        recovered = Account.recover_message(encode_defunct(announcement.payload()), signature=announcement.signature)
    except Exception as error:  # malformed signature bytes of any kind
        raise P2PError(f"announcement signature does not parse: {type(error).__name__}") from None
    if recovered != to_checksum_address(announcement.address):
        raise P2PError(f"announcement for {announcement.address} is signed by {recovered}")
    public = bytes.fromhex(announcement.public_key.removeprefix("0x"))
    if len(public) != 65 or to_checksum_address(keccak(public[1:])[-20:]) != recovered:
        raise P2PError("announcement's public key is not the signer's")
    peer = ID.from_pubkey(Secp256k1PublicKey.from_bytes(public))
    if peer.to_base58() != announcement.peer_id or (sender is not None and sender != peer):
        raise P2PError(f"announcement's peer id {announcement.peer_id} is not its key's (sent by {sender})")


class PeerDirectory:
    """Live announcements by peer id; expired ones vanish. Thread-safe (trio writes, asyncio reads)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, Announcement] = {}

    def update(self, announcement: Announcement) -> bool:
        with self._lock:
            current = self._peers.get(announcement.peer_id)
            if current is not None and current.timestamp >= announcement.timestamp:
                return False
            self._peers[announcement.peer_id] = announcement
            return True

    def live(self) -> list[Announcement]:
        now = self._clock()
        with self._lock:
            for peer in [p for p, a in self._peers.items() if a.expires_at <= now]:
                del self._peers[peer]
            return list(self._peers.values())

    def find_peers(self, adapter_id: str) -> list[Announcement]:
        """Peers holding the adapter: hot (on device) first, then by load."""
        adapter_id = adapter_id.lower()
        holders = [a for a in self.live() if adapter_id in a.adapters_hot or adapter_id in a.adapters_stored]
        return sorted(holders, key=lambda a: (adapter_id not in a.adapters_hot, a.load))


async def _read_frame(stream, limit: int = MAX_FRAME) -> bytes:
    header = await _read_exactly(stream, 4)
    (length,) = struct.unpack(">I", header)
    if length > limit:
        raise P2PError(f"frame of {length} bytes is over the {limit}-byte limit")
    return await _read_exactly(stream, length)


async def _read_exactly(stream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.read(count - len(data))
        if not chunk:
            raise P2PError(f"stream closed after {len(data)} of {count} bytes")
        data += chunk
    return data


async def _write_frame(stream, data: bytes) -> None:
    await stream.write(struct.pack(">I", len(data)) + data)


BundleProvider = Callable[[str], bytes | None]
InferHandler = Callable[[dict], Awaitable[dict]]


class P2PNode:
    """One node's libp2p host, started on its own thread; every public coroutine runs on asyncio."""

    def __init__(self, private_key: bytes, listen: str = "/ip4/127.0.0.1/tcp/0", ttl_seconds: float = 30.0,
                 timeout: float = 30.0) -> None:
        self.private_key = private_key
        self.address = Account.from_key(private_key).address
        self._key_pair = create_new_key_pair(private_key)
        self.peer_id = ID.from_pubkey(self._key_pair.public_key)
        self.public_key = "0x" + self._key_pair.public_key.impl.format(compressed=False).hex()
        self.listen = listen
        self.ttl_seconds = ttl_seconds
        self.timeout = timeout
        self.directory = PeerDirectory()
        self.bundle_provider: BundleProvider | None = None
        self.infer_handler: InferHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._host = None
        self.addrs: list[str] = []

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None, timeout: float = 15.0) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="longtail-p2p", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise P2PError(f"libp2p host did not start within {timeout} s")
        if self._error is not None:
            raise P2PError(f"libp2p host failed to start: {self._error}")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # reported to start(); the thread then ends
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._host = new_host(key_pair=self._key_pair)
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with self._host.run(listen_addrs=[Multiaddr(self.listen)]):
            self._host.set_stream_handler(ANNOUNCE, self._on_announce)
            self._host.set_stream_handler(ADAPTER, self._on_adapter)
            self._host.set_stream_handler(INFER, self._on_infer)
            self.addrs = [str(a) for a in self._host.get_addrs()]
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._thread is None or self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=10)
        self._thread = None

    # --- asyncio → trio -------------------------------------------------------------------------

    async def _call(self, function, *args):
        def run():
            return trio.from_thread.run(function, *args, trio_token=self._token)
        try:
            return await asyncio.wait_for(asyncio.to_thread(run), self.timeout)
        except P2PError:
            raise
        except Exception as error:  # transport errors of every kind become one typed error
            raise P2PError(f"{getattr(function, '__name__', 'p2p call')}: {type(error).__name__}: {error}") from None

    async def connect(self, multiaddr: str) -> str:
        async def dial():
            info = info_from_p2p_addr(Multiaddr(multiaddr))
            await self._host.connect(info)
            return info.peer_id.to_base58()
        return await self._call(dial)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_connected_peers()] if self._host else []

    async def announce(self, **fields) -> Announcement:
        """Sign an announcement of this node and push it to every connected peer."""
        announcement = sign_announcement(Announcement(
            address=self.address, peer_id=self.peer_id.to_base58(), public_key=self.public_key,
            timestamp=time.time(), ttl_seconds=self.ttl_seconds, **fields), self.private_key)
        await self._call(self._push_announcement, announcement.to_bytes())
        return announcement

    async def _push_announcement(self, data: bytes) -> int:
        sent = 0
        for peer in list(self._host.get_connected_peers()):
            with contextlib.suppress(Exception):  # a vanished peer must not stop the others' announcements
                stream = await self._host.new_stream(peer, [ANNOUNCE])
                await _write_frame(stream, data)
                await stream.close()
                sent += 1
        return sent

    async def fetch_adapter(self, peer_id: str, adapter_id: str) -> bytes:
        async def ask():
            stream = await self._host.new_stream(ID.from_base58(peer_id), [ADAPTER])
            await _write_frame(stream, adapter_id.encode())
            reply = await _read_frame(stream)
            await stream.close()
            if reply[:1] != b"\x00":
                raise P2PError(f"peer {peer_id} refused adapter {adapter_id}: {reply[1:].decode(errors='replace')}")
            return reply[1:]
        return await self._call(ask)

    async def infer(self, peer_id: str, request: dict) -> dict:
        async def ask():
            stream = await self._host.new_stream(ID.from_base58(peer_id), [INFER])
            await _write_frame(stream, json.dumps(request).encode())
            reply = await _read_frame(stream)
            await stream.close()
            return json.loads(reply)
        return await self._call(ask)

    # --- trio handlers (and trio → asyncio) --------------------------------------------------

    async def _on_announce(self, stream) -> None:
        try:
            data = await _read_frame(stream, MAX_ANNOUNCEMENT)
            announcement = Announcement.from_bytes(data)
            verify_announcement(announcement, stream.muxed_conn.peer_id)
            self.directory.update(announcement)
        except Exception:  # a forged or malformed announcement is dropped, never raised into the host
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _on_adapter(self, stream) -> None:
        try:
            adapter_id = (await _read_frame(stream, 128)).decode()
            bundle = None
            if self.bundle_provider is not None:
                bundle = await trio.to_thread.run_sync(self.bundle_provider, adapter_id)
            await _write_frame(stream, b"\x00" + bundle if bundle else b"\x01not served here")
        except Exception as error:  # the asking peer gets the reason; this host goes on
            with contextlib.suppress(Exception):
                await _write_frame(stream, b"\x01" + str(error).encode()[:200])
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _on_infer(self, stream) -> None:
        try:
            request = json.loads(await _read_frame(stream, 2**20))
            if self.infer_handler is None or self._loop is None:
                reply = {"status": 503, "body": {"error": {"message": "this peer serves no inference"}}}
            else:
                future = asyncio.run_coroutine_threadsafe(self.infer_handler(request), self._loop)
                reply = await trio.to_thread.run_sync(future.result)
            await _write_frame(stream, json.dumps(reply).encode())
        except Exception as error:
            with contextlib.suppress(Exception):
                await _write_frame(stream, json.dumps({"status": 500, "body": {"error": {"message": str(error)}}})
                                   .encode())
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
