"""The node's view of the engine: text in (prompt or chat), token ids through the engine, text out.

The engine speaks token ids; clients speak text. This gateway owns the
tokenizer side (chat template, incremental detokenisation, stop strings on
text) so the service never touches tokens except to count and attribute them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from longtail.node.catalog import CatalogEntry
from longtail.node.errors import EngineDown
from longtail.node.requests import CompletionRequest
from longtail.serving.engine_client import EngineClient, as_client
from longtail.serving.errors import EngineUnavailable


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """The answer so far (or final): token ids, their text, the last delta and why it stopped."""

    token_ids: list[int]
    text: str
    delta: str = ""
    finish_reason: str | None = None
    first_token_seconds: float | None = None
    logprobs: tuple[float, ...] = ()


class GenerationGateway:
    """Turns requests into engine calls; one per node, shared by all requests."""

    def __init__(self, engine, tokenizer) -> None:
        # Only the EngineClient calls (serving.engine_client): the same for the engine process and a local one.
        self.engine: EngineClient = as_client(engine)
        self.tokenizer = tokenizer

    def encode(self, request: CompletionRequest) -> list[int]:
        if request.chat:
            encoded = self.tokenizer.apply_chat_template(list(request.messages or ()), add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)
            return list(encoded["input_ids"])
        return list(self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])

    def sampling_params(self, request: CompletionRequest):
        from longtail.serving.sampling import SamplingParams

        # Token log-probabilities only when the client asked (OpenAI's `logprobs`, chat only): a step whose rows
        # all leave them off skips the log-softmax over the vocabulary.
        return SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                              top_k=request.top_k, seed=request.seed, stop=list(request.stop),
                              logprobs=request.logprobs)

    async def stream(self, request: CompletionRequest, entry: CatalogEntry,
                     prompt_ids: list[int]) -> AsyncIterator[GenerationResult]:
        """Yield a cumulative result after each token; the last one carries the finish reason."""
        started = time.perf_counter()
        params = self.sampling_params(request)
        try:
            # aclosing: a client that leaves early cancels the engine request now, not when garbage is collected.
            async with contextlib.aclosing(self._results(request, entry, prompt_ids, params, started)) as results:
                async for result in results:
                    yield result
        except EngineUnavailable as error:
            raise EngineDown(str(error), retry_after_seconds=error.retry_after_seconds) from error

    async def _results(self, request: CompletionRequest, entry: CatalogEntry, prompt_ids: list[int], params,
                       started: float) -> AsyncIterator[GenerationResult]:
        first_token: float | None = None
        token_ids: list[int] = []
        logprobs: list[float] = []
        text = ""
        finish_reason = None
        async for event in self.engine.stream(prompt_ids, entry.adapter_id, params):
            new_ids = [event.token_id] if event.token_id is not None else []
            finish_reason = event.finish_reason or finish_reason
            if new_ids and first_token is None:
                first_token = time.perf_counter() - started
            token_ids.extend(new_ids)
            if new_ids and event.logprob is not None:
                logprobs.append(float(event.logprob))
            decoded = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            # Hold back a trailing replacement char: a multi-byte character is still incomplete.
            stable = decoded[:-1] if decoded.endswith("\ufffd") and not finish_reason else decoded
            stable, stopped = self._apply_stop(stable, request.stop)
            delta = stable[len(text):] if stable.startswith(text) else ""
            text = stable if len(stable) >= len(text) else text
            if stopped:
                finish_reason = "stop"
            yield GenerationResult(list(token_ids), text, delta, finish_reason, first_token, tuple(logprobs))
            if stopped:
                return

    async def generate(self, request: CompletionRequest, entry: CatalogEntry,
                       prompt_ids: list[int]) -> GenerationResult:
        final = GenerationResult([], "", "", "length")
        async for partial in self.stream(request, entry, prompt_ids):
            final = partial
        return final

    @staticmethod
    def _apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def engine_shutdown(self) -> None:
        """Stop the engine (its driver thread, or its process)."""
        self.engine.shutdown()
