"""The node's libp2p side: a trio host on its own thread, bridged to the node's asyncio loop.

`P2PNode` (host.py) is the one object the node uses; `announce.py` holds the signed announcements and
the directory of live peers; `protocols.py` the protocol ids, framing and errors; `bridge.py` the
trio/asyncio bridge.
"""

from longtail.node.p2p.announce import Announcement, PeerDirectory, make_announcement, verify_announcement
from longtail.node.p2p.host import P2PNode, Provider
from longtail.node.p2p.protocols import (
    ADAPTER_PROTOCOL,
    ANNOUNCE_TOPIC,
    INFER_PROTOCOL,
    AdapterNotFound,
    AdapterRejected,
    AdapterTooLarge,
    InvalidAnnouncement,
    P2PError,
    P2PStopped,
    P2PTimeout,
    PeerUnreachable,
    RemoteError,
)

__all__ = [
    "ADAPTER_PROTOCOL", "ANNOUNCE_TOPIC", "INFER_PROTOCOL", "AdapterNotFound", "AdapterRejected",
    "AdapterTooLarge", "Announcement", "InvalidAnnouncement", "P2PError", "P2PNode", "P2PStopped",
    "P2PTimeout", "PeerDirectory", "PeerUnreachable", "Provider", "RemoteError", "make_announcement",
    "verify_announcement",
]
