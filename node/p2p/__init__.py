"""The node's libp2p side: a trio host on its own thread, bridged to the node's asyncio loop."""

from node.p2p.host import Announcement, P2PError, P2PNode, PeerDirectory

__all__ = ["Announcement", "P2PError", "P2PNode", "PeerDirectory"]
