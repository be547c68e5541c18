"""The engine in a child process, behind the same calls the node makes on an in-process `Engine`.

Why: the engine's step loop is Python between torch calls, and in the node's
process it holds the GIL a fair part of every step. Each receipt, voucher check
and HTTP write then waits for the GIL as well as for a core, which made a paid
request's own work several times slower under load than idle. In its own
process the engine keeps its GIL to itself; the node's process only parses,
signs and commits (the arrangement vLLM's V1 engine core uses too).

The mechanism is one `multiprocessing` pipe, pickled tuples both ways:
- parent → child: ("submit" | "score" | "cancel" | "add_adapter" | "remove_adapter" | "list_adapters" | "stats"
  | "shutdown", call id, arguments...);
- child → parent: ("event", call id, StreamEvent) for each token and the end of a stream, ("result", call id,
  value) or ("error", call id, exception) for everything else.
A reader thread in the parent hands each message to its call: an asyncio queue (streams, scorings, via
`call_soon_threadsafe`) or a waiting thread (adapter loads). Typed engine errors cross the pipe as themselves
(serving.errors defines how they pickle), so callers catch the same classes either way. If the child dies,
every call open at that moment fails with `EngineUnavailable`, and a new
child is started with the same model and the adapters the old one held.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from longtail.serving.errors import EngineError, EngineUnavailable, RequestCancelled
from longtail.serving.sampling import SamplingParams

log = logging.getLogger(__name__)

Deliver = Callable[[str, Any], None]   # (kind: "event" | "result" | "error", value)


def _serve(connection, model_dir: str, device: str, dtype, options: dict) -> None:
    """The child: load the engine, run its step thread, answer the parent until it says stop or goes away."""
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            try:
                connection.send(message)
            except (pickle.PicklingError, TypeError, AttributeError) as problem:
                # An error that does not pickle still ends its call, as text, instead of leaving it hanging.
                kind, call_id, value = message
                error = value.error if kind == "event" else value
                text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(problem)
                connection.send(("error", call_id, EngineError(text)))

    try:
        from longtail.serving.engine import Engine
        from longtail.serving.engine_client import LocalEngine

        engine = Engine.from_pretrained(model_dir, device=device, dtype=dtype, **options)
        driver = LocalEngine(engine)
    except BaseException as error:  # the parent raises it: a bad model folder is the operator's to fix
        send(("error", 0, error))
        return
    send(("result", 0, {"model_config": engine.model_config, "kv_blocks": engine.cache.pool.num_blocks}))
    handles: dict[int, Any] = {}

    def reply(call_id: int, work: Callable[[], Any]) -> None:
        try:
            send(("result", call_id, work()))
        except Exception as error:
            send(("error", call_id, error))

    def on_stream_event(call_id: int) -> Callable:
        def listener(event) -> None:
            if event.finish_reason is not None:
                handles.pop(call_id, None)
            send(("event", call_id, event))
        return listener

    def submit_score(call_id: int, prompt, output, adapter_id, client, background) -> None:
        submitted = threading.Event()
        box: list = []

        def on_finish(event) -> None:
            if event.finish_reason is None:
                return
            submitted.wait()  # the engine may finish before submit_score has returned the handle
            handles.pop(call_id, None)
            if event.error is not None:
                send(("error", call_id, event.error))
            else:
                send(("result", call_id, list(box[0].request.logprobs)))

        box.append(engine.submit_score(prompt, output, adapter_id, listener=on_finish, client=client,
                                       background=background))
        handles[call_id] = box[0]
        submitted.set()

    shutdown_call: list[int] = []

    def answer() -> None:
        while True:
            try:
                operation, call_id, *arguments = connection.recv()
            except (EOFError, OSError):  # the parent is gone: nobody is left to serve
                break
            try:
                if operation == "submit":
                    prompt, adapter_id, params, client = arguments
                    handles[call_id] = engine.submit(prompt, adapter_id, params, client=client,
                                                     listener=on_stream_event(call_id))
                elif operation == "score":
                    submit_score(call_id, *arguments)
                elif operation == "cancel":
                    handle = handles.get(call_id)
                    if handle is not None:
                        handle.cancel()
                elif operation in ("add_adapter", "remove_adapter", "list_adapters", "stats"):
                    # Store I/O and SQLite reads: off the receiving thread, so streams keep flowing meanwhile.
                    method = getattr(engine, operation)
                    threading.Thread(target=reply, args=(call_id, lambda m=method, a=arguments: m(*a)),
                                     daemon=True).start()
                elif operation == "shutdown":
                    shutdown_call.append(call_id)
                    break
                else:
                    send(("error", call_id, ValueError(f"unknown engine operation {operation!r}")))
            except Exception as error:  # a refused request (typed error) fails that call only
                send(("error", call_id, error))
        driver.stop()  # asked to, or the parent is gone: nobody is left to serve

    threading.Thread(target=answer, name="longtail-engine-connection", daemon=True).start()
    # The steps run on this thread, the one that loaded the model (LocalEngine.run says why).
    driver.run()
    driver.shutdown()
    if shutdown_call:
        send(("result", shutdown_call[0], None))


class EngineProcess:
    """An `Engine` in a child process, as an `EngineClient` (serving.engine_client).

    Blocks in the constructor until the model is loaded (or raises what the child raised). If the child dies,
    the calls open at that moment fail with `EngineUnavailable`, and a new child is started with the adapters
    the old one held (up to `max_restarts` within `restart_window_seconds`, so a crash loop ends in a clear
    error instead of a spin); calls made while it loads fail fast with the same error.
    """

    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype=None, start_timeout: float = 600.0,
                 max_restarts: int = 3, restart_window_seconds: float = 300.0, **options) -> None:
        self._spawn_arguments = (str(model_dir), device, dtype, options)
        self._start_timeout = start_timeout
        self._max_restarts, self._restart_window = max_restarts, restart_window_seconds
        self._restart_times: list[float] = []
        self.restarts = 0
        self._send_lock = threading.Lock()
        self._calls: dict[int, Deliver] = {}
        self._calls_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dead: EngineUnavailable | None = None
        self._closing = False
        self._adapter_paths: dict[str, str] = {}   # adapterId -> folder, replayed into a restarted child
        self._process, self._connection, ready = self._spawn()
        self.model_config = ready["model_config"]
        self.kv_blocks: int = ready["kv_blocks"]
        self._start_reader()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # --- plumbing --------------------------------------------------------------------------------

    def _spawn(self):
        """Start a child and wait until its engine is loaded: (process, connection, what it reported)."""
        model_dir, device, dtype, options = self._spawn_arguments
        context = multiprocessing.get_context("spawn")  # fork would copy the parent's threads' locks mid-use
        connection, child_end = context.Pipe(duplex=True)
        process = context.Process(target=_serve, name="longtail-engine", daemon=True,
                                  args=(child_end, model_dir, device, dtype, options))
        process.start()
        child_end.close()
        if not connection.poll(self._start_timeout):
            process.kill()
            raise EngineUnavailable(f"the engine process did not load {model_dir} within {self._start_timeout:.0f} s")
        try:
            kind, _, value = connection.recv()
        except EOFError:
            process.join(5)
            raise EngineUnavailable(f"the engine process exited with code {process.exitcode} while "
                                    f"loading {model_dir}") from None
        if kind == "error":
            process.join(5)
            raise value
        return process, connection, value

    def _start_reader(self) -> None:
        threading.Thread(target=self._read, args=(self._connection, self._process), name="longtail-engine-reader",
                         daemon=True).start()

    def _read(self, connection, process) -> None:
        while True:
            try:
                kind, call_id, value = connection.recv()
            except (EOFError, OSError):
                break
            with self._calls_lock:
                deliver = self._calls.get(call_id)
            if deliver is not None:
                deliver(kind, value)
        process.join(1)
        with self._calls_lock:
            self._dead = EngineUnavailable(f"the engine process exited (code {process.exitcode})")
            open_calls, self._calls = list(self._calls.values()), {}
        for deliver in open_calls:
            deliver("error", self._dead)
        if not self._closing:
            self._restart()

    def _restart(self) -> None:
        """A new child with the same model and adapters; the old one's exit is logged, not hidden."""
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < self._restart_window] + [now]
        if len(self._restart_times) > self._max_restarts:
            log.error("engine process died %d times within %.0f s: not restarting it",
                      len(self._restart_times), self._restart_window)
            self._dead = EngineUnavailable(f"the engine process keeps exiting ({len(self._restart_times)} times "
                                           f"within {self._restart_window:.0f} s); restart the node")
            return
        log.warning("engine process exited (code %s): starting a new one", self._process.exitcode)
        self._dead = EngineUnavailable("the engine process is restarting; retry shortly")
        try:
            process, connection, _ = self._spawn()
            for path in list(self._adapter_paths.values()):  # before anyone can reach it: no request sees a gap
                connection.send(("add_adapter", 0, path, None))
                kind, _, value = connection.recv()
                if kind == "error":
                    log.error("adapter %s could not be loaded into the new engine process: %s", path, value)
        except Exception as error:
            log.exception("engine process restart failed")
            self._dead = EngineUnavailable(f"the engine process could not be restarted: {error}")
            return
        with self._send_lock, self._calls_lock:
            self._process, self._connection = process, connection
            self.restarts += 1
            self._dead = None
        self._start_reader()

    def _open(self, deliver: Deliver) -> int:
        call_id = next(self._ids)
        with self._calls_lock:
            if self._dead is not None:
                raise self._dead
            self._calls[call_id] = deliver
        return call_id

    def _close(self, call_id: int) -> None:
        with self._calls_lock:
            self._calls.pop(call_id, None)

    def _end(self, call_id: int, cancel: bool) -> None:
        """Forget a call; one its caller left before the answer (`cancel`) is also cancelled in the child."""
        self._close(call_id)
        if cancel and self._dead is None:
            try:
                self._send(("cancel", call_id))
            except EngineUnavailable:
                pass

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._connection.send(message)
        except (OSError, ValueError) as error:  # a closed pipe: the child is gone
            raise self._dead or EngineUnavailable(f"the engine process is gone: {error}") from error

    def _call(self, operation: str, *arguments, timeout: float | None = None) -> Any:
        """A blocking request/response call (from a plain thread, never from the event loop)."""
        done = threading.Event()
        answer: list = []

        def deliver(kind: str, value: Any) -> None:
            answer.append((kind, value))
            done.set()

        call_id = self._open(deliver)
        try:
            self._send((operation, call_id, *arguments))
            if not done.wait(timeout):
                raise TimeoutError(f"engine call {operation} still running after {timeout} s")
        finally:
            self._close(call_id)
        kind, value = answer[0]
        if kind == "error":
            raise value
        return value

    @staticmethod
    def _to_queue(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Deliver:
        def deliver(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop closed: nobody waits for this call any more
                pass
        return deliver

    # --- what the node calls ---------------------------------------------------------------------

    def add_adapter(self, peft_dir: Path | str, name: str | None = None) -> str:
        """Validate and store a PEFT adapter in the child's tiers; its adapterId (blocking)."""
        adapter_id = self._call("add_adapter", str(peft_dir), name)
        self._adapter_paths[adapter_id] = str(peft_dir)
        return adapter_id

    def remove_adapter(self, adapter_id: str) -> None:
        self._call("remove_adapter", adapter_id)
        self._adapter_paths.pop(adapter_id, None)

    def list_adapters(self) -> list:
        return self._call("list_adapters", timeout=60)

    def stats(self):
        return self._call("stats", timeout=60)

    async def stream(self, prompt_ids: Sequence[int], adapter_id: str | None, params: SamplingParams,
                     client: str | None = None) -> AsyncIterator:
        """As `LocalEngine.stream`: events token by token; a refused request raises its typed error first;
        leaving early cancels the request in the child."""
        queue: asyncio.Queue = asyncio.Queue()
        call_id = self._open(self._to_queue(asyncio.get_running_loop(), queue))
        finished = False
        try:
            self._send(("submit", call_id, [int(t) for t in prompt_ids], adapter_id, params, client))
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    finished = True
                    raise value
                if value.finish_reason is not None:
                    finished = True
                    if value.error is not None and not isinstance(value.error, RequestCancelled):
                        raise value.error
                    yield value
                    return
                yield value
        finally:
            self._end(call_id, cancel=not finished)

    async def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int], adapter_id: str | None,
                    client: str | None = None, background: bool = False) -> list[float]:
        """As `LocalEngine.score`: log-probabilities of `output_ids`, scored inside the child's batch."""
        if not output_ids:
            return []
        queue: asyncio.Queue = asyncio.Queue()
        call_id = self._open(self._to_queue(asyncio.get_running_loop(), queue))
        answered = False
        try:
            self._send(("score", call_id, [int(t) for t in prompt_ids], [int(t) for t in output_ids], adapter_id,
                        client, background))
            kind, value = await queue.get()
            answered = True
            if kind == "error":
                raise value
            return value
        finally:
            self._end(call_id, cancel=not answered)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child's engine and wait for it to exit (killed if it does not); no restart follows."""
        self._closing = True
        if self._process.is_alive() and self._dead is None:
            try:
                self._call("shutdown", timeout=timeout)
            except (EngineUnavailable, TimeoutError):
                pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._connection.close()
