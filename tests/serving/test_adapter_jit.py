"""Just-in-time loading with the real engine: a cold adapter loads in the background while others decode,
tokens equal the all-resident engine's, budgets hold, and a corrupt adapter fails only its own request."""

from __future__ import annotations

import time

import pytest

from longtail.serving.adapter_store import AdapterStore
from longtail.serving.adapter_tiers import TieredAdapters
from longtail.serving.peft_format import WEIGHTS_NAME

pytest.importorskip("longtail.serving.engine")


def _engine(base_dir):
    from longtail.serving.engine import Engine

    return Engine.from_pretrained(base_dir, device="cpu", kv_cache_bytes=8 << 20, initial_adapter_slots=8)


def test_cold_adapter_loads_while_others_decode(tiny_llama, tmp_path):
    from longtail.serving.sampling import SamplingParams

    names = ["r4-attn", "r8-all", "r16-mlp-rslora", "r64-qko"]
    resident = _engine(tiny_llama.base_dir)
    ids = [resident.add_adapter(tiny_llama.adapter_dirs[n]) for n in names]
    prompts = [[5 + i, 17, 33, 2 * i + 40, 9] for i in range(len(names))]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in resident.generate(prompts, ids, params)]

    store = AdapterStore(tmp_path)
    engine = _engine(tiny_llama.base_dir)
    sizes = {}
    for adapter_id, name in zip(ids, names, strict=True):
        record = store.add(tiny_llama.adapter_dirs[name], engine.model_config.module_shapes())
        sizes[adapter_id] = record.tensor_bytes
    # Room for the two largest adapters on the device, not for all four.
    device_budget = sum(sorted(sizes.values())[-2:])
    tiers = TieredAdapters.attach(engine, store, device_budget_bytes=device_budget,
                                  host_budget_bytes=sum(sizes.values()))
    try:
        warm = engine.submit(prompts[0], ids[0], params)
        while tiers.slot_of(ids[0]) is None or not warm.request.output_ids:
            engine.step()
        # Three cold adapters arrive while the first request decodes.
        cold = [engine.submit(p, a, params) for p, a in zip(prompts[1:], ids[1:], strict=True)]
        decoded_while_waiting = 0
        while not all(h.done.is_set() for h in [warm, *cold]):
            waiting_for_adapter = any(not h.request.output_ids and not h.done.is_set() for h in cold)
            before = len(warm.request.output_ids)
            engine.step()
            if waiting_for_adapter and len(warm.request.output_ids) > before:
                decoded_while_waiting += 1
            assert tiers.bytes_used("device") <= device_budget
        # The warm request kept producing tokens on steps where a cold adapter was still loading.
        assert decoded_while_waiting >= 1
        outputs = [h.output() for h in [warm, *cold]]
        assert [o.error for o in outputs] == [None] * 4
        assert [o.token_ids for o in outputs] == expected
        snapshot = tiers.metrics.snapshot()
        assert snapshot.misses["device"] >= 3 and len(snapshot.load_latencies_s) >= 3
    finally:
        tiers.close()


def test_corrupt_adapter_fails_only_its_request(tiny_llama, tmp_path):
    from longtail.serving.sampling import SamplingParams

    engine = _engine(tiny_llama.base_dir)
    store = AdapterStore(tmp_path)
    shapes = engine.model_config.module_shapes()
    good = store.add(tiny_llama.adapter_dirs["r4-attn"], shapes).adapter_id
    bad = store.add(tiny_llama.adapter_dirs["r8-all"], shapes).adapter_id
    data = bytearray((store.path_of(bad) / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0x10
    (store.path_of(bad) / WEIGHTS_NAME).write_bytes(bytes(data))
    tiers = TieredAdapters.attach(engine, store, device_budget_bytes=1 << 22, host_budget_bytes=1 << 22)
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        handles = [engine.submit([3, 4, 5], good, params), engine.submit([3, 4, 5], bad, params)]
        deadline = time.monotonic() + 60
        while not all(h.done.is_set() for h in handles) and time.monotonic() < deadline:
            if engine.step() == 0:
                time.sleep(0.001)  # nothing runnable yet: the loader thread is reading the files
        good_out, bad_out = (h.output() for h in handles)
        assert good_out.error is None and len(good_out.token_ids) == 8
        assert bad_out.error is not None and bad_out.token_ids == []
        assert tiers.metrics.snapshot().load_failures == 1
    finally:
        tiers.close()
