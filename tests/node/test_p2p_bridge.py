"""The trio/asyncio bridge on its own: results, errors, deadlines and cancellation cross in both directions."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import trio

from longtail.node.p2p.bridge import TrioThread, nothing
from longtail.node.p2p.protocols import P2PStopped, P2PTimeout


class Boom(ValueError):
    pass


def run_with_bridge(scenario):
    """Run `scenario(bridge)` on a fresh asyncio loop with a started TrioThread, always stopping it."""
    async def main():
        bridge = TrioThread("test-bridge")
        await asyncio.to_thread(bridge.start, nothing)
        try:
            return await scenario(bridge)
        finally:
            await asyncio.to_thread(bridge.stop)
            assert bridge.thread is None
    return asyncio.run(main())


def test_a_call_runs_on_the_trio_thread_and_returns_its_result():
    async def on_trio(x):
        await trio.sleep(0.01)
        return x * 2, threading.current_thread().name, trio.lowlevel.current_trio_token() is not None

    async def scenario(bridge):
        return await bridge.call(on_trio, 21, timeout=5)

    assert run_with_bridge(scenario) == (42, "test-bridge", True)


def test_an_error_keeps_its_type_and_a_deadline_cancels_the_trio_side():
    finished = []

    async def fails():
        raise Boom("no luck")

    async def slow():
        await trio.sleep(10)
        finished.append(True)

    async def scenario(bridge):
        with pytest.raises(Boom, match="no luck"):
            await bridge.call(fails, timeout=5)
        started = time.monotonic()
        with pytest.raises(P2PTimeout, match="slow took longer than 0.2 s"):
            await bridge.call(slow, timeout=0.2)
        return time.monotonic() - started

    assert run_with_bridge(scenario) < 1.0
    assert finished == []


def test_cancelling_the_asyncio_caller_cancels_the_trio_task():
    seen = []

    async def slow():
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            seen.append("cancelled")
            raise

    async def scenario(bridge):
        task = asyncio.create_task(bridge.call(slow, timeout=30))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.01)

    run_with_bridge(scenario)
    assert seen == ["cancelled"]


def test_many_concurrent_calls_hold_no_thread_each():
    async def nap():
        await trio.sleep(0.3)
        return 1

    async def scenario(bridge):
        threads_before = threading.active_count()
        started = time.monotonic()
        calls = [asyncio.create_task(bridge.call(nap, timeout=5)) for _ in range(100)]
        await asyncio.sleep(0.1)
        threads_during = threading.active_count()
        results = await asyncio.gather(*calls)
        return sum(results), time.monotonic() - started, threads_during - threads_before

    total, elapsed, extra_threads = run_with_bridge(scenario)
    assert total == 100
    assert elapsed < 1.5, "the calls overlapped"
    assert extra_threads == 0, "no thread is parked per call"


def test_trio_awaits_a_coroutine_on_the_asyncio_loop():
    async def scenario(bridge):
        loop = asyncio.get_running_loop()

        async def on_asyncio(x):
            await asyncio.sleep(0.01)
            return x + 1, asyncio.get_running_loop() is loop

        async def from_trio():
            return await bridge.to_asyncio(loop, on_asyncio(1), timeout=5)

        return await bridge.call(from_trio, timeout=5)

    assert run_with_bridge(scenario) == (2, True)


def test_a_trio_deadline_cancels_the_asyncio_coroutine():
    async def scenario(bridge):
        loop = asyncio.get_running_loop()
        outcome = []

        async def hangs():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise

        async def from_trio():
            return await bridge.to_asyncio(loop, hangs(), timeout=0.2)

        with pytest.raises(P2PTimeout):
            await bridge.call(from_trio, timeout=5)
        await asyncio.sleep(0.05)
        return outcome

    assert run_with_bridge(scenario) == ["cancelled"]


def test_stopping_fails_calls_in_flight_and_later_calls():
    async def forever():
        await trio.sleep(100)

    async def main():
        bridge = TrioThread("test-bridge-stop")
        await asyncio.to_thread(bridge.start, nothing)
        pending = asyncio.create_task(bridge.call(forever, timeout=100))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.to_thread(bridge.stop)
        stop_seconds = time.monotonic() - started
        with pytest.raises(P2PStopped):
            await pending
        with pytest.raises(P2PStopped):
            await bridge.call(forever, timeout=1)
        return stop_seconds

    assert asyncio.run(main()) < 1.0
    assert not [t for t in threading.enumerate() if t.name == "test-bridge-stop"]


def test_a_failing_serve_is_reported_by_start():
    from contextlib import asynccontextmanager

    from longtail.node.p2p.protocols import P2PError

    @asynccontextmanager
    async def broken():
        raise OSError("address already in use")
        yield

    bridge = TrioThread("test-bridge-broken")
    with pytest.raises(P2PError, match="address already in use"):
        bridge.start(broken)
    assert bridge.thread is None


def test_a_stopped_bridge_starts_again():
    async def where():
        return threading.current_thread().name

    async def main():
        bridge = TrioThread("test-bridge-restart")
        for _ in range(2):
            await asyncio.to_thread(bridge.start, nothing)
            assert await bridge.call(where, timeout=5) == "test-bridge-restart"
            await asyncio.to_thread(bridge.stop)
            with pytest.raises(P2PStopped):
                await bridge.call(where, timeout=5)

    asyncio.run(main())
