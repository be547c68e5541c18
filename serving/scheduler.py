"""Continuous batching policy: which requests run this step, and how many prompt tokens each. No tensors here.

Policy (docs/serving.md):
- every running request that has finished its prompt decodes one token per step;
- running requests still in their prompt continue it (chunked prefill) from the
  step's token budget, oldest first;
- then waiting requests are admitted round-robin across adapter queues (the
  base model is one queue) and, inside a queue, round-robin across clients,
  FCFS per client, while the budget, the running cap and the KV pool allow, and
  only when the queue's adapter is ready on the device. Both round-robin
  pointers move past the last one served, so a popular adapter cannot starve a
  rare one and a client flooding one adapter cannot starve another client of it;
- a request is admitted when the KV blocks for what it prefills now (its prompt,
  and the next token) are free; a decoding request takes one more block each
  time it crosses a block boundary. When one needs a block and none is free,
  the most recently admitted running request is preempted (vLLM's rule):
  it gives its blocks back and returns to the head of its waiting queue with
  the tokens it generated, which it prefills again with its prompt when it is
  readmitted (recompute). The oldest running request is never preempted for a
  younger one, and a request that fits the pool alone always fits, so every
  request finishes. No request is admitted in a step that preempted one, nor
  while a preempted request at the head of its queue waits for blocks (so the
  newcomers of other adapters cannot keep it out);
- background requests (the node's adapter-credit scorings: evidence, not
  answers) wait in a queue of their own, FCFS, and are admitted only into a
  step that runs other work anyway, or once the oldest has waited
  `background_idle_seconds` with nothing else to run. They never start a step
  of their own while answers may be about to arrive, and they never delay one
  (they take the budget the step's other work leaves).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from longtail.serving.sampling import SamplingParams


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request as the engine tracks it (mutable: it advances every step)."""

    request_id: int
    prompt_ids: list[int]
    adapter_id: str | None
    params: SamplingParams
    client: str | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    state: State = State.WAITING
    blocks: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0                 # tokens whose keys/values are in the cache
    finish_reason: str | None = None
    error: Exception | None = None
    generator: object = None
    arrival: float = 0.0
    background: bool = False        # admitted only beside other work, or after an idle wait (module docstring)
    first_token_at: float | None = None
    finished_at: float | None = None
    # Output tokens generated before the last preemption: prefilled again after the prompt when readmitted.
    recomputed_outputs: int = 0
    preemptions: int = 0

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to put in the cache before decoding: the prompt, and after a preemption the earlier output."""
        return len(self.prompt_ids) + self.recomputed_outputs

    @property
    def prefilled(self) -> bool:
        return self.cached >= self.prefill_len

    def prefill_tokens(self, start: int, stop: int) -> list[int]:
        """Positions [start, stop) of the prompt followed by the recomputed output."""
        prompt = len(self.prompt_ids)
        if stop <= prompt:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - prompt):stop - prompt]

    def preempt(self) -> None:
        """Back to waiting with no cache: everything generated so far is prefilled again on readmission."""
        self.state = State.WAITING
        self.cached = 0
        self.recomputed_outputs = len(self.output_ids)
        self.preemptions += 1


@dataclasses.dataclass(frozen=True)
class StepPlan:
    decode: list[Request]                 # one token each
    prefill: list[tuple[Request, int]]    # (request, prompt tokens this step), continuing prompts first
    # Taken out of the running batch this step (back at the head of their queues): their blocks go back.
    preempted: list[Request] = dataclasses.field(default_factory=list)


class AdapterQueue:
    """The waiting requests of one adapter: FCFS per client, round-robin across clients."""

    def __init__(self) -> None:
        self.by_client: OrderedDict[str | None, deque[Request]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_client.values())

    def __iter__(self):
        for queue in self.by_client.values():
            yield from queue

    def append(self, request: Request) -> None:
        self.by_client.setdefault(request.client, deque()).append(request)

    def push_front(self, request: Request) -> None:
        """A preempted request goes first: at the head of its client's queue, its client first in the rotation."""
        self.by_client.setdefault(request.client, deque()).appendleft(request)
        self.by_client.move_to_end(request.client, last=False)

    def head(self) -> Request:
        return next(iter(self.by_client.values()))[0]

    def pop_head(self) -> Request:
        client, queue = next(iter(self.by_client.items()))
        request = queue.popleft()
        # The client just served goes to the back of the rotation.
        del self.by_client[client]
        if queue:
            self.by_client[client] = queue
        return request

    def remove(self, request: Request) -> bool:
        queue = self.by_client.get(request.client)
        if queue is None or request not in queue:
            return False
        queue.remove(request)
        if not queue:
            del self.by_client[request.client]
        return True


@dataclasses.dataclass
class _Room:
    """What is left of one step for new requests: KV blocks and prompt tokens."""

    blocks_free: int
    budget: int
    blocks_needed: Callable[[Request], int]
    min_prefill_chunk: int

    def take(self, request: Request) -> int | None:
        """Admit `request` if its KV blocks fit and its whole prompt, or at least `min_prefill_chunk` tokens of it,
        fit in the budget: returns the tokens it prefills now (and holds its room), else None."""
        need, prompt = self.blocks_needed(request), request.prefill_len - request.cached
        chunk = min(prompt, self.budget)
        if need > self.blocks_free or (chunk < prompt and chunk < self.min_prefill_chunk):
            return None
        self.blocks_free -= need
        self.budget -= chunk
        return chunk


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_running: int, min_prefill_chunk: int = 32,
                 background_idle_seconds: float = 0.02, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_batch_tokens < 1 or max_running < 1:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) and max_running ({max_running}) must be >= 1")
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        # A new request is admitted with a partial prompt only if at least this many of its tokens fit now.
        self.min_prefill_chunk = min_prefill_chunk
        self.background_idle_seconds = background_idle_seconds
        self.clock = clock  # the clock of Request.arrival
        self.queues: OrderedDict[str | None, AdapterQueue] = OrderedDict()
        self.background: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if request.background:
            self.background.append(request)
        else:
            self.queues.setdefault(request.adapter_id, AdapterQueue()).append(request)

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values()) + len(self.background)

    def waiting_requests(self) -> list[Request]:
        return [r for q in self.queues.values() for r in q] + list(self.background)

    def remove_waiting(self, request: Request) -> bool:
        if request.background:
            if request in self.background:
                self.background.remove(request)
                return True
            return False
        queue = self.queues.get(request.adapter_id)
        return bool(queue) and queue.remove(request)

    def schedule(self, blocks_free: int, blocks_needed: Callable[[Request], int],
                 adapter_ready: Callable[[str | None], bool],
                 blocks_to_grow: Callable[[Request], int] = lambda request: 0) -> StepPlan:
        """Pick this step's work. From the engine: `blocks_needed(r)`, the blocks a waiting request needs to be
        admitted; `blocks_to_grow(r)`, the blocks a decoding request needs for this step's token;
        `adapter_ready(adapter_id)`. The plan's decode requests may take their growth from the free blocks,
        once the preempted requests' blocks are back."""
        blocks_free, preempted = self._grow(blocks_free, blocks_to_grow)
        decode = [r for r in self.running if r.prefilled]
        budget = self.max_batch_tokens - len(decode)
        prefill: list[tuple[Request, int]] = []
        for request in self.running:
            if not request.prefilled and budget > 0:
                chunk = min(request.prefill_len - request.cached, budget)
                prefill.append((request, chunk))
                budget -= chunk
        if preempted:  # the pool is short: what was just freed goes to the running requests' next blocks
            return StepPlan(decode, prefill, preempted)
        room = _Room(blocks_free, budget, blocks_needed, self.min_prefill_chunk)
        admitted = self._admit(room, adapter_ready)
        for key in [k for k, q in self.queues.items() if not q]:
            del self.queues[key]
        if self.background and (decode or prefill or admitted or
                                self.clock() - self.background[0].arrival >= self.background_idle_seconds):
            admitted += self._admit_background(room, adapter_ready, len(self.running) + len(admitted))
        return StepPlan(decode, prefill + admitted)

    def _grow(self, blocks_free: int, blocks_to_grow: Callable[[Request], int]) -> tuple[int, list[Request]]:
        """Give each decoding request, oldest first, the blocks its next token needs; when none are free, preempt
        the most recently admitted running request (possibly the one asking) until they are.
        Returns the blocks left free and the preempted requests."""
        preempted: list[Request] = []
        for request in list(self.running):
            if request.state is not State.RUNNING:  # preempted below for an older request: so is all after it
                break
            need = blocks_to_grow(request) if request.prefilled else 0
            while need > blocks_free:
                victim = self.running.pop()
                blocks_free += len(victim.blocks)
                victim.preempt()
                self._requeue(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.state is State.RUNNING:
                blocks_free -= need
        return blocks_free, preempted

    def _requeue(self, request: Request) -> None:
        """A preempted request waits at the head of its queue, and its queue is first in the rotation."""
        if request.background:
            self.background.appendleft(request)
            return
        self.queues.setdefault(request.adapter_id, AdapterQueue()).push_front(request)
        self.queues.move_to_end(request.adapter_id, last=False)

    def _admit_background(self, room: _Room, adapter_ready, running: int) -> list[tuple[Request, int]]:
        """FCFS from the background queue into what the step leaves; the head waits if it does not fit."""
        admitted: list[tuple[Request, int]] = []
        while self.background and room.budget > 0 and running + len(admitted) < self.max_running:
            request = self.background[0]
            chunk = room.take(request) if adapter_ready(request.adapter_id) else None
            if chunk is None:
                break
            self.background.popleft()
            admitted.append((request, chunk))
        return admitted

    def _admit(self, room: _Room, adapter_ready) -> list[tuple[Request, int]]:
        order = [k for k, q in self.queues.items() if q]  # least recently served adapter first
        admitted: list[tuple[Request, int]] = []
        served: list[str | None] = []
        progressed = True
        while progressed and room.budget > 0 and len(self.running) + len(admitted) < self.max_running:
            progressed = False
            for key in order:  # one admission per queue per pass: that is the round-robin
                queue = self.queues[key]
                if not queue or not adapter_ready(key):
                    continue
                request = queue.head()
                chunk = room.take(request)
                if chunk is None:
                    if request.preemptions and room.blocks_needed(request) > room.blocks_free:
                        # A preempted request is owed its blocks: nobody else takes them while it waits for them.
                        room.blocks_free = 0
                    continue
                queue.pop_head()
                admitted.append((request, chunk))
                if key in served:
                    served.remove(key)
                served.append(key)
                progressed = True
                if room.budget <= 0 or len(self.running) + len(admitted) >= self.max_running:
                    break
        for key in served:  # served queues go to the back of the rotation, in the order served
            self.queues.move_to_end(key)
        return admitted
