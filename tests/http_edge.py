"""The node's real HTTP edge on a loopback port, with a client session on it, for tests that speak HTTP to it."""

from __future__ import annotations

from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from longtail.node.api import SERVER_OPTIONS, build_app
from longtail.node.service import Node


@asynccontextmanager
async def serving(service, adapters=None, **server_options):
    """Yield (session, base URL); a real `Node`'s receipt log is closed afterwards, as the runner does."""
    runner = web.AppRunner(build_app(service, adapters), access_log=None, **{**SERVER_OPTIONS, **server_options})
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
            yield session, f"http://{host}:{port}"
    finally:
        await runner.cleanup()
        if isinstance(service, Node):
            service.receipt_log.close()
