"""Typed errors of the engine: each fails one request, with the values that explain it."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: something about one request or adapter is wrong; the batch goes on.

    Errors whose constructor takes values rather than a message say how to rebuild themselves
    (`__reduce__`), so they cross the engine process's pipe as the same class with the same values.
    """


class UnknownAdapter(EngineError, KeyError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"no adapter {adapter_id} is loaded in this engine")
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


class AdapterSlotsFull(EngineError, RuntimeError):
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


class SamplingFailed(EngineError, RuntimeError):
    """The sampler could not draw a token for one row (its distribution degenerated); only that request ends."""
