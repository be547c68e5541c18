"""The one seam between the node and an engine: the `EngineClient` protocol and its in-process implementation.

Two engines implement it: `LocalEngine` (an `Engine` stepped on a thread of
this process) and `serving.engine_process.EngineProcess` (an `Engine` in a
child process). The node calls nothing else, so it never asks what kind of
engine it holds. `Engine` itself stays the synchronous core (steps, requests,
tensors); the thread that drives it and the bridge from its thread to asyncio
are here.

- `stream` submits a request and yields its events; closing the iterator early
  cancels the request (submit, stream and cancel in one call).
- `score` is the log-probability of given output tokens, in the same batch.
- `add_adapter`, `remove_adapter`, `list_adapters`, `stats` are blocking (the
  node calls them from a worker thread): the adapter lifecycle and what
  GET /v1/adapters and /metrics show.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from longtail.serving.adapter_provider import AdapterInfo
from longtail.serving.config import ModelConfig
from longtail.serving.engine import Engine, EngineStats, StreamEvent
from longtail.serving.errors import RequestCancelled
from longtail.serving.sampling import SamplingParams

log = logging.getLogger(__name__)


@runtime_checkable
class EngineClient(Protocol):
    """What the node needs from an engine, wherever it runs."""

    model_config: ModelConfig

    def stream(self, prompt_ids: Sequence[int], adapter_id: str | None, params: SamplingParams,
               client: str | None = None) -> AsyncIterator[StreamEvent]:
        """Events token by token; a refused request raises its typed error before the first; closing cancels."""
        ...

    async def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int], adapter_id: str | None,
                    client: str | None = None, background: bool = False) -> list[float]:
        """Log-probability of each output token after the prompt, under `adapter_id` (None: the base model)."""
        ...

    def add_adapter(self, peft_dir: Path | str, name: str | None = None) -> str:
        """Validate and store a PEFT adapter; its adapterId. It reaches the device when requests want it."""
        ...

    def remove_adapter(self, adapter_id: str) -> None:
        """Running requests finish; waiting and new ones end with `UnknownAdapter`."""
        ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


class LocalEngine:
    """An `Engine` driven by a thread of this process, bridged to asyncio."""

    def __init__(self, engine: Engine, idle_wait_seconds: float = 0.05) -> None:
        self.engine = engine
        self.model_config = engine.model_config
        self._idle_wait = idle_wait_seconds
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_pretrained(cls, model_dir: Path | str, device: str = "cpu", dtype=None, **options) -> LocalEngine:
        return cls(Engine.from_pretrained(model_dir, device, dtype, **options))

    # --- the driver ------------------------------------------------------------------------------

    def start(self) -> None:
        """Run steps on a background thread until `shutdown`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self.engine.driven = True
        self._thread = threading.Thread(target=self._loop, name="longtail-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run steps on the calling thread until `stop` or `shutdown` from another thread.

        For a process whose thread that loaded the model stays alive (the engine process's main thread): libgomp
        throttles its spin-waiting once a second thread has run OpenMP regions while the first lives, and then
        every parallel region of a step waits on a futex (a decode step 1.3-1.5x slower on 2 cores,
        docs/serving.md). Stepping on the loading thread keeps one OpenMP team in the process.
        """
        self._stop.clear()
        self.engine.driven = True
        self._loop()

    def stop(self) -> None:
        """Make the step loop return after the step in flight; the engine stays up (`shutdown` ends it)."""
        self._stop.set()
        self.engine.wake.set()

    def _loop(self) -> None:
        engine = self.engine
        while not (self._stop.is_set() or engine.closed.is_set()):
            if not engine.has_work():
                engine.wake.wait(timeout=self._idle_wait)
                engine.wake.clear()
                continue
            try:
                if not engine.step():
                    # Waiting requests but nothing runnable (adapter loading, pool full): let the provider work.
                    engine.wake.wait(timeout=0.002)
                    engine.wake.clear()
            except Exception as error:  # a bug must not kill the node silently: fail what runs, go on
                log.exception("engine loop step failed")
                engine.fail_running(error)

    def shutdown(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.engine.driven = False
        self.engine.shutdown()

    # --- EngineClient ----------------------------------------------------------------------------

    async def stream(self, prompt_ids: Sequence[int], adapter_id: str | None, params: SamplingParams,
                     client: str | None = None) -> AsyncIterator[StreamEvent]:
        self.start()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def deliver(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop closed (its caller is gone): the cancel is on its way
                pass

        handle = self.engine.submit(prompt_ids, adapter_id, params, client=client, listener=deliver)
        finished = False
        try:
            while True:
                event = await events.get()
                if event.finish_reason is not None:
                    finished = True
                    if event.error is not None and not isinstance(event.error, RequestCancelled):
                        raise event.error
                    yield event
                    return
                yield event
        finally:
            if not finished:
                handle.cancel()

    async def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int], adapter_id: str | None,
                    client: str | None = None, background: bool = False) -> list[float]:
        if not output_ids:
            return []
        self.start()
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def on_event(event: StreamEvent) -> None:
            if event.finish_reason is None:
                return
            try:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:  # the loop closed while scoring: nobody waits for the answer
                pass

        handle = self.engine.submit_score(prompt_ids, output_ids, adapter_id, listener=on_event, client=client,
                                          background=background)
        try:
            await finished
        except BaseException:
            handle.cancel()
            raise
        return handle.scores()

    def add_adapter(self, peft_dir: Path | str, name: str | None = None) -> str:
        return self.engine.add_adapter(peft_dir, name)

    def remove_adapter(self, adapter_id: str) -> None:
        self.engine.remove_adapter(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()

    def stats(self) -> EngineStats:
        return self.engine.stats()


_drivers: weakref.WeakKeyDictionary[Engine, LocalEngine] = weakref.WeakKeyDictionary()


def as_client(engine: Engine | EngineClient) -> EngineClient:
    """A bare `Engine` (tests share one between nodes) gets its one thread driver; a client passes through."""
    if isinstance(engine, Engine):
        if engine not in _drivers:
            _drivers[engine] = LocalEngine(engine)
        return _drivers[engine]
    return engine
