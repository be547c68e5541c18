"""What a user of the engine relies on besides matching PEFT: stops, errors that fail one request,
chunked prefill, streaming, the background thread, adapter hot add/remove, and the KV pool."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from longtail.serving.engine import Engine
from longtail.serving.engine_client import LocalEngine
from longtail.serving.errors import (
    InvalidSamplingParams,
    InvalidTokenIds,
    KvCacheTooSmall,
    NonFiniteLogits,
    PromptTooLong,
    UnknownAdapter,
)
from longtail.serving.peft_format import AdapterRejected
from longtail.serving.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class LetterTokenizer:
    """Each token id decodes to one letter: enough to test stop strings on decoded text."""

    def decode(self, token_ids):
        return "".join(chr(ord("a") + t % 26) for t in token_ids)


def engine_for(kit, **options):
    options.setdefault("kv_cache_bytes", 4 * 2**20)
    return Engine.from_pretrained(kit.base_dir, **options)


def all_blocks_free(engine):
    return engine.cache.pool.free_blocks == engine.cache.pool.num_blocks


def test_stop_strings_on_decoded_text_and_stop_token_ids(tiny_llama):
    engine = engine_for(tiny_llama, tokenizer=LetterTokenizer())
    prompt = [5, 9, 33, 2, 71]
    free = engine.generate([prompt], [None], GREEDY)[0]
    text = LetterTokenizer().decode(free.token_ids)
    stop = text[4:6]
    first = text.find(stop)
    stopped = engine.generate([prompt], [None], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                                stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:first + len(stop)]
    assert stopped.text == text[:first], "the text is cut before the stop string"
    by_token = engine.generate([prompt], [None], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                                 stop_token_ids=(free.token_ids[3],)))[0]
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[3]) + 1]
    assert free.finish_reason == "length" and free.text == text


def test_eos_stops_unless_ignored(tiny_llama):
    engine = engine_for(tiny_llama)
    prompt = [7, 8, 9]
    free = engine.generate([prompt], [None], GREEDY)[0].token_ids
    engine.eos_token_ids = {free[2]}  # as if the model's EOS were that token
    stopped = engine.generate([prompt], [None], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free[:free.index(free[2]) + 1]


def test_bad_requests_fail_alone_with_typed_errors(tiny_llama):
    engine = engine_for(tiny_llama)
    with pytest.raises(UnknownAdapter) as unknown:
        engine.submit([1, 2], "0x" + "ab" * 32, SamplingParams())
    assert unknown.value.adapter_id == "0x" + "ab" * 32
    with pytest.raises(PromptTooLong) as too_long:
        engine.submit([1] * 250, None, SamplingParams(max_tokens=10))
    assert (too_long.value.prompt_tokens, too_long.value.context) == (250, 256)
    with pytest.raises(PromptTooLong):
        engine.submit([1, 2], None, SamplingParams(max_tokens=255))  # max_tokens beyond the context
    with pytest.raises(InvalidSamplingParams):
        engine.submit([1, 2], None, SamplingParams(max_tokens=0))
    with pytest.raises(InvalidSamplingParams):
        engine.submit([1, 2], None, SamplingParams(top_p=float("nan")))
    with pytest.raises(InvalidTokenIds):
        engine.submit([1, 384], None, SamplingParams())
    small = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=64 * 1024)
    with pytest.raises(KvCacheTooSmall):
        small.submit([1] * 100, None, SamplingParams(max_tokens=100))
    # In one generate call, the bad request comes back as an error and the others run.
    good = engine.generate([[3, 4, 5]], [None], GREEDY)[0]
    outputs = engine.generate([[3, 4, 5], [1, 2], [3, 4, 5]], [None, "0xdead", None], GREEDY)
    assert [o.finish_reason for o in outputs] == ["length", "error", "length"]
    assert isinstance(outputs[1].error, UnknownAdapter)
    assert outputs[0].token_ids == outputs[2].token_ids == good.token_ids
    assert all_blocks_free(engine)


def test_non_finite_logits_fail_one_request_and_poison_no_other(tiny_llama):
    engine = engine_for(tiny_llama)
    poisoned = engine.add_adapter(tiny_llama.adapter_dirs["r8-all"])
    healthy = engine.add_adapter(tiny_llama.adapter_dirs["r4-attn"])
    # The poisoned request's long prompt leaves NaN keys and values all over blocks that short requests reuse.
    prompts = [list(range(5, 45)), [9, 10, 11], [12, 13, 14, 15, 16]]
    adapters = [poisoned, healthy, None]
    expected = engine.generate(prompts, adapters, GREEDY)
    slot = engine.lora_slots.slot_of[poisoned]
    buffers = engine.lora_slots.buffers["v_proj"]
    start = int(buffers.offsets[slot])
    buffers.a_rows[0, start:start + 8] = float("nan")  # a corrupt device buffer, past validation: NaN values
    # in the cache, which the other rows of the padded decode attention must never read.
    outputs = engine.generate(prompts, adapters, GREEDY)
    assert outputs[0].finish_reason == "error" and isinstance(outputs[0].error, NonFiniteLogits)
    assert [o.token_ids for o in outputs[1:]] == [o.token_ids for o in expected[1:]]
    # The failed request's blocks (full of NaN keys) are reused by later requests without harm.
    assert all_blocks_free(engine)
    again = engine.generate(prompts[1:] * 3, adapters[1:] * 3, GREEDY)
    assert [o.token_ids for o in again] == [o.token_ids for o in expected[1:]] * 3


def test_chunked_prefill_gives_the_same_tokens_and_logprobs(sharp_llama):
    whole = engine_for(sharp_llama, max_batch_tokens=4096)
    chunked = engine_for(sharp_llama, max_batch_tokens=16, min_prefill_chunk=4)
    ids = [whole.add_adapter(sharp_llama.adapter_dirs[n]) for n in ("r8-all", "r64-qko")]
    assert ids == [chunked.add_adapter(sharp_llama.adapter_dirs[n]) for n in ("r8-all", "r64-qko")]
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 384, (n,), generator=generator).tolist() for n in (40, 23, 9)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
    step_tokens = []  # adapters load on a background thread, so step counts vary; step sizes do not
    run_step = chunked.runner.run
    chunked.runner.run = lambda chunks: step_tokens.append(sum(len(c.token_ids) for c in chunks)) or run_step(chunks)
    expected = whole.generate(prompts, [ids[0], ids[1], None], params)
    got = chunked.generate(prompts, [ids[0], ids[1], None], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    assert max(step_tokens) <= 16  # the 40-token prompt was split
    assert sum(step_tokens) == sum(map(len, prompts)) + 3 * 9


def test_stream_yields_the_tokens_of_generate_and_cancels_on_exit(tiny_llama):
    engine = engine_for(tiny_llama)
    adapter = engine.add_adapter(tiny_llama.adapter_dirs["r16-mlp-rslora"])
    expected = engine.generate([[4, 5, 6]], [adapter], GREEDY)[0].token_ids
    client = LocalEngine(engine)

    async def collect(limit=None):
        tokens = []
        async for event in client.stream([4, 5, 6], adapter, GREEDY):
            if event.token_id is not None:
                tokens.append(event.token_id)
            if limit is not None and len(tokens) == limit:
                break
        return tokens

    async def unknown():
        async for _ in client.stream([4, 5, 6], "0xfeed", GREEDY):
            pass

    try:
        assert asyncio.run(collect()) == expected
        assert asyncio.run(collect(limit=3)) == expected[:3]
        with pytest.raises(UnknownAdapter):
            asyncio.run(unknown())
        deadline = threading.Event()
        for _ in range(100):  # the early exit cancelled the request; its blocks come back
            if all_blocks_free(engine) and not engine.has_work():
                break
            deadline.wait(0.02)
        assert all_blocks_free(engine)
    finally:
        client.shutdown()


def test_background_thread_serves_submits_from_many_threads(tiny_llama):
    engine = engine_for(tiny_llama)
    ids = [engine.add_adapter(tiny_llama.adapter_dirs[n]) for n in ("r4-attn", "r64-qko")]
    prompts = [[3 + i, 7, 11 + i] for i in range(6)]
    adapters = [ids[0], ids[1], None] * 2
    expected = [o.token_ids for o in engine.generate(prompts, adapters, GREEDY)]
    driver = LocalEngine(engine)
    driver.start()
    results: dict[int, list[int]] = {}
    try:
        def client(index):
            results[index] = engine.submit(prompts[index], adapters[index], GREEDY,
                                           client=f"c{index}").wait(timeout=60).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        driver.shutdown()
    assert [results[i] for i in range(6)] == expected


def test_adapters_hot_add_and_remove(tiny_llama, tmp_path):
    engine = engine_for(tiny_llama)
    adapter = engine.add_adapter(tiny_llama.adapter_dirs["r8-all"])
    assert engine.add_adapter(tiny_llama.adapter_dirs["r8-all"]) == adapter, "content-addressed: same id"
    expected = engine.generate([[1, 2, 3]], [adapter], GREEDY)[0].token_ids
    handle = engine.submit([1, 2, 3], adapter, GREEDY)
    while not handle.request.output_ids:
        engine.step()
    waiting = engine.submit([4, 5, 6], adapter, GREEDY)  # queued, not yet admitted when the adapter goes
    engine.remove_adapter(adapter)  # while a request runs on it: that one finishes, new ones are refused
    while not (handle.done.is_set() and waiting.done.is_set()):
        engine.step()
    assert handle.wait().token_ids == expected and handle.wait().finish_reason == "length"
    assert isinstance(waiting.wait().error, UnknownAdapter)
    with pytest.raises(UnknownAdapter):
        engine.submit([1, 2, 3], adapter, GREEDY)
    with pytest.raises(UnknownAdapter):
        engine.remove_adapter(adapter)
    # An adapter made for another base (hidden 32, not 64) is rejected at add time, before any request.
    folder = tmp_path / "wrong"
    folder.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterRejected):
        engine.add_adapter(folder)
    assert engine.generate([[1, 2, 3]], [None], GREEDY)[0].finish_reason == "length"


def test_scoring_rides_the_batch_and_changes_no_other_request(sharp_llama):
    engine = engine_for(sharp_llama, max_batch_tokens=16, min_prefill_chunk=4)
    adapter = engine.add_adapter(sharp_llama.adapter_dirs["r8-all"])
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 384, (n,), generator=generator).tolist() for n in (12, 7, 20)]
    adapters = [adapter, None, adapter]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
    expected = engine.generate(prompts, adapters, params)
    # 30 prompt + 9 output tokens: more than one step's budget, so the scoring is chunked across steps.
    long_prompt = torch.randint(3, 384, (30,), generator=generator).tolist()
    jobs = [(long_prompt, expected[1].token_ids, None), (prompts[0], expected[0].token_ids, adapter)]
    alone = [engine.score(*job) for job in jobs]
    assert torch.allclose(torch.tensor(alone[1]), torch.tensor(expected[0].logprobs), atol=1e-4), \
        "scoring a generation under its adapter gives the logprobs it was generated with"

    handles = [engine.submit(p, a, params) for p, a in zip(prompts, adapters, strict=True)]
    while not any(h.request.output_ids for h in handles):
        engine.step()
    scoring = [engine.submit_score(*job) for job in jobs]
    while not all(h.done.is_set() for h in handles + scoring):
        assert engine.step(), "the engine stalled"
    for handle, want in zip(handles, expected, strict=True):
        got = handle.wait()
        assert got.token_ids == want.token_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
    for handle, want in zip(scoring, alone, strict=True):
        assert torch.allclose(torch.tensor(handle.scores()), torch.tensor(want), atol=1e-4)
    assert all_blocks_free(engine)

    client = LocalEngine(engine)

    async def tokens_of(prompt, adapter_id):
        return [e.token_id async for e in client.stream(prompt, adapter_id, params) if e.token_id is not None]

    async def score_while_serving():
        # On the background thread: the scoring is submitted while the three requests run.
        *tokens, scores = await asyncio.gather(*(tokens_of(p, a) for p, a in zip(prompts, adapters, strict=True)),
                                               client.score(*jobs[0]))
        return tokens, scores

    try:
        tokens, scores = asyncio.run(score_while_serving())
    finally:
        client.shutdown()
    assert tokens == [o.token_ids for o in expected]
    assert torch.allclose(torch.tensor(scores), torch.tensor(alone[0]), atol=1e-4)
