"""KV memory: the pool sized from the device's memory, blocks that grow as requests decode, and preemption by
recompute when the pool runs short. A preempted request must end exactly as if it had never been preempted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from longtail.serving.adapter_tiers import TierConfig
from longtail.serving.config import ModelConfig
from longtail.serving.engine import Engine, device_kv_cache_bytes
from longtail.serving.errors import KvCacheTooSmall, RequestCancelled
from longtail.serving.kv_cache import (
    CPU_ADAPTER_BYTES,
    CPU_KV_CACHE_BYTES,
    adapter_device_bytes,
    kv_bytes_per_block,
    kv_pool_bytes,
    step_activation_bytes,
)
from longtail.serving.sampling import SamplingParams
from longtail.serving.scheduler import State

GiB = 2**30
BLOCK = 16


def engine_with_blocks(kit, blocks: int | None, **options) -> Engine:
    """An engine whose KV pool holds exactly `blocks` blocks of 16 tokens (None: a pool nothing preempts in)."""
    config = ModelConfig.from_model_dir(kit.base_dir)
    per_block = kv_bytes_per_block(config, BLOCK, torch.float32)
    engine = Engine.from_pretrained(kit.base_dir, kv_cache_bytes=per_block * (blocks or 4096), block_size=BLOCK,
                                    **options)
    assert blocks is None or engine.cache.pool.num_blocks == blocks
    return engine


def all_blocks_free(engine: Engine) -> bool:
    return engine.cache.pool.free_blocks == engine.cache.pool.num_blocks


def workload(count: int, seed: int = 7) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (count,), generator=generator).tolist()
    return [torch.randint(3, 384, (n,), generator=generator).tolist() for n in lengths]


def run_to_end(engine: Engine, handles) -> None:
    while not all(h.done.is_set() for h in handles):
        assert engine.step(), "the engine stalled"


def submit_all(engine, prompts, adapters, params, events=None):
    handles = []
    for index, (prompt, adapter, sampling) in enumerate(zip(prompts, adapters, params, strict=True)):
        listener = None if events is None else events.setdefault(index, []).append
        handles.append(engine.submit(prompt, adapter, sampling, listener=listener))
    return handles


# --- the pool's size -------------------------------------------------------------------------------------------


def test_the_pool_takes_the_fraction_of_the_device_left_after_weights_adapters_and_a_step():
    # An empty 141 GiB device with 16 GiB of weights loaded: 0.9 of the device, less what is already set aside.
    total, weights = 141 * GiB, 16 * GiB
    free = total - weights - GiB // 2  # the CUDA context and allocator take some too
    pool = kv_pool_bytes(free, total, 0.9, weights, adapter_bytes=4 * GiB, reserve_bytes=2 * GiB)
    assert pool == int(0.9 * total) - weights - 4 * GiB - 2 * GiB
    # Another process holds 60 GiB: the engine takes the fraction of what is free, not of the whole device.
    shared_free = free - 60 * GiB
    assert kv_pool_bytes(shared_free, total, 0.9, weights, 4 * GiB, 2 * GiB) == \
        int(0.9 * shared_free) - 4 * GiB - 2 * GiB
    # A larger fraction gives a larger pool; the adapter budget comes out of the same share.
    assert kv_pool_bytes(free, total, 0.95, weights, 4 * GiB) > kv_pool_bytes(free, total, 0.9, weights, 4 * GiB)
    assert kv_pool_bytes(free, total, 0.9, weights, 8 * GiB) == kv_pool_bytes(free, total, 0.9, weights, 4 * GiB) \
        - 4 * GiB
    # Nothing left (weights beyond the fraction): 0, which the engine refuses to start with.
    assert kv_pool_bytes(free, total, 0.1, weights, 0) == 0


@pytest.mark.parametrize("bad", [
    dict(fraction=0.0), dict(fraction=1.5), dict(fraction=float("nan")), dict(free_bytes=200 * GiB),
    dict(weight_bytes=-1),
])
def test_impossible_memory_figures_are_refused(bad):
    figures = dict(free_bytes=100 * GiB, total_bytes=141 * GiB, fraction=0.9, weight_bytes=GiB, adapter_bytes=0)
    with pytest.raises(ValueError):
        kv_pool_bytes(**(figures | bad))


def test_weight_bytes_count_every_tensor_of_the_checkpoint(tiny_llama, sharp_qwen2):
    for kit in (tiny_llama, sharp_qwen2):  # tied head, no biases; untied head with q/k/v biases
        tensors = load_file(str(kit.base_dir / "model.safetensors"))
        assert ModelConfig.from_model_dir(kit.base_dir).parameter_count() == sum(t.numel() for t in tensors.values())


def test_on_cuda_the_engine_sizes_its_pool_from_free_memory(tiny_llama, monkeypatch):
    engine = engine_with_blocks(tiny_llama, 4)
    model, config = engine.model, engine.model_config
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 8 * GiB, 10 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    weights = config.parameter_count() * 4
    reserve = step_activation_bytes(config, 512, torch.float32)
    assert device_kv_cache_bytes(model, 0.9, GiB, 512) == (int(0.9 * 8 * GiB) - GiB - reserve, GiB)
    # No adapter budget given: the adapter tier takes a tenth of what the weights and a step leave.
    share = int(0.9 * 8 * GiB) - reserve
    pool, adapters = device_kv_cache_bytes(model, 0.9, None, 512)
    assert adapters == int(0.1 * share) == adapter_device_bytes(8 * GiB, 10 * GiB, 0.9, weights, reserve)
    assert pool == share - adapters
    assert kv_pool_bytes(8 * GiB, 10 * GiB, 0.9, weights, GiB, reserve) == int(0.9 * 8 * GiB) - GiB - reserve
    assert asked == [model.device] * 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (GiB, 10 * GiB))
    with pytest.raises(ValueError, match="no device memory left"):
        device_kv_cache_bytes(model, 0.9, 2 * GiB, 512)


def test_on_a_cpu_the_pool_keeps_its_fixed_default(tiny_llama):
    engine = Engine.from_pretrained(tiny_llama.base_dir)
    per_block = kv_bytes_per_block(engine.model_config, engine.cache.block_size, torch.float32)
    assert engine.cache.pool.num_blocks == CPU_KV_CACHE_BYTES // per_block
    assert engine.adapters.metrics.snapshot().budget["device"] == CPU_ADAPTER_BYTES  # TierConfig() leaves it to us
    assert Engine(engine.model, adapters=TierConfig(device_bytes=None)).adapters.metrics.snapshot().budget["device"] \
        == CPU_ADAPTER_BYTES
    with pytest.raises(ValueError, match="gpu_memory_fraction"):  # refused on a CPU too: the config is wrong
        Engine(engine.model, kv_cache_bytes=2**20, gpu_memory_fraction=1.2)


# --- growth and preemption ------------------------------------------------------------------------------------


def test_admission_reserves_the_prompt_and_blocks_grow_while_decoding(sharp_llama):
    engine = engine_with_blocks(sharp_llama, 64)
    handle = engine.submit(list(range(3, 23)), None, SamplingParams(max_tokens=40, temperature=0.0,
                                                                     ignore_eos=True))
    engine.step()
    request = handle.request
    assert len(request.blocks) == 2, "20 prompt tokens and the next one: 2 blocks, not the 4 of max_tokens"
    seen = []
    while not handle.done.is_set():
        seen.append(len(request.blocks))
        engine.step()
        if request.state is State.RUNNING:
            assert len(request.blocks) * BLOCK >= request.cached, "every cached position has its block"
    assert max(seen) == 4 and seen == sorted(seen), "one more block at each boundary, up to 59 tokens"
    assert all_blocks_free(engine)


def test_a_tiny_pool_preempts_and_every_output_equals_the_large_pool_run(sharp_llama):
    prompts = workload(10)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    large, tiny = engine_with_blocks(sharp_llama, None), engine_with_blocks(sharp_llama, 8, max_batch_tokens=64,
                                                                             min_prefill_chunk=4)
    names = ("r8-all", "r64-qko")
    ids = [large.add_adapter(sharp_llama.adapter_dirs[n]) for n in names]
    assert ids == [tiny.add_adapter(sharp_llama.adapter_dirs[n]) for n in names]
    adapters = [(None, *ids)[i % 3] for i in range(len(prompts))]
    expected = large.generate(prompts, adapters, greedy)
    assert large.stats().preemptions == 0

    events: dict[int, list] = {}
    handles = submit_all(tiny, prompts, adapters, [greedy] * len(prompts), events)
    run_to_end(tiny, handles)
    assert tiny.stats().preemptions >= 5, "8 blocks for 10 requests of up to 69 tokens: the pool must preempt"
    assert sum(h.request.preemptions > 0 and h.request.output_ids != [] for h in handles) >= 1, \
        "at least one request was preempted after it had generated tokens (recomputed, not restarted)"
    for index, (handle, want) in enumerate(zip(handles, expected, strict=True)):
        got = handle.wait()
        assert (got.finish_reason, got.token_ids) == ("length", want.token_ids)
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
        streamed = events[index]
        assert [e.token_id for e in streamed[:-1]] == got.token_ids, "each token streamed once, in order"
        assert [e.logprob for e in streamed[:-1]] == got.logprobs
        assert streamed[-1].finish_reason == "length" and streamed[-1].token_id is None
    assert all_blocks_free(tiny)


def test_seeded_sampling_continues_its_own_generator_across_a_preemption(sharp_llama):
    prompts = workload(8, seed=11)
    params = [SamplingParams(max_tokens=36, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, ignore_eos=True,
                             logprobs=True) for i in range(len(prompts))]
    large, tiny = engine_with_blocks(sharp_llama, None), engine_with_blocks(sharp_llama, 7)
    expected = large.generate(prompts, [None] * len(prompts), params)
    outputs = tiny.generate(prompts, [None] * len(prompts), params)
    assert tiny.stats().preemptions > 0
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    for got, want in zip(outputs, expected, strict=True):
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
    assert all_blocks_free(tiny)


def test_the_most_recently_admitted_request_is_preempted_and_resumes_first(sharp_llama):
    engine = engine_with_blocks(sharp_llama, 4)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    # The first two need 1 block at admission (prompt 10 + 1) and 3 by their end: the pool fits both only at
    # first. The third needs 3 blocks at once, so it waits from the start.
    prompts = [list(range(3, 13)), list(range(20, 30)), list(range(40, 80))]
    all_params = [params, params, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    first, second, third = submit_all(engine, prompts, [None] * 3, all_params)
    while second.request.preemptions == 0:
        assert engine.step()
        assert third.request.state is State.WAITING
    assert first.request.preemptions == 0 and first.request.state is State.RUNNING
    assert second.request.state is State.WAITING and second.request.blocks == []
    assert engine.scheduler.waiting_requests() == [second.request, third.request], \
        "the preempted request goes back ahead of the request that was waiting before it"
    run_to_end(engine, [first, second, third])
    alone = engine_with_blocks(sharp_llama, None).generate(prompts, [None] * 3, all_params)
    assert [h.wait().token_ids for h in (first, second, third)] == [o.token_ids for o in alone]
    assert all_blocks_free(engine)


def test_a_preempted_waiting_request_can_be_cancelled(sharp_llama):
    engine = engine_with_blocks(sharp_llama, 4)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    events: list = []
    first = engine.submit(list(range(3, 13)), None, params)
    second = engine.submit(list(range(20, 30)), None, params, listener=events.append)
    while second.request.preemptions == 0:
        assert engine.step()
    generated = list(second.request.output_ids)
    assert generated, "it had generated tokens when it was preempted"
    second.cancel()
    engine.step()
    got = second.wait(timeout=1)
    assert got.finish_reason == "cancelled" and isinstance(got.error, RequestCancelled)
    assert got.token_ids == generated
    assert [e.token_id for e in events[:-1]] == generated and events[-1].finish_reason == "cancelled"
    assert engine.scheduler.waiting() == 0
    run_to_end(engine, [first])
    assert first.wait().finish_reason == "length" and all_blocks_free(engine)


def test_scoring_preempted_mid_prompt_gives_the_same_log_probabilities(sharp_llama):
    prompts = [list(range(3, 17)), list(range(30, 44))]  # 14 tokens: their first new block is at the 3rd decode
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    generator = torch.Generator().manual_seed(5)
    # 90 tokens run (6 blocks), the scored rows from the 20th: it has scored 40 tokens when it is preempted.
    score_prompt = torch.randint(3, 384, (20,), generator=generator).tolist()
    score_output = torch.randint(3, 384, (71,), generator=generator).tolist()
    large = engine_with_blocks(sharp_llama, None)
    expected_scores = large.score(score_prompt, score_output, None)
    expected = large.generate(prompts, [None] * 2, params)
    for background in (False, True):
        # No idle wait for background work: on a fast CPU the decoders finish within the default 20 ms of the
        # scoring's arrival, and a step that waits out that idle time runs nothing, which run_to_end calls a stall.
        tiny = engine_with_blocks(sharp_llama, 8, max_batch_tokens=32, min_prefill_chunk=4,
                                  background_idle_seconds=0.0)
        handles = submit_all(tiny, prompts, [None] * 2, [params] * 2)
        tiny.step()
        # Admitted into the 6 free blocks, it prefills 30 tokens a step; the decoders need blocks before it ends.
        scoring = tiny.submit_score(score_prompt, score_output, None, background=background)
        run_to_end(tiny, [*handles, scoring])
        assert scoring.request.preemptions >= 1, "the scoring request was the most recently admitted"
        assert len(scoring.scores()) == len(score_output)
        assert scoring.scores() == pytest.approx(expected_scores, abs=1e-4)
        assert [h.wait().token_ids for h in handles] == [o.token_ids for o in expected]
        assert all_blocks_free(tiny)


def test_a_request_larger_than_the_pool_is_refused_and_one_that_fills_it_runs(sharp_llama):
    engine = engine_with_blocks(sharp_llama, 4)
    with pytest.raises(KvCacheTooSmall):
        engine.submit(list(range(3, 23)), None, SamplingParams(max_tokens=45))  # 65 tokens > 64
    params = SamplingParams(max_tokens=44, temperature=0.0, ignore_eos=True)
    whole = engine.submit(list(range(3, 23)), None, params)  # 64 tokens: the whole pool, once the others go
    small = [engine.submit([5 + i, 6, 7], None, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
             for i in range(3)]
    run_to_end(engine, [whole, *small])
    assert whole.wait().finish_reason == "length" and len(whole.wait().token_ids) == 44
    assert all(h.wait().finish_reason == "length" for h in small)
    assert all_blocks_free(engine)


def test_blocks_the_runner_keeps_for_good_are_not_promised_to_requests(sharp_llama, monkeypatch):
    """On CUDA the decode graphs take a scratch block from the pool at start: a request that needs the whole pool
    would then never fit, so it is refused at submit, and one that fits what is left still runs beside others."""
    import longtail.serving.engine as engine_module

    class RunnerWithScratch(engine_module.ModelRunner):
        def __init__(self, model, cache, lora_slots):
            super().__init__(model, cache, lora_slots)
            self.scratch_block = cache.pool.allocate(1)[0]

    monkeypatch.setattr(engine_module, "ModelRunner", RunnerWithScratch)
    engine = engine_with_blocks(sharp_llama, 5)
    assert engine.request_blocks == 4
    with pytest.raises(KvCacheTooSmall):
        engine.submit(list(range(3, 23)), None, SamplingParams(max_tokens=60))  # 80 tokens: 5 blocks
    params = SamplingParams(max_tokens=44, temperature=0.0, ignore_eos=True)
    whole = engine.submit(list(range(3, 23)), None, params)  # 64 tokens: every block requests may have
    small = [engine.submit([5 + i, 6, 7], None, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
             for i in range(3)]
    run_to_end(engine, [whole, *small])
    assert len(whole.wait().token_ids) == 44 and engine.cache.pool.free_blocks == 4
