"""Typed errors of the engine: each fails one request, with the values that explain it."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: something about one request or adapter is wrong; the batch goes on."""


class UnknownAdapter(EngineError, KeyError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"no adapter {adapter_id} is loaded in this engine")
        self.adapter_id = adapter_id

    def __str__(self) -> str:
        return self.args[0]


class AdapterIncompatible(EngineError, ValueError):
    """An adapter's shapes or targets do not fit the base model (raised at add time)."""


class PromptTooLong(EngineError, ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the "
                         f"context of {context} tokens")
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


class InvalidSamplingParams(EngineError, ValueError):
    """A sampling parameter is out of its range."""


class KvCacheTooSmall(EngineError, ValueError):
    """A single request needs more KV blocks than the whole pool holds."""


class NonFiniteLogits(EngineError, ArithmeticError):
    def __init__(self, request_id: int) -> None:
        super().__init__(f"request {request_id} produced NaN or infinite logits; it was stopped")
        self.request_id = request_id


class RequestCancelled(EngineError):
    """The request was cancelled before it finished."""
