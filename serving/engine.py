"""The engine: one base model, many adapters, continuous batching over a paged KV cache.

`step()` is synchronous and owns all tensors: it takes new requests from a
thread-safe inbox, asks the scheduler what runs, hands the model runner one
flat batch of decode tokens and prompt chunks, samples, and emits events.
`generate()` and `score()` drive steps themselves when no driver runs; the
thread driver and the asyncio bridge the node uses live in
`serving.engine_client` (`LocalEngine`), beside the engine process, both behind
one `EngineClient` protocol. Scoring (`submit_score`, `score`) rides the same
batch: a scoring request is prefilled in chunks like any prompt, its logit
rows become the log-probabilities of the scored tokens, and it ends without
decoding.

Adapters always come through the tiers (`serving.adapter_tiers`): the engine
builds its `TieredAdapters` from a plain `TierConfig`, with its own `LoraSlots`
as the device tier; the number of adapters is bounded only by byte budgets.

KV blocks follow the scheduler's plan: a request gets the blocks its prefill
needs at admission and one more when its decoding crosses a block boundary; a
request the scheduler preempts gives its blocks back and later prefills its
prompt and output so far again (its sampler's generator goes on where it was,
and its listener sees each token once).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from longtail.serving.adapter_provider import AdapterInfo, AdapterProvider
from longtail.serving.adapter_tiers import PollResult, TierConfig, TieredAdapters
from longtail.serving.config import ModelConfig
from longtail.serving.errors import (
    AdapterLoadFailed,
    EngineError,
    InvalidTokenIds,
    KvCacheTooSmall,
    NonFiniteLogits,
    PromptTooLong,
    RequestCancelled,
    UnknownAdapter,
)
from longtail.serving.kv_cache import (
    CPU_ADAPTER_BYTES,
    CPU_KV_CACHE_BYTES,
    PagedKVCache,
    adapter_device_bytes,
    kv_pool_bytes,
    step_activation_bytes,
)
from longtail.serving.lora_slots import LoraSlots
from longtail.serving.model import LlamaModel
from longtail.serving.model_runner import ModelRunner, SequenceChunk
from longtail.serving.sampling import SamplingParams, sample_rows
from longtail.serving.scheduler import Request, Scheduler, State

log = logging.getLogger(__name__)


class Detokenizer(Protocol):
    """What the engine needs of a tokenizer: only decoding, for stop strings."""

    def decode(self, token_ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One new token of one request, or its end (finish_reason set; token_id None)."""

    request_id: int
    token_id: int | None
    logprob: float | None
    finish_reason: str | None = None
    error: Exception | None = None


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """A finished request. finish_reason: "stop" (EOS, stop token or string), "length", "cancelled" or "error"."""

    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    error: Exception | None = None
    ttft_seconds: float | None = None
    text: str | None = None    # decoded output, cut before a matched stop string; only with a tokenizer
    e2e_seconds: float | None = None  # from submit to finish


class RequestHandle:
    """What `submit` returns: the id, and a way to wait for or cancel the request."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine = engine
        self.request = request
        self.done = threading.Event()
        self.text: str | None = None

    @property
    def request_id(self) -> int:
        return self.request.request_id

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def wait(self, timeout: float | None = None) -> GenerationOutput:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} still running after {timeout} s")
        return self.output()

    def output(self) -> GenerationOutput:
        r = self.request
        return GenerationOutput(r.request_id, len(r.prompt_ids), list(r.output_ids), r.finish_reason or "length",
                                list(r.logprobs) if r.params.logprobs else None, r.error,
                                (r.first_token_at - r.arrival) if r.first_token_at else None, self.text,
                                (r.finished_at - r.arrival) if r.finished_at else None)


@dataclasses.dataclass(eq=False)
class ScoreRequest(Request):
    """A request that only prefills prompt + output[:-1]; its logprobs are those of the output tokens."""

    targets: list[int] = dataclasses.field(default_factory=list)  # the output tokens being scored

    @property
    def first_scored(self) -> int:
        """Index in `prompt_ids` of the row whose logits predict targets[0] (the prompt's last token)."""
        return len(self.prompt_ids) - len(self.targets)


class ScoreHandle(RequestHandle):
    """What `submit_score` returns: wait for the log-probability of each scored token."""

    def scores(self, timeout: float | None = None) -> list[float]:
        output = self.wait(timeout)
        if output.error is not None:
            raise output.error
        return list(self.request.logprobs)


def _failed_output(error: EngineError, prompt_tokens: int) -> GenerationOutput:
    return GenerationOutput(-1, prompt_tokens, [], "error", None, error)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """The engine at one instant (plain values: it crosses the engine process's pipe)."""

    kv_blocks: int
    free_kv_blocks: int
    running: int
    waiting: int
    steps: int
    tier_bytes: dict[str, int]          # device / host (/ disk): bytes of adapters resident
    tier_budget: dict[str, int]
    evictions: dict[str, int]           # per tier
    hits: dict[str, int]
    misses: dict[str, int]
    load_failures: int
    cold_wait_seconds: tuple[float, ...]  # recent cold waits (request admitted -> adapter usable)
    cold_wait_buckets: tuple[tuple[float, int], ...]  # all cold waits, cumulative per upper bound (seconds)
    cold_wait_sum: float
    cold_wait_count: int
    adapters: tuple[AdapterInfo, ...] = ()
    preemptions: int = 0                # running requests preempted for KV blocks since start (recomputed later)


def device_kv_cache_bytes(model: LlamaModel, fraction: float, adapter_bytes: int | None,
                          max_batch_tokens: int) -> tuple[int, int]:
    """(KV pool bytes, adapter device budget) on a CUDA device, from its free memory now (the weights loaded).

    `adapter_bytes` None: the adapter tier takes `kv_cache.ADAPTER_SHARE` of what the weights and a step leave.
    """
    # Loading fused q/k/v and gate/up by concatenation: the unfused originals sit in torch's allocator cache,
    # which the driver counts as used; handed back first, they count as free.
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(model.device)
    weights = model.config.parameter_count() * model.dtype.itemsize
    reserve = step_activation_bytes(model.config, max_batch_tokens, model.dtype)
    if adapter_bytes is None:
        adapter_bytes = adapter_device_bytes(free, total, fraction, weights, reserve)
    pool = kv_pool_bytes(free, total, fraction, weights, adapter_bytes, reserve)
    if pool <= 0:
        raise ValueError(f"no device memory left for the KV cache: {free} of {total} bytes free, fraction "
                         f"{fraction}, weights {weights}, adapter budget {adapter_bytes}, step reserve {reserve}")
    return pool, adapter_bytes


class Engine:
    def __init__(self, model: LlamaModel, kv_cache_bytes: int | None = None, max_batch_tokens: int = 2048,
                 max_running: int = 256, block_size: int = 16, adapters: TierConfig | None = None,
                 initial_adapter_slots: int = 16, tokenizer: Detokenizer | None = None,
                 min_prefill_chunk: int = 32, background_idle_seconds: float = 0.02,
                 gpu_memory_fraction: float = 0.9) -> None:
        self.model = model
        self.model_config: ModelConfig = model.config
        self.device = model.device
        adapters = adapters or TierConfig()
        if not 0.0 < gpu_memory_fraction <= 1.0:  # checked on every device, so a node's config fails the same way
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
        if model.device.type == "cuda" and (kv_cache_bytes is None or adapters.device_bytes is None):
            # On CUDA the pool and the adapter tier take what the device has left.
            pool, adapter_bytes = device_kv_cache_bytes(model, gpu_memory_fraction, adapters.device_bytes,
                                                        max_batch_tokens)
            kv_cache_bytes = pool if kv_cache_bytes is None else kv_cache_bytes
            adapters = dataclasses.replace(adapters, device_bytes=adapter_bytes)
        # A CPU's RAM is shared with everything else: fixed defaults (serving.kv_cache.CPU_KV_CACHE_BYTES).
        kv_cache_bytes = CPU_KV_CACHE_BYTES if kv_cache_bytes is None else kv_cache_bytes
        if adapters.device_bytes is None:
            adapters = dataclasses.replace(adapters, device_bytes=CPU_ADAPTER_BYTES)
        self.cache = PagedKVCache(model.config, kv_cache_bytes, block_size, model.device, model.dtype)
        # The slot table grows on demand: the device tier's byte budget, not a slot count, bounds the adapters.
        self.lora_slots = LoraSlots(model.config, initial_adapter_slots, device=model.device, dtype=model.dtype)
        self.runner = ModelRunner(model, self.cache, self.lora_slots)
        # What requests may hold: the pool less what the runner took for good (the CUDA graphs' scratch block).
        # A request is refused unless it fits this alone, which is what makes every admitted request finish.
        self.request_blocks = self.cache.pool.free_blocks
        self.adapters: AdapterProvider = TieredAdapters.from_config(adapters, model.config.module_shapes(),
                                                                     self.lora_slots)
        self.scheduler = Scheduler(max_batch_tokens, max_running, min_prefill_chunk, background_idle_seconds)
        self.tokenizer = tokenizer
        self.eos_token_ids = set(model.config.eos_token_ids)
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled: set[int] = set()
        self._handles: dict[int, RequestHandle] = {}
        self._listeners: dict[int, Callable[[StreamEvent], None]] = {}
        self._lock = threading.RLock()
        self.wake = threading.Event()  # set when work arrives: a driver waiting for work wakes on it
        self.driven = False  # True while a driver (engine_client.LocalEngine) runs steps on its own thread
        self.closed = threading.Event()  # set by shutdown: a driver stops stepping
        self.steps = 0
        self.preemptions = 0
        self._tokens_served: dict[str, int] = {}

    @classmethod
    def from_pretrained(cls, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                        **options) -> Engine:
        """Load a Llama/Mistral/Qwen2 checkpoint; options go to `Engine` (kv_cache_bytes, max_batch_tokens, ...)."""
        return cls(LlamaModel.from_pretrained(model_dir, device, dtype), **options)

    # --- adapters --------------------------------------------------------------------------------

    def add_adapter(self, peft_dir: Path | str, name: str | None = None) -> str:
        """Validate a PEFT adapter and store it; returns its adapterId. It reaches the device when a request
        wants it (safe while serving: no step lock is taken, the store's I/O runs beside the steps)."""
        return self.adapters.add(peft_dir, name)

    def remove_adapter(self, adapter_id: str) -> None:
        """Requests running on the adapter finish; waiting and new ones end with `UnknownAdapter` (404)."""
        if not self.adapters.knows(adapter_id):
            raise UnknownAdapter(adapter_id)
        self.adapters.remove(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every stored adapter with its tier, size, rank, loads, hits and tokens served."""
        return self.adapters.describe(dict(self._tokens_served))

    def stats(self) -> EngineStats:
        """Thread-safe (the node asks from a worker thread): the scheduler's counts are read between steps."""
        with self._lock:
            running, waiting = len(self.scheduler.running), self.scheduler.waiting() + self._inbox.qsize()
            free_blocks = self.cache.pool.free_blocks
        snapshot = self.adapters.metrics.snapshot()
        return EngineStats(self.cache.pool.num_blocks, free_blocks, running, waiting, self.steps, snapshot.bytes,
                           snapshot.budget, snapshot.evictions, snapshot.hits, snapshot.misses,
                           snapshot.load_failures, snapshot.load_latencies_s[-1000:], snapshot.cold_buckets,
                           snapshot.cold_sum_s, snapshot.cold_count, tuple(self.list_adapters()), self.preemptions)

    # --- requests --------------------------------------------------------------------------------

    def _validate(self, prompt: list[int], adapter_id: str | None, params: SamplingParams) -> None:
        params.validate()
        context = self.model_config.max_position_embeddings
        if not prompt:
            raise PromptTooLong(0, params.max_tokens, context)
        self._check_token_ids(prompt)
        if len(prompt) + params.max_tokens > context:
            raise PromptTooLong(len(prompt), params.max_tokens, context)
        self._check_adapter_and_pool(adapter_id, len(prompt) + params.max_tokens, "request")

    def _check_token_ids(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidTokenIds(bad[:5], self.model_config.vocab_size)

    def _check_adapter_and_pool(self, adapter_id: str | None, cached_tokens: int, what: str) -> None:
        """The adapter is known and `cached_tokens` fit in the whole KV pool (else it could never be admitted)."""
        if adapter_id is not None and not self.adapters.knows(adapter_id):
            raise UnknownAdapter(adapter_id)
        needed = self.cache.blocks_for(cached_tokens)
        if needed > self.request_blocks:
            raise KvCacheTooSmall(f"{what} needs {needed} KV blocks, the pool has {self.request_blocks} for requests")

    def submit(self, prompt_ids: Sequence[int], adapter_id: str | None, params: SamplingParams,
               listener: Callable[[StreamEvent], None] | None = None, client: str | None = None) -> RequestHandle:
        """Validate and queue one request (thread-safe); a bad request raises its typed error, nothing is queued.

        `client` names who asked, for fairness between clients of one adapter; `listener` gets every event on
        the engine's thread.
        """
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, adapter_id, params)
        request = Request(next(self._ids), prompt, adapter_id, params, client=client, generator=params.generator(),
                          arrival=time.perf_counter())
        return self._enqueue(RequestHandle(self, request), listener)

    def _enqueue(self, handle: RequestHandle, listener: Callable[[StreamEvent], None] | None):
        """Hand a validated request to the step loop; its adapter is prefetched meanwhile."""
        request = handle.request
        self._handles[request.request_id] = handle
        if listener is not None:
            self._listeners[request.request_id] = listener
        if request.adapter_id is not None:
            self.adapters.prefetch(request.adapter_id)
        self._inbox.put(request)
        self.wake.set()
        return handle

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step; its blocks return to the pool (thread-safe)."""
        self._cancelled.add(request_id)
        self.wake.set()

    # --- the step --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.waiting() > 0 or not self._inbox.empty()

    def _emit(self, request: Request, event: StreamEvent) -> None:
        listener = self._listeners.get(request.request_id)
        if listener is not None:
            listener(event)

    def _finish(self, request: Request, reason: str, error: Exception | None = None) -> None:
        request.state = State.FINISHED
        request.finished_at = time.perf_counter()
        request.finish_reason = reason
        request.error = error
        if request.blocks:
            if error is not None:
                # A failed request may have left NaN keys/values; decode attention reads a reused block's
                # unwritten tail (masked, but 0 * NaN is NaN), so its blocks go back clean.
                self.cache.scrub(request.blocks)
            self.cache.pool.release(request.blocks)
            request.blocks = []
        if request in self.scheduler.running:
            self.scheduler.running.remove(request)
            if request.adapter_id is not None:
                self.adapters.unpin(request.adapter_id)
        self._emit(request, StreamEvent(request.request_id, None, None, reason, error))
        self._listeners.pop(request.request_id, None)
        handle = self._handles.pop(request.request_id, None)
        if handle is not None:
            handle.done.set()

    def fail_running(self, error: Exception) -> None:
        """A step raised past its own guards (a bug): every running request ends with it; the driver goes on."""
        with self._lock:
            for request in list(self.scheduler.running):
                self._finish(request, "error", error)

    def _drain_inbox(self) -> None:
        while True:
            try:
                self.scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _apply_cancellations(self) -> None:
        if not self._cancelled:
            return
        cancelled, self._cancelled = self._cancelled, set()
        for request in list(self.scheduler.running):
            if request.request_id in cancelled:
                self._finish(request, "cancelled", RequestCancelled(f"request {request.request_id} was cancelled"))
        for request in self.scheduler.waiting_requests():
            if request.request_id in cancelled:
                self.scheduler.remove_waiting(request)
                self._finish(request, "cancelled", RequestCancelled(f"request {request.request_id} was cancelled"))

    def _fail_unloadable(self, polled: PollResult) -> None:
        """Requests waiting for an adapter whose load failed end with that load's error (typed, for the table)."""
        for adapter_id, error in polled.failed.items():
            if not isinstance(error, EngineError):  # a file, store or peer failure: "retry later", not a bug
                error = AdapterLoadFailed(adapter_id, f"{type(error).__name__}: {error}")
            waiting = list(self.scheduler.queues.get(adapter_id) or ())
            waiting += [r for r in self.scheduler.background if r.adapter_id == adapter_id]
            for request in waiting:
                self.scheduler.remove_waiting(request)
                self._finish(request, "error", error)

    def _adapter_ready(self, adapter_id: str | None) -> bool:
        if adapter_id is None:
            return True
        if not self.adapters.knows(adapter_id):
            return True  # removed while waiting: admitted, then failed with UnknownAdapter
        return self.adapters.slot_of(adapter_id) is not None

    def _blocks_needed(self, request: Request) -> int:
        """Blocks to admit `request`: its whole prefill, plus its first decoded token's position."""
        if isinstance(request, ScoreRequest):  # it never decodes: its prompt is all it keeps
            return self.cache.blocks_for(request.prefill_len)
        return self.cache.blocks_for(request.prefill_len + 1)

    def _blocks_to_grow(self, request: Request) -> int:
        """Blocks a decoding request lacks for the token it writes this step (at position `cached`)."""
        return max(0, self.cache.blocks_for(request.cached + 1) - len(request.blocks))

    def _release_preempted(self, request: Request) -> None:
        """The scheduler took `request` out of the batch: its blocks and its adapter pin go."""
        self.cache.pool.release(request.blocks)
        request.blocks = []
        if isinstance(request, ScoreRequest):  # its rows are all computed again
            request.logprobs.clear()
        if request.adapter_id is not None:
            self.adapters.unpin(request.adapter_id)
        self.preemptions += 1

    def _admit(self, request: Request) -> bool:
        if request.adapter_id is not None and not self.adapters.knows(request.adapter_id):
            self._finish(request, "error", UnknownAdapter(request.adapter_id))
            return False
        request.blocks = self.cache.pool.allocate(self._blocks_needed(request))
        request.state = State.RUNNING
        if request.adapter_id is not None:
            self.adapters.pin(request.adapter_id)
        self.scheduler.running.append(request)
        return True

    def step(self) -> int:
        """Run one scheduling step; returns the number of tokens processed (0: nothing could run)."""
        with self._lock:
            self._drain_inbox()
            self._apply_cancellations()
            demand = {key: len(queue) for key, queue in self.scheduler.queues.items() if key is not None and queue}
            self._fail_unloadable(self.adapters.poll(demand))
            plan = self.scheduler.schedule(self.cache.pool.free_blocks, self._blocks_needed, self._adapter_ready,
                                           self._blocks_to_grow)
            for request in plan.preempted:
                self._release_preempted(request)
            for request in plan.decode:
                grow = self._blocks_to_grow(request)
                if grow:
                    request.blocks.extend(self.cache.pool.allocate(grow))
            prefill = [(r, n) for r, n in plan.prefill if r.state is State.RUNNING or self._admit(r)]
            work: list[tuple[Request, int]] = [(r, 1) for r in plan.decode] + prefill
            chunks: list[SequenceChunk] = []
            ran: list[tuple[Request, int]] = []
            for request, count in work:
                slot = self._slot(request)
                if slot is None:
                    self._finish(request, "error", UnknownAdapter(request.adapter_id))
                    continue
                if request.prefilled:
                    tokens, logits_from = [request.output_ids[-1]], -1
                else:
                    tokens = request.prefill_tokens(request.cached, request.cached + count)
                    logits_from = self._logits_from(request, len(tokens))
                chunks.append(SequenceChunk(tokens, request.cached, request.blocks, slot, logits_from))
                ran.append((request, len(tokens)))
            if not chunks:
                return 0
            try:
                logits = self.runner.run(chunks)
            except Exception as error:  # a bug must fail this step's requests, not the engine
                log.exception("engine step failed; failing its %d requests", len(ran))
                for request, _ in ran:
                    self._finish(request, "error", error)
                return 0
            for request, count in ran:
                request.cached += count
            self._route_logits([r for r, _ in ran], chunks, logits)
            self.steps += 1
            return sum(len(c.token_ids) for c in chunks)

    @staticmethod
    def _logits_from(request: Request, count: int) -> int | None:
        """Which logit rows a prompt chunk of `count` tokens wants: the last one when the prompt ends here;
        for a scoring request, every row from the one that predicts its first scored token."""
        if isinstance(request, ScoreRequest):
            if request.cached + count <= request.first_scored:
                return None
            return max(0, request.first_scored - request.cached)
        return -1 if request.cached + count == request.prefill_len else None

    def _route_logits(self, requests: list[Request], chunks: list[SequenceChunk], logits: torch.Tensor) -> None:
        """One sampled row per generating request; a scoring request's rows go to `_score_rows`."""
        sampled: list[Request] = []
        sampled_rows: list[int] = []
        scored: list[tuple[ScoreRequest, int, int]] = []
        offset = 0
        for request, chunk in zip(requests, chunks, strict=True):
            rows = chunk.logit_rows
            if isinstance(request, ScoreRequest):
                scored.append((request, offset, rows))
            elif rows:
                sampled.append(request)
                sampled_rows.append(offset)
            offset += rows
        if scored:
            self._score_rows(scored, logits)
            logits = logits[torch.tensor(sampled_rows, dtype=torch.int64, device=logits.device)]
        self._sample_all(sampled, logits)

    def _score_rows(self, scored: list[tuple[ScoreRequest, int, int]], logits: torch.Tensor) -> None:
        """Log-softmax + gather of each scoring request's target tokens; a request ends once its prompt has run."""
        index: list[int] = []
        targets: list[int] = []
        values: list[float] = []
        finite_rows: list[bool] = []
        for request, offset, rows in scored:
            done = len(request.logprobs)
            index.extend(range(offset, offset + rows))
            targets.extend(request.targets[done:done + rows])
        if index:
            rows_index = torch.tensor(index, dtype=torch.int64, device=logits.device)
            wanted = logits[rows_index]
            finite = torch.isfinite(wanted.sum(dim=-1))
            target_ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
            picked = torch.log_softmax(wanted, dim=-1).gather(1, target_ids[:, None])[:, 0]
            values, finite_rows = picked.tolist(), finite.tolist()
        position = 0
        for request, _, rows in scored:
            if not all(finite_rows[position:position + rows]):
                self._finish(request, "error", NonFiniteLogits(request.request_id))
            else:
                request.logprobs.extend(values[position:position + rows])
                if request.prefilled:
                    self._finish(request, "stop")
            position += rows

    def _slot(self, request: Request) -> int | None:
        """The request's adapter slot, -1 for the base model, None if its adapter left the device."""
        if request.adapter_id is None:
            return -1
        return self.adapters.slot_of(request.adapter_id)

    def _sample_all(self, requests: list[Request], logits: torch.Tensor) -> None:
        if not requests:
            return
        now = time.perf_counter()
        # The sampler's one device read per step also says which rows could not be sampled; only for those is
        # the row read again, to tell a model that produced NaN/inf (NonFiniteLogits) from a sampler failure.
        picks = sample_rows(logits, [r.params for r in requests], [r.generator for r in requests])
        for row, (request, pick) in enumerate(zip(requests, picks, strict=True)):
            if isinstance(pick, Exception):  # this row's sampler failed: only its request ends (issue 21)
                finite = bool(torch.isfinite(logits[row].sum()))
                self._finish(request, "error", pick if finite else NonFiniteLogits(request.request_id))
                continue
            token, logprob = pick
            request.output_ids.append(token)
            if request.adapter_id is not None:
                self._tokens_served[request.adapter_id] = self._tokens_served.get(request.adapter_id, 0) + 1
            if request.params.logprobs:
                request.logprobs.append(logprob)
            if request.first_token_at is None:
                request.first_token_at = now
            self._emit(request, StreamEvent(request.request_id, token, logprob))
            params = request.params
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
                self._finish(request, "stop")
            elif self._hit_stop_string(request):
                self._finish(request, "stop")
            elif len(request.output_ids) >= params.max_tokens:
                self._finish_with_text(request, "length")

    def _hit_stop_string(self, request: Request) -> bool:
        """With a tokenizer: True (and the handle's text cut) when the decoded output holds a stop string."""
        if self.tokenizer is None:
            return False
        handle = self._handles.get(request.request_id)
        text = self.tokenizer.decode(request.output_ids)
        cut = min((text.find(s) for s in request.params.stop if s in text), default=-1)
        if handle is not None:
            handle.text = text if cut < 0 else text[:cut]
        return cut >= 0

    def _finish_with_text(self, request: Request, reason: str) -> None:
        handle = self._handles.get(request.request_id)
        if handle is not None and self.tokenizer is not None and handle.text is None:
            handle.text = self.tokenizer.decode(request.output_ids)
        self._finish(request, reason)

    def submit_score(self, prompt_ids: Sequence[int], output_ids: Sequence[int], adapter_id: str | None,
                     listener: Callable[[StreamEvent], None] | None = None,
                     client: str | None = None, background: bool = False) -> ScoreHandle:
        """Queue the scoring of `output_ids` after `prompt_ids` under `adapter_id` (None = the base); thread-safe.

        It runs inside the continuous batch like a prompt (chunked, fair, never holding the step lock between
        steps), so it neither waits for the engine to go idle nor changes other requests' tokens. The
        listener gets only the finish event. The node uses it for adapter credit, as `background` work: it
        joins steps that run anyway and starts one alone only after the engine idled (serving.scheduler).
        """
        prompt = [int(t) for t in prompt_ids]
        targets = [int(t) for t in output_ids]
        if not targets:
            raise ValueError("nothing to score: output_ids is empty")
        # The last output token predicts nothing we score, so it is not run.
        tokens = prompt + targets[:-1]
        context = self.model_config.max_position_embeddings
        if not prompt or len(tokens) > context:
            raise PromptTooLong(len(prompt), len(targets), context)
        self._check_token_ids(tokens)
        self._check_adapter_and_pool(adapter_id, len(tokens), "scoring")
        request = ScoreRequest(next(self._ids), tokens, adapter_id, SamplingParams(max_tokens=1, logprobs=True),
                               client=client, arrival=self.scheduler.clock(), targets=targets,
                               background=background)
        return self._enqueue(ScoreHandle(self, request), listener)

    def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int], adapter_id: str | None) -> list[float]:
        """Log-probability of each output token after the prompt, under `adapter_id` (None = the base).

        Blocking: `submit_score`, then wait (driving steps itself when no engine thread runs).
        """
        if not output_ids:
            return []
        handle = self.submit_score(prompt_ids, output_ids, adapter_id)
        if not self.driven:
            while not handle.done.is_set():
                if not self.step():
                    if not self.has_work():
                        break
                    time.sleep(0.001)  # waiting on an adapter load or on blocks: let the provider's thread run
        return handle.scores()

    # --- drivers ---------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[GenerationOutput]:
        """Run requests to completion, outputs in prompt order.

        A request with bad input (unknown adapter, too long, bad params) comes back with finish_reason
        "error" and its typed error; the others run.
        """
        if len(prompts) != len(adapters):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(all_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(all_params)} sampling params")
        handles: list[RequestHandle | GenerationOutput] = []
        for prompt, adapter, sampling in zip(prompts, adapters, all_params, strict=True):
            try:
                handles.append(self.submit(prompt, adapter, sampling))
            except EngineError as error:
                handles.append(_failed_output(error, len(prompt)))
        running = [h for h in handles if isinstance(h, RequestHandle)]
        if not self.driven:
            while not all(h.done.is_set() for h in running):
                if not self.step():
                    if not self.has_work():
                        break
                    time.sleep(0.001)  # waiting on an adapter load or on blocks: let the provider's thread run
        return [h.wait() if isinstance(h, RequestHandle) else h for h in handles]

    def shutdown(self) -> None:
        """End the engine: a driver stepping it stops, the adapter loaders stop (a private adapter store goes)."""
        self.closed.set()
        self.wake.set()
        self.adapters.close()


def perplexity(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))
