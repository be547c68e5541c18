"""Typed errors of the engine: each fails one request, with the values that explain it."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: something about one request or adapter is wrong; the batch goes on.

    Errors whose constructor takes values rather than a message say how to rebuild themselves
    (`__reduce__`), so they cross the engine process's pipe as the same class with the same values.
    """


class UnknownAdapter(EngineError, KeyError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"no adapter {adapter_id} is stored in this engine")
        self.adapter_id = adapter_id

    def __reduce__(self):
        return type(self), (self.adapter_id,)

    def __str__(self) -> str:
        return self.args[0]


class AdapterIncompatible(EngineError, ValueError):
    """An adapter's shapes or targets do not fit the base model (raised at add time)."""


class PromptTooLong(EngineError, ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the "
                         f"context of {context} tokens")
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context

    def __reduce__(self):
        return type(self), (self.prompt_tokens, self.max_tokens, self.context)

    @property
    def details(self) -> dict:
        """What the HTTP edge adds to the error body: the numbers a client needs to shorten its request."""
        return {"prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens, "limit": self.context}


class AdapterSlotsFull(EngineError, RuntimeError):
    """No device room right now (every resident adapter is in use): a retry soon may find room."""

    retry_after_seconds = 1

    def __init__(self, adapter_id: str, max_adapters: int) -> None:
        super().__init__(f"cannot load adapter {adapter_id}: all {max_adapters} device slots are in use; "
                         "remove or evict an adapter first")
        self.adapter_id, self.max_adapters = adapter_id, max_adapters

    def __reduce__(self):
        return type(self), (self.adapter_id, self.max_adapters)


class AdapterInUse(EngineError, RuntimeError):
    def __init__(self, adapter_id: str, running: int) -> None:
        super().__init__(f"adapter {adapter_id} is used by {running} running requests; remove it when they finish")
        self.adapter_id, self.running = adapter_id, running

    def __reduce__(self):
        return type(self), (self.adapter_id, self.running)


class AdapterRemoved(UnknownAdapter):
    """The adapter was removed (DELETE /v1/adapters/{id}) while a request waited for it."""

    def __init__(self, adapter_id: str) -> None:
        EngineError.__init__(self, f"adapter {adapter_id} was removed from this engine")
        self.adapter_id = adapter_id


class AdapterTooLarge(EngineError, ValueError):
    """An adapter needs more bytes than a tier's whole budget, so it can never be resident there."""

    def __init__(self, adapter_id: str, tier: str, nbytes: int, budget: int) -> None:
        super().__init__(f"adapter {adapter_id} needs {nbytes} bytes, more than the {tier} budget of {budget}")
        self.adapter_id, self.tier, self.nbytes, self.budget = adapter_id, tier, nbytes, budget

    def __reduce__(self):
        return type(self), (self.adapter_id, self.tier, self.nbytes, self.budget)

    @property
    def details(self) -> dict:
        return {"adapter_bytes": self.nbytes, "tier": self.tier, "budget_bytes": self.budget}


class AdapterLoadFailed(EngineError, RuntimeError):
    """A stored or announced adapter could not be brought to the device (unreadable file, peer down, rejected
    bytes); the requests waiting for it end with this, the next request tries the load again."""

    retry_after_seconds = 5

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(f"adapter {adapter_id} could not be loaded: {reason}")
        self.adapter_id, self.reason = adapter_id, reason

    def __reduce__(self):
        return type(self), (self.adapter_id, self.reason)


class InvalidTokenIds(EngineError, ValueError):
    def __init__(self, token_ids: list[int], vocab_size: int) -> None:
        super().__init__(f"prompt holds token ids {token_ids} outside the vocabulary [0, {vocab_size})")
        self.token_ids, self.vocab_size = token_ids, vocab_size

    def __reduce__(self):
        return type(self), (self.token_ids, self.vocab_size)


class InvalidSamplingParams(EngineError, ValueError):
    """A sampling parameter is out of its range."""


class KvCacheTooSmall(EngineError, ValueError):
    """A single request needs more KV blocks than the whole pool holds (or, to score, than are free)."""


class NonFiniteLogits(EngineError, ArithmeticError):
    def __init__(self, request_id: int) -> None:
        super().__init__(f"request {request_id} produced NaN or infinite logits; it was stopped")
        self.request_id = request_id

    def __reduce__(self):
        return type(self), (self.request_id,)


class RequestCancelled(EngineError):
    """The request was cancelled before it finished."""


class EngineUnavailable(EngineError, RuntimeError):
    """The engine's process is gone (or never came up): no request can run until the node restarts it."""

    retry_after_seconds = 2


class SamplingFailed(EngineError, RuntimeError):
    """The sampler could not draw a token for one row (its distribution degenerated); only that request ends."""
