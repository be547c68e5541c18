"""The serving engine: a shared base model with many LoRA adapters in one continuous batch."""

from serving.engine import Engine, GenerationOutput, StreamEvent
from serving.errors import (
    AdapterIncompatible,
    EngineError,
    InvalidSamplingParams,
    KvCacheTooSmall,
    NonFiniteLogits,
    PromptTooLong,
    UnknownAdapter,
)
from serving.sampling import SamplingParams

__all__ = [
    "AdapterIncompatible", "Engine", "EngineError", "GenerationOutput", "InvalidSamplingParams", "KvCacheTooSmall",
    "NonFiniteLogits", "PromptTooLong", "SamplingParams", "StreamEvent", "UnknownAdapter",
]
