"""The one bridge between the node's asyncio loop and py-libp2p's trio loop.

py-libp2p runs on trio; the node's HTTP side (aiohttp) runs on asyncio. `TrioThread` runs a trio loop on
a dedicated thread and offers exactly one mechanism in each direction, neither of which holds a thread
while it waits:

- asyncio -> trio: `await bridge.call(fn, *args, timeout=...)`. The asyncio side hands the call to trio
  with `TrioToken.run_sync_soon` (the non-blocking primitive under `trio.from_thread.run`), trio runs
  `fn` in its call nursery under `trio.fail_after(timeout)`, and settles an asyncio future with
  `loop.call_soon_threadsafe`. Cancelling the awaiting asyncio task cancels the trio task. We do not
  park a thread in `trio.from_thread.run` per call: asyncio's default executor has min(32, cores + 4)
  threads (6 on 2 cores), shared with the node's database work, so a few slow peers would starve it.
- trio -> asyncio: `await bridge.to_asyncio(coro, timeout=...)` from a trio handler schedules the
  coroutine on the node's loop with `asyncio.run_coroutine_threadsafe` and waits on a trio event that
  the future's done-callback sets through the trio token. Cancelling the trio side cancels the coroutine.

`call_blocking` is the plain `trio.from_thread.run` for synchronous threads that are not on either loop.
Stopping sets a trio event, cancels the calls in flight (their awaiting callers get `P2PStopped`), lets
the `serve` context close the host, and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

from longtail.node.p2p.protocols import P2PError, P2PStopped, P2PTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")

Serve = Callable[[], contextlib.AbstractAsyncContextManager[None]]


class TrioThread:
    """A trio event loop on its own thread, running a `serve` context until stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._calls: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._calls is not None and self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, serve: Serve, timeout: float = 15.0) -> None:
        """Start the thread and wait until `serve` has entered (the host listens); raise what it raised."""
        if self._thread is not None:
            raise P2PError(f"{self.name} is already started")
        self._ready.clear()
        self._error = None
        self._token = self._stop = None
        self._thread = threading.Thread(target=self._run, args=(serve,), name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise P2PError(f"{self.name} did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise P2PError(f"{self.name} failed to start: {type(self._error).__name__}: {self._error}") \
                from self._error

    def _run(self, serve: Serve) -> None:
        try:
            trio.run(self._main, serve)
        except BaseException as error:  # reported to start(); after a clean start it is logged
            if not self._ready.is_set():
                self._error = error
                self._ready.set()
            else:
                log.exception("%s ended with an error", self.name)

    async def _main(self, serve: Serve) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with serve(), trio.open_nursery() as calls:
            self._calls = calls
            self._ready.set()
            await self._stop.wait()
            # Calls in flight end before `serve` closes the host under them.
            calls.cancel_scope.cancel()
        self._calls = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the trio loop and join its thread (idempotent; safe from any thread but the trio one)."""
        thread, token, stop = self._thread, self._token, self._stop
        if thread is None:
            return
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise P2PError(f"{self.name} did not stop within {timeout:g} s")
        self._thread = None

    # --- asyncio -> trio --------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float, what: str = "") -> T:
        """Run the trio coroutine function `fn(*args)` on the trio thread and await its result from asyncio."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()
        what = what or getattr(fn, "__name__", "p2p call")

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():  # the asyncio caller was cancelled
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def deliver(result: T | None = None, error: BaseException | None = None) -> None:
            with contextlib.suppress(RuntimeError):  # the asyncio loop closed; nobody is waiting
                loop.call_soon_threadsafe(settle, result, error)

        async def run() -> None:
            with scope:
                try:
                    with trio.fail_after(timeout):
                        result = await fn(*args)
                except trio.TooSlowError:
                    deliver(error=P2PTimeout(what, timeout))
                except trio.Cancelled:
                    deliver(error=P2PStopped(f"{what} was cancelled: the libp2p host is stopping"))
                    raise
                except Exception as error:  # handed to the asyncio caller, never raised into the nursery
                    deliver(error=error)
                else:
                    deliver(result)

        def schedule() -> None:
            if self._calls is None:
                deliver(error=P2PStopped(f"{what}: the libp2p host is not running"))
            else:
                self._calls.start_soon(run)

        token = self._token
        if token is None or not self.running:
            raise P2PStopped(f"{what}: the libp2p host is not running")
        try:
            token.run_sync_soon(schedule)
        except trio.RunFinishedError:
            raise P2PStopped(f"{what}: the libp2p host has stopped") from None
        try:
            return await future
        except asyncio.CancelledError:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(scope.cancel)
            raise

    def call_blocking(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float, what: str = "") -> T:
        """The same call from a plain synchronous thread (never from the trio thread or an asyncio loop)."""
        what = what or getattr(fn, "__name__", "p2p call")

        async def run() -> T:
            try:
                with trio.fail_after(timeout):
                    return await fn(*args)
            except trio.TooSlowError:
                raise P2PTimeout(what, timeout) from None

        if self._token is None or not self.running:
            raise P2PStopped(f"{what}: the libp2p host is not running")
        try:
            return trio.from_thread.run(run, trio_token=self._token)
        except trio.RunFinishedError:
            raise P2PStopped(f"{what}: the libp2p host has stopped") from None

    # --- trio -> asyncio --------------------------------------------------------------------------

    async def to_asyncio(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T], *,
                         timeout: float) -> T:
        """From a trio task: run `coroutine` on the asyncio `loop` and await its result without a thread."""
        try:
            future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError as error:  # the loop is closed
            coroutine.close()
            raise P2PStopped(f"the node's asyncio loop is not running: {error}") from None
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: concurrent.futures.Future) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            with trio.fail_after(timeout):
                await done.wait()
        except trio.TooSlowError:
            future.cancel()
            raise P2PTimeout(getattr(coroutine, "__qualname__", "the asyncio handler"), timeout) from None
        except BaseException:  # trio cancellation: the asyncio side must not run on unobserved
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise P2PStopped("the node's asyncio side cancelled the handler (is the node stopping?)") from None


@contextlib.asynccontextmanager
async def nothing() -> AsyncIterator[None]:
    """A `serve` that only keeps the loop alive (for tests of the bridge itself)."""
    yield
