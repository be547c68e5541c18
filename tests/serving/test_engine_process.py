"""The engine in a child process answers as the in-process engine does: same tokens, same typed errors,
cancellation, scoring, and a clear error for every call once the child is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from longtail.serving.engine import Engine
from longtail.serving.engine_process import EngineProcess
from longtail.serving.errors import EngineUnavailable, PromptTooLong, UnknownAdapter
from longtail.serving.peft_format import AdapterRejected
from longtail.serving.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
KV = 4 * 2**20


@pytest.fixture(scope="module")
def engines(tiny_llama):
    local = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=KV)
    remote = EngineProcess(tiny_llama.base_dir, kv_cache_bytes=KV)
    yield local, remote
    remote.shutdown()


async def tokens_and_logprobs(engine, prompt, adapter_id, params=GREEDY):
    tokens, logprobs = [], []
    async for event in engine.stream(prompt, adapter_id, params):
        if event.token_id is not None:
            tokens.append(event.token_id)
            logprobs.append(event.logprob)
    return tokens, logprobs


def test_same_tokens_logprobs_and_scores_as_in_process(engines, tiny_llama):
    local, remote = engines
    names = ("r4-attn", "r64-qko")
    local_ids = [local.add_adapter(tiny_llama.adapter_dirs[n]) for n in names]
    remote_ids = [remote.add_adapter(tiny_llama.adapter_dirs[n]) for n in names]
    assert remote_ids == local_ids, "adapterIds are content hashes: the same in both"
    prompts = [[3, 7, 11], [5, 9, 2, 8], [4, 4, 6]]
    adapters = [local_ids[0], local_ids[1], None]
    expected = local.generate(prompts, adapters, GREEDY)

    async def run():
        streams = [tokens_and_logprobs(remote, p, a) for p, a in zip(prompts, adapters, strict=True)]
        scoring = remote.score(prompts[0], expected[0].token_ids, None)
        return await asyncio.gather(*streams, scoring)

    *streamed, scores = asyncio.run(run())
    for (tokens, logprobs), want in zip(streamed, expected, strict=True):
        assert tokens == want.token_ids
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(want.logprobs), atol=1e-5)
    assert torch.allclose(torch.tensor(scores), torch.tensor(local.score(prompts[0], expected[0].token_ids, None)),
                          atol=1e-5)


def test_typed_errors_cross_the_pipe_with_their_values(engines, tiny_llama, tmp_path):
    _, remote = engines

    async def first_event(prompt, adapter_id, params=GREEDY):
        async for _ in remote.stream(prompt, adapter_id, params):
            break

    with pytest.raises(UnknownAdapter) as unknown:
        asyncio.run(first_event([1, 2], "0x" + "ab" * 32))
    assert unknown.value.adapter_id == "0x" + "ab" * 32
    with pytest.raises(PromptTooLong) as too_long:
        asyncio.run(first_event([1, 2], None, SamplingParams(max_tokens=10_000)))
    assert too_long.value.max_tokens == 10_000
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRejected) as rejected:
        remote.add_adapter(tmp_path)
    assert rejected.value.path == str(tmp_path)
    # After refused calls the child still serves.
    assert asyncio.run(tokens_and_logprobs(remote, [3, 7, 11], None))[0]


def test_leaving_a_stream_early_cancels_it_in_the_child(engines):
    _, remote = engines
    free = remote.stats().free_kv_blocks

    async def take_three():
        tokens = []
        async for event in remote.stream([3, 7, 11], None, LONG):
            tokens.append(event.token_id)
            if len(tokens) == 3:
                break
        for _ in range(200):  # the cancel reaches the child's next step; its blocks come back
            if remote.stats().free_kv_blocks == free:
                return tokens
            await asyncio.sleep(0.02)
        return tokens

    assert len(asyncio.run(take_three())) == 3
    assert remote.stats().free_kv_blocks == free


def kill_during_a_stream(remote, adapter_id=None):
    async def stream_then_kill():
        tokens = []
        async for event in remote.stream([3, 7, 11], adapter_id, LONG):
            tokens.append(event.token_id)
            if len(tokens) == 2:
                os.kill(remote.pid, signal.SIGKILL)
        return tokens

    with pytest.raises(EngineUnavailable, match="exited"):
        asyncio.run(stream_then_kill())


def test_a_dead_child_fails_what_was_open_and_comes_back_with_its_adapters(tiny_llama):
    remote = EngineProcess(tiny_llama.base_dir, kv_cache_bytes=KV)
    try:
        adapter = remote.add_adapter(tiny_llama.adapter_dirs["r4-attn"])
        before = asyncio.run(tokens_and_logprobs(remote, [5, 9, 2], adapter))[0]
        first_pid = remote.pid
        kill_during_a_stream(remote, adapter)
        deadline = time.monotonic() + 120
        while remote.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert remote.restarts == 1 and remote.pid != first_pid
        # The new child holds the adapter the old one had: the same request gives the same tokens.
        assert asyncio.run(tokens_and_logprobs(remote, [5, 9, 2], adapter))[0] == before
    finally:
        remote.shutdown()


def test_a_child_that_keeps_dying_is_not_restarted_forever(tiny_llama):
    remote = EngineProcess(tiny_llama.base_dir, kv_cache_bytes=KV, max_restarts=0)
    try:
        kill_during_a_stream(remote)
        time.sleep(0.5)
        with pytest.raises(EngineUnavailable, match="keeps exiting"):
            remote.add_adapter(tiny_llama.adapter_dirs["r4-attn"])
        assert remote.restarts == 0
    finally:
        remote.shutdown()


def test_a_bad_model_folder_fails_the_constructor(tmp_path):
    with pytest.raises(Exception, match="config.json|safetensors|No such file"):
        EngineProcess(tmp_path, kv_cache_bytes=KV)
