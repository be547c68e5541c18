"""The serving engine: a shared base model with many LoRA adapters in one continuous batch."""

from serving.engine import Engine, GenerationOutput, ScoreHandle, StreamEvent
from serving.errors import (
    AdapterIncompatible,
    AdapterInUse,
    AdapterSlotsFull,
    EngineError,
    InvalidSamplingParams,
    InvalidTokenIds,
    KvCacheTooSmall,
    NonFiniteLogits,
    PromptTooLong,
    RequestCancelled,
    UnknownAdapter,
)
from serving.sampling import SamplingParams

__all__ = [
    "AdapterIncompatible", "AdapterInUse", "AdapterSlotsFull", "Engine", "EngineError", "GenerationOutput", "InvalidSamplingParams", "InvalidTokenIds", "KvCacheTooSmall",
    "NonFiniteLogits", "PromptTooLong", "ScoreHandle", "RequestCancelled", "SamplingParams", "StreamEvent", "UnknownAdapter",
]
