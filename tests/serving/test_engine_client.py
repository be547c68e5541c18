"""The seam: one suite drives the in-thread engine (`LocalEngine`) and the engine process (`EngineProcess`) through
the `EngineClient` protocol only, and both must answer alike: the same tokens and scores as the bare engine, typed
errors, cancellation, and the adapter lifecycle (add, list with tiers and counters, remove) under byte budgets."""

from __future__ import annotations

import asyncio
import time

import pytest

from longtail.serving.adapter_tiers import TierConfig
from longtail.serving.engine import Engine
from longtail.serving.engine_client import EngineClient, LocalEngine
from longtail.serving.engine_process import EngineProcess
from longtail.serving.errors import PromptTooLong, UnknownAdapter
from longtail.serving.peft_format import load_adapter
from longtail.serving.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
KV = 4 * 2**20
NAMES = ("r4-attn", "r8-all", "r16-mlp-rslora", "r64-qko")


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Tokens and logprobs of each adapter (and the base) from the bare engine, stepped by hand."""
    engine = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=KV)
    try:
        ids = [engine.add_adapter(tiny_llama.adapter_dirs[n]) for n in NAMES]
        outputs = engine.generate([[3, 7, 11]] * (len(ids) + 1), [*ids, None], GREEDY)
        return dict(zip([*ids, None], outputs, strict=True))
    finally:
        engine.shutdown()


@pytest.fixture(params=["thread", "process"], scope="module")
def client(request, tiny_llama, tmp_path_factory):
    # A device budget that fits the two smallest adapters but not all four: the suite also runs through evictions.
    sizes = sorted(load_adapter(tiny_llama.adapter_dirs[n], _shapes(tiny_llama)).nbytes for n in NAMES)
    tiers = TierConfig(store_home=str(tmp_path_factory.mktemp(request.param)), device_bytes=sizes[-1] + sizes[0],
                       host_bytes=sum(sizes))
    if request.param == "thread":
        engine: EngineClient = LocalEngine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=KV, adapters=tiers)
    else:
        engine = EngineProcess(tiny_llama.base_dir, kv_cache_bytes=KV, adapters=tiers)
    yield engine
    engine.shutdown()


def _shapes(kit):
    from longtail.serving.peft_format import ModuleShapes

    return ModuleShapes.from_model_dir(kit.base_dir)


async def _collect(client: EngineClient, prompt, adapter_id, params=GREEDY, limit=None):
    tokens, logprobs = [], []
    async for event in client.stream(prompt, adapter_id, params):
        if event.token_id is not None:
            tokens.append(event.token_id)
            logprobs.append(event.logprob)
        if limit is not None and len(tokens) >= limit:
            break
    return tokens, logprobs


def test_both_engines_are_engine_clients(client):
    assert isinstance(client, EngineClient)


def test_tokens_scores_and_lifecycle_alike(client, tiny_llama, reference):
    ids = [client.add_adapter(tiny_llama.adapter_dirs[n]) for n in NAMES]
    assert set(ids) <= set(reference), "adapterIds are content hashes"
    listed = {a.adapter_id: a for a in client.list_adapters()}
    assert all(listed[i].tier == "disk" and listed[i].loads == 0 for i in ids), "stored, not loaded, until asked"

    async def all_at_once():
        return await asyncio.gather(*(_collect(client, [3, 7, 11], a) for a in [*ids, None, *ids]))

    results = asyncio.run(all_at_once())
    for adapter_id, (tokens, logprobs) in zip([*ids, None, *ids], results, strict=True):
        assert tokens == reference[adapter_id].token_ids, adapter_id
        assert logprobs == pytest.approx(reference[adapter_id].logprobs, abs=1e-4)
    scores = asyncio.run(client.score([3, 7, 11], reference[ids[1]].token_ids, ids[1]))
    assert scores == pytest.approx(reference[ids[1]].logprobs, abs=1e-4)

    stats = client.stats()
    assert stats.tier_bytes["device"] <= stats.tier_budget["device"]
    assert stats.evictions.get("device", 0) >= 1, "four adapters through a budget of two: something was evicted"
    listed = {a.adapter_id: a for a in client.list_adapters()}
    assert all(listed[i].tokens_served >= 2 * GREEDY.max_tokens for i in ids)
    assert sum(listed[i].tier == "device" for i in ids) <= 2

    client.remove_adapter(ids[0])
    with pytest.raises(UnknownAdapter):
        asyncio.run(_collect(client, [3, 7, 11], ids[0]))
    with pytest.raises(UnknownAdapter):
        client.remove_adapter(ids[0])
    assert ids[0] not in {a.adapter_id for a in client.list_adapters()}
    assert client.add_adapter(tiny_llama.adapter_dirs[NAMES[0]]) == ids[0], "added back after a delete"
    tokens, _ = asyncio.run(_collect(client, [3, 7, 11], ids[0]))
    assert tokens == reference[ids[0]].token_ids


def test_refusals_and_cancellation_alike(client):
    with pytest.raises(PromptTooLong) as refused:
        asyncio.run(_collect(client, [3] * 250, None, SamplingParams(max_tokens=20)))
    assert refused.value.context == 256
    with pytest.raises(UnknownAdapter):
        asyncio.run(_collect(client, [3, 7], "0x" + "ab" * 32))
    free = client.stats().free_kv_blocks
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    tokens, _ = asyncio.run(_collect(client, [3, 7, 11], None, long, limit=2))
    assert len(tokens) == 2
    deadline = time.monotonic() + 10
    while client.stats().free_kv_blocks != free and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.stats().free_kv_blocks == free, "leaving the stream cancelled the request; its blocks are back"


def test_run_steps_on_the_calling_thread_until_stop(tiny_llama):
    """`LocalEngine.run` keeps the steps on the thread that loaded the model (the engine process's main thread):
    a second thread running OpenMP regions while the first lives makes libgomp throttle both (docs/serving.md)."""
    import threading

    engine = Engine.from_pretrained(tiny_llama.base_dir)
    driver = LocalEngine(engine)
    stepped_on: set[int] = set()
    step = engine.step

    def recording_step() -> int:
        stepped_on.add(threading.get_ident())
        return step()

    engine.step = recording_step
    finished = threading.Event()

    def client() -> None:
        engine.submit([5, 6, 7], None, SamplingParams(max_tokens=4, temperature=0.0),
                      listener=lambda event: event.finish_reason is not None and finished.set())
        finished.wait(timeout=60)
        driver.stop()

    threading.Thread(target=client, daemon=True).start()
    driver.run()  # returns once the client thread stops it
    assert finished.is_set() and stepped_on == {threading.get_ident()}
    driver.shutdown()
