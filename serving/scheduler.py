"""Continuous batching policy: which requests run this step. No tensors here.

Policy (docs/serving.md): every running request decodes one token per step;
then waiting requests are admitted round-robin across adapter queues (the
base model is one queue), FCFS within a queue, while the step's token budget
and the KV pool allow. The round-robin pointer moves past the last adapter
served, so a popular adapter cannot starve a rare one: each adapter with a
waiting request gets an admission chance at least once per cycle through the
queues. A request reserves KV blocks for its prompt plus `max_tokens` at
admission, so a running request is never preempted.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict, deque

from serving.sampling import SamplingParams


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    adapter_id: str | None
    params: SamplingParams
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    state: State = State.WAITING
    blocks: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0                 # tokens whose keys/values are in the cache
    finish_reason: str | None = None
    error: Exception | None = None
    generator: object = None
    arrival: float = 0.0
    first_token_at: float | None = None

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    decode: list[Request]
    prefill: list[Request]


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_running: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.queues: OrderedDict[str | None, deque[Request]] = OrderedDict()
        self.running: list[Request] = []
        self._next_queue = 0

    def add(self, request: Request) -> None:
        self.queues.setdefault(request.adapter_id, deque()).append(request)

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def remove_waiting(self, request: Request) -> bool:
        queue = self.queues.get(request.adapter_id)
        if queue and request in queue:
            queue.remove(request)
            return True
        return False

    def schedule(self, blocks_free: int, blocks_needed, adapter_ready) -> StepPlan:
        """Pick this step's work. `blocks_needed(r)` and `adapter_ready(adapter_id)` come from the engine."""
        decode = [r for r in self.running if r.state is State.RUNNING]
        budget = self.max_batch_tokens - len(decode)
        prefill: list[Request] = []
        keys = [k for k, q in self.queues.items() if q]
        if not keys:
            return StepPlan(decode, prefill)
        start = self._next_queue % len(keys)
        order = keys[start:] + keys[:start]
        progressed = True
        served_last = None
        while progressed and len(self.running) + len(prefill) < self.max_running:
            progressed = False
            for key in order:
                queue = self.queues[key]
                if not queue or not adapter_ready(key):
                    continue
                request = queue[0]
                need = blocks_needed(request)
                prompt = len(request.prompt_ids)
                fits_budget = prompt <= budget or (not decode and not prefill)
                if need > blocks_free or not fits_budget:
                    continue
                queue.popleft()
                blocks_free -= need
                budget -= prompt
                prefill.append(request)
                served_last = key
                progressed = True
                if len(self.running) + len(prefill) >= self.max_running:
                    break
        if served_last is not None:
            self._next_queue = (keys.index(served_last) + 1) % max(len(keys), 1)
        for key in [k for k, q in self.queues.items() if not q]:
            del self.queues[key]
        return StepPlan(decode, prefill)
