"""Protocol ids, the length-prefixed framing every Longtail stream uses, and the errors a peer can meet.

A frame is a 4-byte big-endian length, then that many bytes. A reply frame's first byte is a status
(`Status`); an error reply carries `{"error": reason}` as JSON after it, so the asking side can raise
the specific exception (`AdapterNotFound`, `AdapterTooLarge`, ...) with the peer's reason.
"""

from __future__ import annotations

import enum
import json
import struct

from libp2p.custom_types import TProtocol

ANNOUNCE_TOPIC = "/longtail/announce/1"
ADAPTER_PROTOCOL = TProtocol("/longtail/adapter/1")
INFER_PROTOCOL = TProtocol("/longtail/infer/1")

DEFAULT_MAX_BUNDLE_BYTES = 256 * 2**20
MAX_REQUEST_BYTES = 4 * 2**20       # an inference request or an adapter request; prompts are small
MAX_INFER_REPLY_BYTES = 16 * 2**20
MAX_ANNOUNCEMENT_BYTES = 256 * 2**10  # thousands of adapter ids fit; a flood does not

_LENGTH = struct.Struct(">I")


class Status(enum.IntEnum):
    """The first byte of every reply frame."""

    OK = 0
    NOT_FOUND = 1
    TOO_LARGE = 2
    BAD_REQUEST = 3
    UNAVAILABLE = 4
    ERROR = 5


class P2PError(RuntimeError):
    """A peer is unreachable, refused, timed out, or answered something malformed."""


class P2PStopped(P2PError):
    """The libp2p host is not running (never started, or stopped while the call was in flight)."""


class P2PTimeout(P2PError):
    """A call to a peer took longer than its deadline; the trio side of the call was cancelled."""

    def __init__(self, what: str, seconds: float):
        super().__init__(f"{what} took longer than {seconds:g} s")
        self.what, self.seconds = what, seconds


class PeerUnreachable(P2PError):
    """No stream could be opened to the peer (not connected, no known address, or it refused the protocol)."""

    def __init__(self, peer_id: str, protocol: str, reason: str):
        super().__init__(f"cannot open {protocol} to {peer_id}: {reason}")
        self.peer_id, self.protocol, self.reason = peer_id, protocol, reason


class FrameTooLarge(P2PError):
    """A frame declared more bytes than the reader accepts; nothing past the length prefix was read."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"frame of {length} bytes is over the {limit}-byte limit")
        self.length, self.limit = length, limit


class StreamClosed(P2PError):
    """The stream ended in the middle of a frame."""

    def __init__(self, received: int, expected: int):
        super().__init__(f"stream closed after {received} of {expected} bytes")
        self.received, self.expected = received, expected


class RemoteError(P2PError):
    """The peer answered with an error frame."""

    def __init__(self, peer_id: str, status: Status, reason: str):
        super().__init__(f"peer {peer_id} answered {status.name}: {reason}")
        self.peer_id, self.status, self.reason = peer_id, status, reason


class AdapterNotFound(RemoteError):
    """The peer does not serve the adapter asked for."""


class AdapterTooLarge(RemoteError):
    """The adapter's bundle is over the size limit of the asker or of the server."""


class AdapterRejected(P2PError):
    """The bytes a peer delivered for an adapter failed the caller's verifier (they do not hash to its id)."""

    def __init__(self, adapter_id: str, peer_id: str, size: int):
        super().__init__(f"peer {peer_id} delivered {size} bytes for adapter {adapter_id} that fail verification")
        self.adapter_id, self.peer_id, self.size = adapter_id, peer_id, size


class InvalidAnnouncement(P2PError):
    """An announcement whose signature, signer, peer id or fields do not hold together."""


async def read_exactly(stream, count: int) -> bytes:
    """`count` bytes from a libp2p stream, which may return fewer per read."""
    buffer = bytearray()
    while len(buffer) < count:
        chunk = await stream.read(min(count - len(buffer), 1 << 20))
        if not chunk:
            raise StreamClosed(len(buffer), count)
        buffer += chunk
    return bytes(buffer)


async def read_frame(stream, limit: int) -> bytes:
    """One frame; refuses (before reading it) a frame longer than `limit`."""
    (length,) = _LENGTH.unpack(await read_exactly(stream, _LENGTH.size))
    if length > limit:
        raise FrameTooLarge(length, limit)
    return await read_exactly(stream, length)


async def write_frame(stream, payload: bytes) -> None:
    await stream.write(_LENGTH.pack(len(payload)) + payload)


async def write_reply(stream, status: Status, body: bytes) -> None:
    await write_frame(stream, bytes([status]) + body)


async def write_error(stream, status: Status, reason: str, **details) -> None:
    await write_reply(stream, status, json.dumps({"error": reason[:500], **details}).encode())


def parse_reply(frame: bytes, peer_id: str,
                errors: dict[Status, type[RemoteError]] | None = None) -> bytes:
    """The body of an OK reply frame; for an error frame, raises `errors[status]` (else `RemoteError`)."""
    if not frame:
        raise P2PError(f"peer {peer_id} sent an empty reply frame")
    try:
        status = Status(frame[0])
    except ValueError:
        raise P2PError(f"peer {peer_id} sent unknown reply status {frame[0]}") from None
    if status is Status.OK:
        return frame[1:]
    try:
        reason = str(json.loads(frame[1:])["error"])
    except (ValueError, KeyError, TypeError):
        reason = frame[1:200].decode(errors="replace")
    raise (errors or {}).get(status, RemoteError)(peer_id, status, reason)
