"""The engine: one base model, many adapters, continuous batching over a paged KV cache.

`step()` is synchronous and owns all tensors: it takes new requests from a
thread-safe inbox, asks the scheduler what runs, builds one flat batch of
prefill and decode tokens, runs the model once, samples, and emits events.
`start()` runs steps on a background thread; `stream()` bridges its events to
asyncio; `generate()` drives steps itself when no thread runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import torch

from kernels import token_groups
from serving.adapter_provider import AdapterProvider, ResidentAdapters
from serving.config import ModelConfig
from serving.errors import KvCacheTooSmall, NonFiniteLogits, PromptTooLong, RequestCancelled, UnknownAdapter
from serving.kv_cache import PagedKVCache
from serving.lora_slots import LoraSlots
from serving.model import BatchPlan, LlamaModel, PrefillSegment
from serving.sampling import SamplingParams, sample
from serving.scheduler import Request, Scheduler, State


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One new token of one request, or its end (finish_reason set, token_id None on errors)."""

    request_id: int
    token_id: int | None
    logprob: float | None
    finish_reason: str | None = None
    error: Exception | None = None


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    error: Exception | None = None
    ttft_seconds: float | None = None


class RequestHandle:
    """What `submit` returns: the id, and a way to wait for or cancel the request."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine = engine
        self.request = request
        self.done = threading.Event()

    @property
    def request_id(self) -> int:
        return self.request.request_id

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def output(self) -> GenerationOutput:
        r = self.request
        return GenerationOutput(r.request_id, len(r.prompt_ids), list(r.output_ids), r.finish_reason or "length",
                                list(r.logprobs) if r.params.logprobs else None, r.error,
                                (r.first_token_at - r.arrival) if r.first_token_at else None)


class Engine:
    def __init__(self, model: LlamaModel, kv_cache_bytes: int = 256 * 2**20, max_batch_tokens: int = 2048,
                 max_running: int = 256, max_adapters: int = 64, block_size: int = 16, max_rank: int = 256,
                 adapter_provider: AdapterProvider | None = None) -> None:
        self.model = model
        self.model_config: ModelConfig = model.config
        self.device = model.device
        self.cache = PagedKVCache(model.config, kv_cache_bytes, block_size, model.device, model.dtype)
        self.lora_slots = LoraSlots(model.config, max_adapters, device=model.device, dtype=model.dtype)
        self.adapters = adapter_provider or ResidentAdapters(self.lora_slots, max_rank)
        self.scheduler = Scheduler(max_batch_tokens, max_running)
        self.eos_token_ids = set(model.config.eos_token_ids)
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled: set[int] = set()
        self._handles: dict[int, RequestHandle] = {}
        self._listeners: dict[int, Callable[[StreamEvent], None]] = {}
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.steps = 0

    @classmethod
    def from_pretrained(cls, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                        **options) -> Engine:
        return cls(LlamaModel.from_pretrained(model_dir, device, dtype), **options)

    # --- adapters --------------------------------------------------------------------------------

    def add_adapter(self, peft_dir: Path | str) -> str:
        """Validate and load a PEFT adapter; returns its adapterId (hot add: safe while serving)."""
        with self._lock:
            return self.adapters.add(peft_dir)

    def remove_adapter(self, adapter_id: str) -> None:
        with self._lock:
            self.adapters.remove(adapter_id)

    # --- requests --------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], adapter_id: str | None, params: SamplingParams,
               listener: Callable[[StreamEvent], None] | None = None) -> RequestHandle:
        """Validate and queue one request; errors here are the caller's (typed), nothing is queued."""
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise PromptTooLong(0, params.max_tokens, self.model_config.max_position_embeddings)
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt):
            raise ValueError(f"prompt holds token ids outside [0, {self.model_config.vocab_size})")
        context = self.model_config.max_position_embeddings
        if len(prompt) + params.max_tokens > context:
            raise PromptTooLong(len(prompt), params.max_tokens, context)
        if adapter_id is not None and not self.adapters.knows(adapter_id):
            raise UnknownAdapter(adapter_id)
        needed = self.cache.blocks_for(len(prompt) + params.max_tokens)
        if needed > self.cache.pool.num_blocks:
            raise KvCacheTooSmall(f"request needs {needed} KV blocks, the pool has {self.cache.pool.num_blocks}")
        request = Request(next(self._ids), prompt, adapter_id, params, generator=params.generator(),
                          arrival=time.perf_counter())
        handle = RequestHandle(self, request)
        self._handles[request.request_id] = handle
        if listener is not None:
            self._listeners[request.request_id] = listener
        if adapter_id is not None:
            self.adapters.prefetch(adapter_id)
        self._inbox.put(request)
        self._wake.set()
        return handle

    def cancel(self, request_id: int) -> None:
        self._cancelled.add(request_id)
        self._wake.set()

    # --- the step --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.waiting() > 0 or not self._inbox.empty()

    def _emit(self, request: Request, event: StreamEvent) -> None:
        listener = self._listeners.get(request.request_id)
        if listener is not None:
            listener(event)

    def _finish(self, request: Request, reason: str, error: Exception | None = None) -> None:
        request.state = State.FINISHED
        request.finish_reason = reason
        request.error = error
        if request.blocks:
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

    def _drain_inbox(self) -> None:
        while True:
            try:
                self.scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _apply_cancellations(self) -> None:
        if not self._cancelled:
            return
        for request in list(self.scheduler.running):
            if request.request_id in self._cancelled:
                self._finish(request, "cancelled", RequestCancelled())
        for waiting in list(self.scheduler.queues.values()):
            for request in list(waiting):
                if request.request_id in self._cancelled:
                    self.scheduler.remove_waiting(request)
                    self._finish(request, "cancelled", RequestCancelled())
        self._cancelled.clear()

    def _fail_unloadable(self, polled) -> None:
        """Requests waiting for an adapter whose load failed end with that load's error."""
        failed = getattr(polled, "failed", None)
        if not failed:
            return
        for adapter_id, error in failed.items():
            queue_ = self.scheduler.queues.get(adapter_id)
            for request in list(queue_ or ()):
                self.scheduler.remove_waiting(request)
                self._finish(request, "error", error)

    def _adapter_ready(self, adapter_id: str | None) -> bool:
        if adapter_id is None:
            return True
        if not self.adapters.knows(adapter_id):
            return True  # removed while waiting: admitted, then failed with UnknownAdapter
        return self.adapters.slot_of(adapter_id) is not None

    def step(self) -> int:
        """Run one scheduling step; returns the number of tokens processed."""
        with self._lock:
            self._drain_inbox()
            self._apply_cancellations()
            self._fail_unloadable(self.adapters.poll())
            plan = self.scheduler.schedule(
                self.cache.pool.free_blocks,
                lambda r: self.cache.blocks_for(len(r.prompt_ids) + r.params.max_tokens),
                self._adapter_ready)
            for request in plan.prefill:
                if request.adapter_id is not None and not self.adapters.knows(request.adapter_id):
                    self._finish(request, "error", UnknownAdapter(request.adapter_id))
                    continue
                request.blocks = self.cache.pool.allocate(
                    self.cache.blocks_for(len(request.prompt_ids) + request.params.max_tokens))
                request.state = State.RUNNING
                if request.adapter_id is not None:
                    self.adapters.pin(request.adapter_id)
                self.scheduler.running.append(request)
            prefill = [r for r in plan.prefill if r.state is State.RUNNING]
            if not plan.decode and not prefill:
                return 0
            batch = self._build_batch(plan.decode, prefill)
            with torch.inference_mode():
                logits = self.model.forward(batch, self.cache, self.lora_slots)
            self._sample_all(plan.decode + prefill, logits)
            self.steps += 1
            return int(batch.input_ids.numel())

    def _build_batch(self, decode: list[Request], prefill: list[Request]) -> BatchPlan:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        token_slots: list[int] = []
        segments: list[PrefillSegment] = []
        gathers: list[torch.Tensor] = []
        logits_index: list[int] = []
        for request in decode:
            position = request.total_tokens - 1
            ids.append(request.output_ids[-1])
            positions.append(position)
            slots.append(self.cache.slot_indices(request.blocks, position, position + 1))
            token_slots.append(self._slot(request))
            gathers.append(self.cache.slot_indices(request.blocks, 0, position + 1))
            logits_index.append(len(ids) - 1)
        decode_count = len(ids)
        for request in prefill:
            start = len(ids)
            length = len(request.prompt_ids)
            ids.extend(request.prompt_ids)
            positions.extend(range(length))
            slots.append(self.cache.slot_indices(request.blocks, 0, length))
            token_slots.extend([self._slot(request)] * length)
            segments.append(PrefillSegment(start, length, 0, self.cache.slot_indices(request.blocks, 0, length)))
            logits_index.append(start + length - 1)
        device = self.device
        width = max((g.numel() for g in gathers), default=0)
        decode_gather = torch.zeros(decode_count, width, dtype=torch.int64)
        decode_mask = torch.zeros(decode_count, width, dtype=torch.bool)
        for row, gather in enumerate(gathers):
            decode_gather[row, : gather.numel()] = gather
            decode_mask[row, : gather.numel()] = True
        token_slot_tensor = torch.tensor(token_slots, dtype=torch.int64, device=device)
        return BatchPlan(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            write_slots=torch.cat(slots).to(device),
            token_slots=token_slot_tensor,
            lora_groups=token_groups(token_slot_tensor) if any(s >= 0 for s in token_slots) else [],
            prefill=[dataclasses.replace(s, gather=s.gather.to(device)) for s in segments],
            decode_tokens=torch.arange(decode_count, dtype=torch.int64, device=device),
            decode_gather=decode_gather.to(device), decode_mask=decode_mask.to(device),
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
        )

    def _slot(self, request: Request) -> int:
        if request.adapter_id is None:
            return -1
        slot = self.adapters.slot_of(request.adapter_id)
        return -1 if slot is None else slot

    def _sample_all(self, requests: list[Request], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        for request, row in zip(requests, logits, strict=True):
            if request.state is not State.RUNNING:
                continue
            if not bool(torch.isfinite(row).all()):
                self._finish(request, "error", NonFiniteLogits(request.request_id))
                continue
            token, logprob = sample(row, request.params, request.generator)
            request.output_ids.append(token)
            if request.params.logprobs:
                request.logprobs.append(logprob)
            if request.first_token_at is None:
                request.first_token_at = now
            self._emit(request, StreamEvent(request.request_id, token, logprob))
            if not request.params.ignore_eos and (token in self.eos_token_ids or token in request.params.stop_token_ids):
                self._finish(request, "stop")
            elif len(request.output_ids) >= request.params.max_tokens:
                self._finish(request, "length")

    def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int], adapter_id: str | None) -> list[float]:
        """Log-probability of each output token after the prompt, under `adapter_id` (None = the base).

        One prefill-shaped forward; it holds the step lock, so it runs between two steps of the batch.
        The node uses it for adapter credit: the same output scored by the base model.
        """
        tokens = [int(t) for t in prompt_ids] + [int(t) for t in output_ids]
        if not output_ids:
            return []
        with self._lock:
            slot = -1
            if adapter_id is not None:
                slot = self.adapters.slot_of(adapter_id)
                if slot is None:
                    raise UnknownAdapter(adapter_id)
            blocks = self.cache.pool.allocate(self.cache.blocks_for(len(tokens)))
            try:
                slots = self.cache.slot_indices(blocks, 0, len(tokens)).to(self.device)
                token_slots = torch.full((len(tokens),), slot, dtype=torch.int64, device=self.device)
                plan = BatchPlan(
                    input_ids=torch.tensor(tokens, dtype=torch.int64, device=self.device),
                    positions=torch.arange(len(tokens), device=self.device), write_slots=slots,
                    token_slots=token_slots, lora_groups=token_groups(token_slots) if slot >= 0 else [],
                    prefill=[PrefillSegment(0, len(tokens), 0, slots)],
                    decode_tokens=torch.zeros(0, dtype=torch.int64, device=self.device),
                    decode_gather=torch.zeros(0, 0, dtype=torch.int64, device=self.device),
                    decode_mask=torch.zeros(0, 0, dtype=torch.bool, device=self.device),
                    logits_index=torch.arange(len(prompt_ids) - 1, len(tokens) - 1, device=self.device))
                with torch.inference_mode():
                    logits = self.model.forward(plan, self.cache, self.lora_slots)
            finally:
                self.cache.pool.release(blocks)
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([int(t) for t in output_ids])
        return log_probs[torch.arange(len(output_ids)), targets].tolist()

    # --- drivers ---------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[GenerationOutput]:
        """Run a batch to completion; invalid requests raise before anything is queued."""
        if len(prompts) != len(adapters):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        handles = [self.submit(p, a, sp) for p, a, sp in zip(prompts, adapters, all_params, strict=True)]
        if self._thread is None:
            while not all(h.done.is_set() for h in handles):
                self.step()
        for handle in handles:
            handle.done.wait()
        return [h.output() for h in handles]

    def start(self) -> None:
        """Run steps on a background thread (the node's mode)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="longtail-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.has_work():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as error:  # a bug must not kill the node silently: fail what runs, go on
                for request in list(self.scheduler.running):
                    self._finish(request, "error", error)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    async def stream(self, prompt_ids: Sequence[int], adapter_id: str | None,
                     params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Yield this request's events as the background thread produces them; cancels on exit."""
        self.start()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        handle = self.submit(prompt_ids, adapter_id, params,
                             listener=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
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


def perplexity(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))
