"""Tiers under byte budgets: GDSF decisions, budgets never exceeded, pinned adapters never evicted,
background loads, hot add and remove, remote fetch, failures reported per adapter, metrics."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from longtail.serving.adapter_metrics import AdapterMetrics
from longtail.serving.adapter_store import AdapterStore, IntegrityError
from longtail.serving.adapter_tiers import (
    AdapterRemoved,
    AdapterTooLarge,
    ByteBudgetTier,
    GreedyDualSizeFrequency,
    SlotsFull,
    TieredAdapters,
    _Cost,
)
from longtail.serving.peft_format import (
    WEIGHTS_NAME,
    AdapterRejected,
    AdapterWeights,
    ModuleShapes,
    load_adapter,
    write_random_adapter,
)

SHAPES = ModuleShapes.from_hf_config({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "intermediate_size": 160, "num_hidden_layers": 2})


class RecordingSlots:
    """Device slots that copy factors into their own tensors and record every load and free."""

    def __init__(self, max_slots: int = 1_000):
        self.max_slots = max_slots
        self.held: dict[int, tuple[str, list[torch.Tensor]]] = {}
        self.loads: list[str] = []
        self.frees: list[str] = []

    def load(self, weights: AdapterWeights) -> int:
        if len(self.held) >= self.max_slots:
            raise SlotsFull(weights.adapter_id, self.max_slots)  # what LoraSlots-like slots raise
        slot = min(set(range(self.max_slots)) - set(self.held))
        self.held[slot] = (weights.adapter_id, [t.clone() for m in weights.modules for t in (m.lora_a, m.lora_b)])
        self.loads.append(weights.adapter_id)
        return slot

    def free(self, adapter_id: str) -> None:
        slot = next(s for s, (held_id, _) in self.held.items() if held_id == adapter_id)
        self.frees.append(self.held.pop(slot)[0])


def _make_adapters(store: AdapterStore, root: Path, ranks: list[int], mixed: bool = True) -> list[str]:
    """Adapters of the given ranks; `mixed` cycles through three target sets (so sizes differ)."""
    targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")]
    ids = []
    for i, rank in enumerate(ranks):
        folder = write_random_adapter(root / f"a{i}", SHAPES, rank, targets[i % 3] if mixed else targets[1], seed=i)
        ids.append(store.add(folder, SHAPES).adapter_id)
    return ids


def _wait_until(tiers: TieredAdapters, condition, timeout_s: float = 10.0, failures: dict | None = None):
    """Poll like the engine's step loop until `condition()`; failures reported on the way go into `failures`."""
    deadline = time.monotonic() + timeout_s
    results = []
    while time.monotonic() < deadline:
        results.append(tiers.poll())
        if failures is not None:
            failures.update(results[-1].failed)
        if condition():
            return results
        time.sleep(0.002)
    raise AssertionError("condition not reached")


@pytest.fixture()
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "home")


def test_gdsf_prefers_small_and_frequent_and_ages():
    tier = ByteBudgetTier("t", budget=1000, cost=_Cost(latency_s=1.0, bytes_per_s=1e9))
    tier.admit("big", 600, frequency=1)
    tier.admit("small", 300, frequency=1)
    # Equal frequency: the big one has the lowest value per byte and goes first.
    assert tier.plan_room(200, lambda k: True) == ["big"]
    # Ten times as popular, the big one stays and the small one goes.
    tier.policy.refresh("big", 10)
    assert tier.plan_room(200, lambda k: True) == ["small"]
    # A pinned resident is never chosen; with nothing else evictable there is no room.
    assert tier.plan_room(200, lambda k: k != "small") == ["big"]
    assert tier.plan_room(200, lambda k: False) is None
    assert tier.plan_room(1001, lambda k: True) is None
    # Inflation: after evicting the popular one, a newcomer starts from its priority, above the stale small one.
    big_priority = tier.policy.priority["big"]
    tier.evict("big")
    assert tier.policy.clock == big_priority
    tier.admit("new", 300, frequency=1)
    assert tier.plan_room(500, lambda k: True) == ["small"]


def test_gdsf_policy_matches_formula():
    policy = GreedyDualSizeFrequency(_Cost(latency_s=0.002, bytes_per_s=1e9))
    policy.admit("a", 1000, frequency=3)
    assert policy.priority["a"] == pytest.approx(3 * (0.002 + 1000 / 1e9) / 1000)


def test_cold_adapter_loads_in_background_and_gets_a_slot(store, tmp_path):
    ids = _make_adapters(store, tmp_path, [8])
    slots = RecordingSlots()
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=1 << 20, host_budget_bytes=1 << 20)
    try:
        assert tiers.knows(ids[0]) and not tiers.knows("0x" + "00" * 32)
        tiers.prefetch(ids[0])
        assert tiers.slot_of(ids[0]) is None  # prefetch returns at once; the load runs on the loader thread
        results = _wait_until(tiers, lambda: tiers.slot_of(ids[0]) is not None)
        assert ids[0] in [i for r in results for i in r.ready]
        slot = tiers.slot_of(ids[0])
        assert slots.held[slot][0] == ids[0]
        expected = store.load(ids[0], SHAPES)
        assert torch.equal(slots.held[slot][1][0], expected.modules[0].lora_a)
        tiers.prefetch(ids[0])  # second request: a device hit, no reload
        snapshot = tiers.metrics.snapshot()
        assert snapshot.hits == {"device": 1, "disk": 1} and snapshot.misses == {"device": 1, "host": 1}
        assert len(snapshot.load_latencies_s) == 1 and slots.loads == [ids[0]]
    finally:
        tiers.close()


def test_budgets_never_exceeded_and_pins_never_evicted(store, tmp_path):
    """Zipf traffic over 24 adapters with budgets holding a few of them; random pins like running requests."""
    ids = _make_adapters(store, tmp_path, [4, 8, 16, 32, 4, 8] * 4)
    sizes = {i: store.get(i).tensor_bytes for i in ids}
    slots = RecordingSlots()
    device_budget, host_budget = 3 * max(sizes.values()), 5 * max(sizes.values())
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=device_budget, host_budget_bytes=host_budget)
    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(ids))]
    running: list[tuple[str, int]] = []  # (adapter, steps left)
    waiting: list[str] = []
    served = 0
    try:
        for _ in range(400):
            for _ in range(rng.randint(0, 2)):
                adapter = rng.choices(ids, weights)[0]
                tiers.prefetch(adapter)
                waiting.append(adapter)
            result = tiers.poll()
            assert not result.failed
            for adapter in list(waiting):
                if tiers.slot_of(adapter) is not None and len(running) < 3:
                    tiers.pin(adapter)
                    waiting.remove(adapter)
                    running.append((adapter, rng.randint(1, 6)))
            pinned = {a for a, _ in running}
            assert tiers.resident("device") >= pinned
            assert {held[0] for held in slots.held.values()} == tiers.resident("device")
            assert tiers.bytes_used("device") == sum(sizes[a] for a in tiers.resident("device")) <= device_budget
            assert tiers.bytes_used("host") == sum(sizes[a] for a in tiers.resident("host")) <= host_budget
            still = []
            for adapter, left in running:
                assert tiers.slot_of(adapter) is not None
                if left == 1:
                    tiers.unpin(adapter)
                    served += 1
                else:
                    still.append((adapter, left - 1))
            running = still
            time.sleep(0.001)
        snapshot = tiers.metrics.snapshot()
        assert served > 100 and snapshot.evictions.get("device", 0) > 0 and snapshot.evictions.get("host", 0) > 0
        # Popular adapters should hit more often than the tail: GDSF keeps them resident.
        assert snapshot.hit_rate("device") > 0.3
    finally:
        tiers.close()


def test_request_waits_while_pinned_adapters_fill_the_device(store, tmp_path):
    a, b, c = _make_adapters(store, tmp_path, [8, 8, 8], mixed=False)
    sizes = [store.get(adapter).tensor_bytes for adapter in (a, b, c)]
    slots = RecordingSlots()
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=sizes[0] + sizes[1],
                           host_budget_bytes=sum(sizes))
    try:
        for adapter in (a, b):
            tiers.prefetch(adapter)
        _wait_until(tiers, lambda: tiers.slot_of(a) is not None and tiers.slot_of(b) is not None)
        tiers.pin(a)
        tiers.pin(b)
        tiers.prefetch(c)
        _wait_until(tiers, lambda: c in tiers.resident("host"))
        for _ in range(20):
            tiers.poll()
        assert tiers.slot_of(c) is None and slots.frees == []
        tiers.unpin(b)
        _wait_until(tiers, lambda: tiers.slot_of(c) is not None)
        assert slots.frees == [b] and tiers.slot_of(a) is not None
    finally:
        tiers.close()


def test_slot_count_limit_evicts_more(store, tmp_path):
    """Slots can run out before bytes do (a fixed slot count): the tiers evict an unpinned adapter and retry."""
    ids = _make_adapters(store, tmp_path, [4, 4, 4], mixed=False)
    slots = RecordingSlots(max_slots=2)
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=1 << 30, host_budget_bytes=1 << 30)
    try:
        for adapter in ids[:2]:
            tiers.prefetch(adapter)
            _wait_until(tiers, lambda adapter=adapter: tiers.slot_of(adapter) is not None)
        tiers.prefetch(ids[0])  # ids[0] is now the more popular one: ids[1] must make way
        tiers.prefetch(ids[2])
        _wait_until(tiers, lambda: tiers.slot_of(ids[2]) is not None)
        assert len(slots.held) == 2 and slots.frees == [ids[1]] and tiers.slot_of(ids[0]) is not None
    finally:
        tiers.close()


def test_hot_add_and_remove_while_pinned(store, tmp_path, tiny_llama):
    shapes = ModuleShapes.from_model_dir(tiny_llama.base_dir)
    slots = RecordingSlots()
    tiers = TieredAdapters(store, shapes, slots, device_budget_bytes=1 << 22, host_budget_bytes=1 << 22)
    try:
        adapter = tiers.add(tiny_llama.adapter_dirs["r4-attn"], name="hot")
        assert tiers.resolve("hot") == adapter and tiers.knows(adapter)
        tiers.prefetch(adapter)
        _wait_until(tiers, lambda: tiers.slot_of(adapter) is not None)
        tiers.pin(adapter)
        tiers.remove("hot")
        assert not tiers.knows(adapter) and adapter not in store
        assert tiers.slot_of(adapter) is not None  # the running request keeps its adapter
        tiers.prefetch(adapter)
        assert isinstance(tiers.poll().failed[adapter], AdapterRemoved)
        tiers.unpin(adapter)
        assert tiers.slot_of(adapter) is None and slots.held == {}
        assert tiers.bytes_used("device") == 0 and tiers.bytes_used("host") == 0
        # Added again later, it serves again.
        assert tiers.add(tiny_llama.adapter_dirs["r4-attn"]) == adapter and tiers.knows(adapter)
    finally:
        tiers.close()


def test_failures_are_reported_per_adapter(store, tmp_path):
    good, damaged, huge = _make_adapters(store, tmp_path, [4, 4, 64])
    data = bytearray((store.path_of(damaged) / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0xFF
    (store.path_of(damaged) / WEIGHTS_NAME).write_bytes(bytes(data))
    slots = RecordingSlots()
    budget = store.get(good).tensor_bytes * 4
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=budget, host_budget_bytes=1 << 22)
    failed = {}
    try:
        for adapter in (damaged, huge, good):
            tiers.prefetch(adapter)
        _wait_until(tiers, lambda: tiers.slot_of(good) is not None and len(failed) == 2, failures=failed)
        assert isinstance(failed[damaged], IntegrityError)
        assert isinstance(failed[huge], AdapterTooLarge) and failed[huge].tier == "device"
        assert tiers.metrics.snapshot().load_failures == 2
    finally:
        tiers.close()


def test_remote_fetch_through_http(store, tmp_path):
    from longtail.serving.adapter_store import HttpSource

    from bundle_server import BundleServer

    peer_store = AdapterStore(tmp_path / "peer")
    (remote,) = _make_adapters(peer_store, tmp_path / "peer-src", [16])
    server = BundleServer(peer_store)
    slots = RecordingSlots()
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=1 << 22, host_budget_bytes=1 << 22,
                           remote_sources=[HttpSource(server.url)])
    try:
        assert remote not in store and tiers.knows(remote)
        tiers.prefetch(remote)
        _wait_until(tiers, lambda: tiers.slot_of(remote) is not None)
        assert remote in store and store.get(remote).source.startswith("http://")
        snapshot = tiers.metrics.snapshot()
        assert snapshot.hits["remote"] == 1 and snapshot.misses["disk"] == 1
        missing = "0x" + "ee" * 32
        tiers.prefetch(missing)
        failures = {}
        _wait_until(tiers, lambda: missing in failures, failures=failures)
        assert "HTTP 404" in str(failures[missing])
    finally:
        tiers.close()
        server.close()


def test_disk_budget_trims_fetched_adapters_only(store, tmp_path):
    from longtail.serving.adapter_store import HttpSource

    from bundle_server import BundleServer

    (local,) = _make_adapters(store, tmp_path / "local-src", [32])
    peer_store = AdapterStore(tmp_path / "peer")
    remote_ids = _make_adapters(peer_store, tmp_path / "peer-src", [8, 8, 8], mixed=False)
    server = BundleServer(peer_store)
    file_bytes = peer_store.get(remote_ids[0]).file_bytes
    slots = RecordingSlots(max_slots=1)
    tiers = TieredAdapters(store, SHAPES, slots, device_budget_bytes=1 << 22, host_budget_bytes=file_bytes + 10,
                           disk_budget_bytes=store.get(local).file_bytes + 2 * file_bytes,
                           remote_sources=[HttpSource(server.url)])
    try:
        for adapter in remote_ids:
            tiers.prefetch(adapter)
            _wait_until(tiers, lambda adapter=adapter: tiers.slot_of(adapter) is not None)
        held = {r.adapter_id for r in store.list()}
        assert local in held and remote_ids[2] in held and len(held) == 3
        assert tiers.metrics.snapshot().evictions["disk"] == 1
    finally:
        tiers.close()
        server.close()


def test_prometheus_registry_exposes_tier_metrics(store, tmp_path):
    (adapter,) = _make_adapters(store, tmp_path, [4])
    registry = CollectorRegistry()
    tiers = TieredAdapters(store, SHAPES, RecordingSlots(), device_budget_bytes=1 << 20, host_budget_bytes=1 << 21,
                           metrics=AdapterMetrics(registry))
    try:
        tiers.prefetch(adapter)
        _wait_until(tiers, lambda: tiers.slot_of(adapter) is not None)
        text = generate_latest(registry).decode()
        assert 'longtail_adapter_tier_misses_total{tier="device"} 1.0' in text
        assert 'longtail_adapter_tier_hits_total{tier="disk"} 1.0' in text
        assert 'longtail_adapter_tier_budget_bytes{tier="host"} 2.097152e+06' in text
        size = store.get(adapter).tensor_bytes
        assert f'longtail_adapter_tier_bytes{{tier="device"}} {float(size)}' in text
        assert 'longtail_adapter_load_seconds_count{source="host",target="device"} 1.0' in text
        assert 'longtail_adapter_load_seconds_count{source="disk",target="host"} 1.0' in text
        assert 'longtail_adapter_wait_seconds_count{origin="disk"} 1.0' in text
    finally:
        tiers.close()


def test_random_adapter_writer_matches_peft(tiny_llama, tmp_path):
    """The fast writer the benchmark uses produces folders PEFT itself loads to the same delta."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shapes = ModuleShapes.from_model_dir(tiny_llama.base_dir)
    folder = write_random_adapter(tmp_path / "gen", shapes, 6, ("k_proj", "down_proj"), alpha=3, seed=1, std=0.2)
    record = AdapterStore(tmp_path / "h").add(folder, shapes)
    assert record.max_rank == 6 and record.targets == ("down_proj", "k_proj")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.base_dir)
    before = base.model.layers[1].self_attn.k_proj.weight.clone()
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    module = next(m for m in load_adapter(folder, shapes).modules if (m.layer, m.module) == (1, "k_proj"))
    torch.testing.assert_close(merged.model.layers[1].self_attn.k_proj.weight - before,
                               module.scale * module.lora_b @ module.lora_a, atol=1e-6, rtol=1e-5)
    with pytest.raises(AdapterRejected):
        load_adapter(folder, ModuleShapes(1, shapes.shapes))


class DeferredCopies:
    """The CPU analogue of a side stream: slot copies issued during a load are held until the event completes
    (after `lag` queries) or a fence makes the compute side wait for them, as a CUDA copy still in flight."""

    class Event:
        def __init__(self, owner: DeferredCopies, pending: list) -> None:
            self.owner, self.pending, self.queries = owner, pending, 0

        def query(self) -> bool:
            self.queries += 1
            if self.queries >= self.owner.lag:
                self.complete()
            return not self.pending

        def complete(self) -> None:
            while self.pending:
                destination, source = self.pending.pop(0)
                destination.copy_(source)

    def __init__(self, slots, lag: int = 4, fences: bool = True) -> None:
        self.slots, self.lag, self.fences = slots, lag, fences

    def run(self, load):
        pending: list = []
        immediate = self.slots.copy
        self.slots.copy = lambda destination, source: pending.append((destination, source.clone()))
        try:
            slot = load()
        finally:
            self.slots.copy = immediate
        return slot, DeferredCopies.Event(self, pending)

    def fence(self, event) -> None:
        if self.fences:
            event.complete()


def _run_during_growth(kit, fences: bool) -> tuple[list[int], list[int]]:
    """A runs; B's load grows the q/k/o buffers (8 rows held + 64 > 64) with its copies in flight."""
    from longtail.serving.engine import Engine
    from longtail.serving.sampling import SamplingParams

    engine = Engine.from_pretrained(kit.base_dir, kv_cache_bytes=4 << 20)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    try:
        a = engine.add_adapter(kit.adapter_dirs["r8-all"])
        b = engine.add_adapter(kit.adapter_dirs["r64-qko"])
        engine.generate([[2, 3]], [a], SamplingParams(max_tokens=1, temperature=0.0))  # A resident
        engine.adapters.copy_stream = DeferredCopies(engine.lora_slots, fences=fences)
        running = engine.submit([5, 9, 33, 2], a, greedy)
        while len(running.request.output_ids) < 2:
            engine.step()
        grows = engine.lora_slots.grows
        late = engine.submit([7, 1, 4], b, greedy)
        engine.step()  # admits B: its read from disk starts on a loader thread
        # Hold A's steps until B's weights are off the disk, so B's load (and the growth) lands while A still runs:
        # on a busy machine A could otherwise finish first and the unfenced run would read nothing half-copied.
        deadline = time.monotonic() + 30
        while (engine.adapters.tier_of(b) == "disk" and engine.adapters._results.empty()
               and time.monotonic() < deadline):
            time.sleep(0.001)
        while not (running.done.is_set() and late.done.is_set()):
            engine.step()
        assert engine.lora_slots.grows > grows, "B's load must grow the buffers for this test to mean anything"
        return running.wait().token_ids, late.wait().token_ids
    finally:
        engine.shutdown()


def test_buffer_growth_on_the_copy_stream_makes_every_adapter_wait(sharp_llama):
    """After a load grows the slot buffers, every adapter's rows live in tensors still being copied: the running
    adapter must wait for that copy too, not only the new one (the side-stream race of issue 22)."""
    from longtail.serving.engine import Engine
    from longtail.serving.sampling import SamplingParams

    reference = Engine.from_pretrained(sharp_llama.base_dir, kv_cache_bytes=4 << 20)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    try:
        ids = [reference.add_adapter(sharp_llama.adapter_dirs[n]) for n in ("r8-all", "r64-qko")]
        want_a, want_b = (o.token_ids for o in reference.generate([[5, 9, 33, 2], [7, 1, 4]], ids, greedy))
    finally:
        reference.shutdown()
    assert _run_during_growth(sharp_llama, fences=True) == (want_a, want_b)
    # The same run without the fence reads A's rows from the half-copied buffers: the test catches the race.
    unfenced_a, _ = _run_during_growth(sharp_llama, fences=False)
    assert unfenced_a != want_a


def test_adapters_with_waiting_requests_stay_until_a_cold_one_starves(store, tmp_path):
    """Prefer resident adapters (S-LoRA): one whose requests wait is not evicted for a newcomer, until the newcomer
    has waited `starvation_s`; then it gets a slot anyway, so a cold adapter is never starved by busy ones."""
    a, b, c = _make_adapters(store, tmp_path, [8, 8, 8], mixed=False)
    size = store.load(a, SHAPES).nbytes
    tiers = TieredAdapters(store, SHAPES, RecordingSlots(), device_budget_bytes=2 * size, host_budget_bytes=4 * size,
                           starvation_s=60.0)
    try:
        for adapter in (a, b):
            tiers.prefetch(adapter)
        _wait_until(tiers, lambda: tiers.slot_of(a) is not None and tiers.slot_of(b) is not None)
        tiers.poll()  # past the freshness guard
        busy = {a: 3, b: 1}
        tiers.prefetch(c)
        deadline = time.monotonic() + 10
        while c not in tiers.resident("host") and time.monotonic() < deadline:
            tiers.poll(busy)
            time.sleep(0.002)
        for _ in range(20):
            tiers.poll(busy)
        assert tiers.slot_of(c) is None and tiers.resident("device") == {a, b}, "busy residents are kept"
        for _ in range(3):
            tiers.poll({a: 3})  # b's queue drained: b may go
        assert tiers.slot_of(c) is not None and tiers.resident("device") == {a, c}

        tiers.starvation_s = 0.05
        d = _make_adapters(store, tmp_path / "more", [8], mixed=True)[0]  # q/v only: not a copy of a
        tiers.poll()
        tiers.prefetch(d)
        started = time.monotonic()
        while tiers.slot_of(d) is None and time.monotonic() < started + 5:
            tiers.poll({a: 2, c: 2})
            time.sleep(0.002)
        waited = time.monotonic() - started
        assert tiers.slot_of(d) is not None, "a starving adapter takes a slot from a busy (but unpinned) one"
        assert waited >= 0.05, "...but only once it has waited starvation_s"
        assert tiers.metrics.snapshot().evictions["device"] == 2
    finally:
        tiers.close()


def test_a_private_store_goes_at_shutdown_and_at_exit_without_one(tiny_llama, tmp_path):
    """An engine without a store home keeps its adapters in a temporary folder: shut down, the folder goes; a
    process that exits without shutting its engine down leaves nothing behind either."""
    import subprocess
    import sys

    from longtail.serving.engine import Engine

    engine = Engine.from_pretrained(tiny_llama.base_dir)
    engine.add_adapter(next(iter(tiny_llama.adapter_dirs.values())))
    home = Path(engine.adapters.store.home)
    assert home.is_dir()
    engine.shutdown()
    assert not home.exists()
    script = ("import sys\nfrom longtail.serving.engine import Engine\n"
              "engine = Engine.from_pretrained(sys.argv[1])\nengine.add_adapter(sys.argv[2])\n"
              "print(engine.adapters.store.home)\n")  # and exits without engine.shutdown()
    done = subprocess.run([sys.executable, "-c", script, str(tiny_llama.base_dir),
                           str(next(iter(tiny_llama.adapter_dirs.values())))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    left = Path(done.stdout.strip().splitlines()[-1])
    assert left.name.startswith("longtail-engine-adapters-") and not left.exists()
