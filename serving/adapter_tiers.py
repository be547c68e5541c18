"""Adapters moving between tiers under byte budgets: device <- host <- disk <- remote, never stalling the batch.

`TieredAdapters` is the engine's `AdapterProvider`. The scheduler calls `prefetch` when a
request is admitted, keeps the request waiting while `slot_of` is None, `pin`s the
adapter while the request runs and `unpin`s it when it leaves; the engine calls `poll`
once per step. Disk and remote reads run on a background thread; `poll` only installs
finished host copies into device slots (on CUDA through a side stream), so a step never
waits on a file or a peer.

Eviction is GreedyDual-Size-Frequency (Cherkasova 1998), per tier: an adapter's priority
is `clock + frequency * reload_cost / size`, the victim is the lowest priority that is not
pinned and not in use, and the clock rises to each victim's priority so that long-unused
adapters age out. `reload_cost` models the time to bring the adapter back from the tier
below (a fixed latency plus bytes over bandwidth, both measured as loads happen), so a
small, popular adapter is kept before a large one requested as often: it costs the
next tier more per byte to bring back.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from longtail.serving.adapter_metrics import AdapterMetrics
from longtail.serving.adapter_provider import AdapterInfo, PollResult
from longtail.serving.adapter_store import (
    AdapterNotFound,
    AdapterStore,
    AdapterStoreError,
    RemoteSource,
    is_adapter_id,
)
from longtail.serving.errors import AdapterRemoved, AdapterSlotsFull, AdapterTooLarge
from longtail.serving.lora_slots import LoraSlots
from longtail.serving.peft_format import AdapterRejected, AdapterWeights, ModuleShapes

__all__ = ["AdapterRemoved", "AdapterTooLarge", "PollResult", "TieredAdapters"]  # the errors live in serving.errors


# ---------------------------------------------------------------- policy


@dataclass
class _Cost:
    """Reload cost model of one tier: fixed latency plus bytes over bandwidth, refined by observed loads."""

    latency_s: float
    bytes_per_s: float

    def of(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    def observe(self, nbytes: int, seconds: float) -> None:
        # Exponential moving average of the bandwidth beyond the fixed latency; keeps the model current.
        if seconds > self.latency_s and nbytes > 0:
            measured = nbytes / (seconds - self.latency_s)
            self.bytes_per_s = 0.8 * self.bytes_per_s + 0.2 * measured


class GreedyDualSizeFrequency:
    """GDSF priorities for one tier's residents. Pure bookkeeping: the tier decides who may be evicted."""

    def __init__(self, cost: _Cost):
        self.cost = cost
        self.clock = 0.0
        self.priority: dict[str, float] = {}
        self.sizes: dict[str, int] = {}

    def admit(self, key: str, nbytes: int, frequency: float) -> None:
        self.sizes[key] = nbytes
        self.refresh(key, frequency)

    def refresh(self, key: str, frequency: float) -> None:
        if key in self.sizes:
            size = max(1, self.sizes[key])
            self.priority[key] = self.clock + frequency * self.cost.of(size) / size

    def forget(self, key: str) -> None:
        self.priority.pop(key, None)
        self.sizes.pop(key, None)

    def victim(self, evictable: Callable[[str], bool]) -> str | None:
        """The lowest-priority evictable key (ties: the smaller one costs less to refetch... the older key)."""
        best = None
        for key, priority in self.priority.items():
            if evictable(key) and (best is None or priority < self.priority[best]):
                best = key
        return best

    def evicted(self, key: str) -> None:
        # Inflation: future admissions start from the victim's priority, so old favourites age out.
        self.clock = max(self.clock, self.priority.get(key, self.clock))
        self.forget(key)


class ByteBudgetTier:
    """A set of resident adapters whose bytes never exceed `budget`, with GDSF eviction."""

    def __init__(self, name: str, budget: int, cost: _Cost):
        self.name = name
        self.budget = int(budget)
        self.policy = GreedyDualSizeFrequency(cost)
        self.sizes: dict[str, int] = {}
        self.used = 0

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    def plan_room(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str] | None:
        """Victims (in eviction order) that free room for `nbytes`, or None when pinned residents block it."""
        if nbytes > self.budget:
            return None
        victims: list[str] = []
        free = self.budget - self.used
        chosen: set[str] = set()
        while free < nbytes:
            key = self.policy.victim(lambda k: k not in chosen and evictable(k))
            if key is None:
                return None
            chosen.add(key)
            victims.append(key)
            free += self.sizes[key]
        return victims

    def admit(self, key: str, nbytes: int, frequency: float) -> None:
        assert self.used + nbytes <= self.budget, (self.name, self.used, nbytes, self.budget)
        self.sizes[key] = nbytes
        self.used += nbytes
        self.policy.admit(key, nbytes, frequency)

    def evict(self, key: str) -> None:
        self.used -= self.sizes.pop(key)
        self.policy.evicted(key)

    def drop(self, key: str) -> None:
        """Remove without aging the clock (a deleted adapter is not a cache decision)."""
        if key in self.sizes:
            self.used -= self.sizes.pop(key)
            self.policy.forget(key)


# ---------------------------------------------------------------- device slots


class DeviceSlots(Protocol):
    """What the tiers need from the engine's device-side LoRA buffers (`serving.lora_slots.LoraSlots`)."""

    def load(self, weights: AdapterWeights) -> int:
        """Copy an adapter's factors into a free slot and return the slot index."""
        ...

    def free(self, adapter_id: str) -> None:
        """Release the adapter's slot; its buffers may be overwritten by the next load."""
        ...


@dataclass
class _DeviceEntry:
    slot: int
    nbytes: int
    ready: CopyEvent | None  # None: the copy is complete
    wait: _Want | None = None  # the request wait this copy ends, timed when the copy completes


@dataclass
class _Want:
    """An adapter some admitted request waits for: since when, and which tier it came up from."""

    requested_at: float
    origin: str = "host"  # "disk" or "remote" once a background load for this wait has finished


@dataclass(frozen=True)
class _Loaded:
    adapter_id: str
    weights: AdapterWeights | None
    error: Exception | None
    source: str  # "disk" or "remote"
    seconds: float


@dataclass(frozen=True)
class TierConfig:
    """The tiers of one engine in plain values, so the engine process can build its own from them.

    `store_home`: the `AdapterStore` home the node imports adapters into (None: a private temporary store, for
    tests and scripts). Budgets are bytes of adapter factors in the engine's dtype; there is no cap on how many
    adapters the store holds or the device serves, only on their bytes (docs/adapters.md).
    """

    store_home: str | None = None
    device_bytes: int | None = None  # None: the engine sizes it (CUDA: from free memory; CPU: CPU_ADAPTER_BYTES)
    host_bytes: int = 2 << 30
    disk_bytes: int | None = None
    max_rank: int = 256
    loader_threads: int = 2


class TieredAdapters:
    """The engine's adapter provider: device slots, host copies, the disk store and remote peers."""

    def __init__(self, store: AdapterStore, shapes: ModuleShapes, slots: DeviceSlots, *,
                 device_budget_bytes: int, host_budget_bytes: int, disk_budget_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 remote_sources: Iterable[RemoteSource] = (), metrics: AdapterMetrics | None = None,
                 loader_threads: int = 1, frequency_half_life: int = 10_000,
                 copy_bytes_per_poll: int = 32 << 20, copy_stream: CopyStream | None = None,
                 starvation_s: float = 1.0):
        self.store = store
        self.shapes = shapes
        self.slots = slots
        self.dtype = dtype
        self.device = torch.device(device)
        self.remote_sources = list(remote_sources)
        self.metrics = metrics or AdapterMetrics()
        self.disk_budget_bytes = disk_budget_bytes
        self.copy_bytes_per_poll = copy_bytes_per_poll
        self._pin_host = self.device.type == "cuda" and torch.cuda.is_available()
        self.copy_stream = copy_stream or (CudaCopyStream(self.device) if self._pin_host else ImmediateCopies())
        self._device_cost = _Cost(latency_s=5e-5, bytes_per_s=8e9 if self._pin_host else 4e9)
        self._host_cost = _Cost(latency_s=2e-3, bytes_per_s=1e9)
        self.device_tier = ByteBudgetTier("device", device_budget_bytes, self._device_cost)
        self.host_tier = ByteBudgetTier("host", host_budget_bytes, self._host_cost)
        self._device: dict[str, _DeviceEntry] = {}
        self._host: dict[str, AdapterWeights] = {}
        self._frequency: Counter[str] = Counter()
        self._accesses = 0
        self._half_life = frequency_half_life
        self._pins: Counter[str] = Counter()
        self._wanted: OrderedDict[str, _Want] = OrderedDict()  # oldest request first
        self._in_flight: set[str] = set()
        self._removed: set[str] = set()
        self._known: set[str] = set()
        self._failed: dict[str, Exception] = {}
        self._deferred: list[_Loaded] = []  # loaded, waiting for host room
        self._fresh: set[str] = set()  # became ready in this poll: not evictable before the scheduler sees them
        self._broken: dict[str, float] = {}  # adapter -> monotonic time until which knows() says no
        self.broken_hold_s = 2.0
        self._demand: dict[str, int] = {}
        self.starvation_s = starvation_s
        self._lock = threading.RLock()
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._results: queue.Queue[_Loaded] = queue.Queue()
        self._workers = [threading.Thread(target=self._work, name=f"adapter-loader-{i}", daemon=True)
                         for i in range(loader_threads)]
        for worker in self._workers:
            worker.start()
        self._publish_bytes()

    # ------------------------------------------------------------ AdapterProvider

    def add(self, path: Path | str, name: str | None = None) -> str:
        """Import a PEFT folder into the store (validated) and make it servable now; returns its id."""
        record = self.store.add(Path(path), self.shapes, name=name)
        with self._lock:
            self._broken.pop(record.adapter_id, None)
            self._removed.discard(record.adapter_id)
            self._known.add(record.adapter_id)
        return record.adapter_id

    def resolve(self, name_or_id: str) -> str:
        """An alias or id -> the adapter id (ids not held locally pass through for remote fetching)."""
        if is_adapter_id(name_or_id.lower()):
            return name_or_id.lower()
        return self.store.resolve(name_or_id)

    def knows(self, adapter_id: str) -> bool:
        """True when the adapter is resident, on disk, or fetchable from a configured remote source."""
        with self._lock:
            if adapter_id in self._removed:
                return False
            broken_until = self._broken.get(adapter_id)
            if broken_until is not None:
                # A load just failed: report the adapter unknown for a moment so an engine that ignores
                # PollResult.failed still fails the waiting requests instead of holding them forever.
                if time.monotonic() < broken_until:
                    return False
                del self._broken[adapter_id]
            if adapter_id in self._known or adapter_id in self._host or adapter_id in self._device:
                return True
        if adapter_id in self.store:
            with self._lock:
                self._known.add(adapter_id)
            return True
        return bool(self.remote_sources) and is_adapter_id(adapter_id)

    def prefetch(self, adapter_id: str) -> None:
        """A request for `adapter_id` was admitted: count the access and start bringing it to the device."""
        with self._lock:
            if adapter_id in self._removed:
                self._failed[adapter_id] = AdapterRemoved(adapter_id)
                return
            self._touch(adapter_id)
            if adapter_id in self._device:
                self.metrics.hit("device", adapter_id)
                return
            self.metrics.miss("device")
            if adapter_id not in self._wanted:
                self._want(adapter_id)

    def _want(self, adapter_id: str) -> None:
        """Start bringing an adapter to the device: from the host copy, or from disk / a peer in the background."""
        self._wanted[adapter_id] = _Want(time.perf_counter())
        if adapter_id in self._host:
            self.metrics.hit("host")
            return
        if adapter_id in self._in_flight:
            return
        self.metrics.miss("host")
        self._in_flight.add(adapter_id)
        self._jobs.put(adapter_id)

    def slot_of(self, adapter_id: str) -> int | None:
        """The device slot holding the adapter, or None while it is still loading.

        The scheduler asks this for every waiting request each step, so it is also the demand
        signal: an adapter that was evicted before its waiting request was admitted is wanted again.
        """
        entry = self._device.get(adapter_id)
        if entry is not None and entry.ready is None:
            return entry.slot
        if entry is None:
            with self._lock:
                if adapter_id not in self._wanted and adapter_id not in self._removed \
                        and adapter_id not in self._broken:
                    self._want(adapter_id)
        return None

    def pin(self, adapter_id: str) -> None:
        """A running request uses the adapter: it must stay on the device until unpinned."""
        with self._lock:
            self._pins[adapter_id] += 1

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            self._pins[adapter_id] -= 1
            if self._pins[adapter_id] <= 0:
                del self._pins[adapter_id]
                if adapter_id in self._removed:
                    self._unload(adapter_id)

    def poll(self, demand: dict[str, int] | None = None) -> PollResult:
        """Install finished loads, move wanted adapters from host into device slots; never blocks on I/O.

        `demand`: waiting requests per adapter, from the scheduler's queues. A resident adapter with waiting
        requests is kept (its requests are about to run: evicting it would load it again), unless an adapter has
        been wanted for `starvation_s`: then it may take any unpinned slot, so a cold adapter is never starved by
        busy ones (S-LoRA's rule: prefer resident adapters, but bound the wait of a cold one).
        """
        ready: list[str] = []
        with self._lock:
            self._demand = demand or {}
            # Adapters made ready by the previous poll have had one scheduling pass to be pinned.
            self._fresh.clear()
            self._finish_device_copies(ready)
            deferred, self._deferred = self._deferred, []
            while True:
                try:
                    deferred.append(self._results.get_nowait())
                except queue.Empty:
                    break
            for loaded in deferred:
                self._accept(loaded)
            self._fill_device(ready)
            failed, self._failed = self._failed, {}
            self._publish_bytes()
        return PollResult(tuple(ready), failed)

    def remove(self, name_or_id: str, *, delete_files: bool = True) -> str:
        """Hot remove: new requests fail at once; memory is freed when the last running request unpins it."""
        adapter_id = self.resolve(name_or_id)
        with self._lock:
            self._removed.add(adapter_id)
            self._known.discard(adapter_id)
            if self._wanted.pop(adapter_id, None) is not None:
                self._failed[adapter_id] = AdapterRemoved(adapter_id)
            if not self._pins.get(adapter_id):
                self._unload(adapter_id)
            self._publish_bytes()
        if delete_files:
            try:
                self.store.remove(adapter_id)
            except AdapterNotFound:
                pass
        return adapter_id

    @classmethod
    def from_config(cls, config: TierConfig, shapes: ModuleShapes, slots: LoraSlots,
                    metrics: AdapterMetrics | None = None) -> TieredAdapters:
        """The tiers an engine builds for itself over its own `LoraSlots` (the device tier)."""
        private = tempfile.mkdtemp(prefix="longtail-engine-adapters-") if config.store_home is None else None
        store = AdapterStore(private or config.store_home, max_rank=config.max_rank)
        tiers = cls(store, shapes, slots, device_budget_bytes=config.device_bytes,
                    host_budget_bytes=config.host_bytes, disk_budget_bytes=config.disk_bytes,
                    dtype=slots.dtype, device=slots.device, metrics=metrics, loader_threads=config.loader_threads)
        # Removed at close, or when the process exits without one (a script that never shuts its engine down
        # would otherwise leave a copy of every adapter it served in the temporary folder).
        tiers._private_cleanup = weakref.finalize(tiers, shutil.rmtree, private, True) if private else None
        return tiers

    @classmethod
    def attach(cls, engine, store: AdapterStore, **options) -> TieredAdapters:
        """Serve `engine`'s adapters from the tiers, using the engine's own `LoraSlots` as the device tier.

        The engine builds its slots in its constructor, so the provider is attached afterwards.
        """
        tiers = cls(store, engine.model_config.module_shapes(), engine.lora_slots,
                    dtype=engine.lora_slots.dtype, device=engine.lora_slots.device, **options)
        engine.adapters = tiers
        return tiers

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=5)
        cleanup = getattr(self, "_private_cleanup", None)
        if cleanup is not None:
            cleanup()

    # ------------------------------------------------------------ introspection (tests, benchmarks, /metrics)

    def tier_of(self, adapter_id: str) -> str:
        """The fastest tier holding the adapter now: "device", "host" or "disk"."""
        with self._lock:
            return "device" if adapter_id in self._device else "host" if adapter_id in self._host else "disk"

    def describe(self, tokens_served: dict[str, int]) -> list[AdapterInfo]:
        """Every stored adapter (store order) with its tier and counters; `tokens_served` comes from the engine."""
        per_adapter = self.metrics.per_adapter()
        infos = []
        for record in self.store.list():
            if record.adapter_id in self._removed:
                continue
            counts = per_adapter.get(record.adapter_id, {})
            infos.append(AdapterInfo(record.adapter_id, tuple(record.names), self.tier_of(record.adapter_id),
                                     record.tensor_bytes, record.file_bytes, record.max_rank, tuple(record.targets),
                                     counts.get("loads", 0), counts.get("hits", 0), counts.get("evictions", 0),
                                     tokens_served.get(record.adapter_id, 0), self._pins.get(record.adapter_id, 0)))
        return infos

    def resident(self, tier: str) -> set[str]:
        with self._lock:
            return set(self._device if tier == "device" else self._host)

    def bytes_used(self, tier: str) -> int:
        return (self.device_tier if tier == "device" else self.host_tier).used

    # ------------------------------------------------------------ internals

    def _touch(self, adapter_id: str) -> None:
        self._accesses += 1
        if self._accesses % self._half_life == 0:
            # Halve every count now and then so yesterday's favourite does not stay resident forever.
            for key in list(self._frequency):
                self._frequency[key] /= 2
        self._frequency[adapter_id] += 1
        frequency = self._frequency[adapter_id]
        self.device_tier.policy.refresh(adapter_id, frequency)
        self.host_tier.policy.refresh(adapter_id, frequency)

    def _work(self) -> None:
        """Background loader: disk (memory-mapped safetensors) or remote -> host tensors, validated."""
        while True:
            adapter_id = self._jobs.get()
            if adapter_id is None:
                return
            started = time.perf_counter()
            source = "disk"
            try:
                if adapter_id not in self.store:
                    source = "remote"
                    if not self.remote_sources:
                        raise AdapterNotFound(adapter_id)
                    self.store.fetch(adapter_id, self.remote_sources, self.shapes)
                weights = self.store.load(adapter_id, self.shapes, dtype=self.dtype)
                if self._pin_host:
                    weights = _pinned(weights)
                self._results.put(_Loaded(adapter_id, weights, None, source, time.perf_counter() - started))
            except (AdapterStoreError, AdapterRejected, OSError) as error:
                self._results.put(_Loaded(adapter_id, None, error, source, time.perf_counter() - started))

    def _accept(self, loaded: _Loaded) -> None:
        adapter_id = loaded.adapter_id
        self._in_flight.discard(adapter_id)
        if adapter_id in self._removed:
            return
        if loaded.error is not None:
            self._fail(adapter_id, loaded.error)
            return
        if loaded.source == "remote":
            self.metrics.miss("disk")
        self.metrics.hit(loaded.source)
        self.metrics.loaded(loaded.source, "host", loaded.seconds)
        self._host_cost.observe(loaded.weights.nbytes, loaded.seconds)
        if loaded.source == "remote":
            self._trim_disk(protect=adapter_id)
        self._known.add(adapter_id)
        if adapter_id in self._wanted:
            self._wanted[adapter_id].origin = loaded.source
        if not self._host_admit(adapter_id, loaded.weights):
            # Host is full of adapters waiting for the device: retry after the next device copies.
            self._deferred.append(loaded)
            self._in_flight.add(adapter_id)

    def _host_admit(self, adapter_id: str, weights: AdapterWeights) -> bool:
        if adapter_id in self._host:
            return True
        if weights.nbytes > self.host_tier.budget:
            self._fail(adapter_id, AdapterTooLarge(adapter_id, "host", weights.nbytes, self.host_tier.budget))
            return True
        # Adapters still waiting for their device copy are protected; everything else may go.
        victims = self.host_tier.plan_room(weights.nbytes, lambda k: k not in self._wanted)
        if victims is None:
            return False
        for victim in victims:
            self.host_tier.evict(victim)
            del self._host[victim]
        if victims:
            self.metrics.evicted("host", len(victims))
        self._host[adapter_id] = weights
        self.host_tier.admit(adapter_id, weights.nbytes, self._frequency[adapter_id])
        return True

    def _fill_device(self, ready: list[str]) -> None:
        """Copy wanted adapters that are on the host into device slots, oldest request first.

        At most `copy_bytes_per_poll` per call (and at least one adapter), so one step never pays
        for a burst of cold adapters at once; the rest follow on the next steps.
        """
        copied = 0
        for adapter_id in list(self._wanted):
            if copied >= self.copy_bytes_per_poll:
                break
            if adapter_id in self._device:
                self._wanted.pop(adapter_id)
                continue
            weights = self._host.get(adapter_id)
            if weights is None:
                continue
            if weights.nbytes > self.device_tier.budget:
                self._fail(adapter_id, AdapterTooLarge(adapter_id, "device", weights.nbytes,
                                                        self.device_tier.budget))
                continue
            starving = time.perf_counter() - self._wanted[adapter_id].requested_at >= self.starvation_s
            evictable = self._device_evictable if starving else self._device_idle
            victims = self.device_tier.plan_room(weights.nbytes, evictable)
            if victims is None:
                continue  # every resident adapter is in use or about to be: the request keeps waiting
            for victim in victims:
                self._device_evict(victim)
            try:
                if not self._device_load(adapter_id, weights):
                    continue
            except (ValueError, RuntimeError) as error:
                # The slots refused the adapter (e.g. the engine's AdapterIncompatible): fail its requests only.
                self._fail(adapter_id, error)
                continue
            copied += weights.nbytes
            entry = self._device[adapter_id]
            entry.wait = self._wanted.pop(adapter_id)
            if entry.ready is None:
                self._ready(adapter_id, entry, ready)

    def _device_idle(self, adapter_id: str) -> bool:
        """Evictable, and no request waits for it."""
        return self._device_evictable(adapter_id) and not self._demand.get(adapter_id)

    def _device_evictable(self, adapter_id: str) -> bool:
        return (not self._pins.get(adapter_id) and adapter_id not in self._fresh
                and self._device[adapter_id].ready is None)

    def _device_load(self, adapter_id: str, weights: AdapterWeights) -> bool:
        """Copy into a slot; on CUDA on the side stream, after the compute stream's pending reads of old slots."""
        started = time.perf_counter()
        while True:
            grows = getattr(self.slots, "grows", 0)
            try:
                slot, event = self.copy_stream.run(lambda: self.slots.load(weights))
                break
            except AdapterSlotsFull:
                # Slots with a resource our byte model does not see (a fixed slot count, a rank width) ran out:
                # evict by the same policy and retry. `LoraSlots` grows instead and never raises this.
                victim = self.device_tier.policy.victim(self._device_evictable)
                if victim is None:
                    return False
                self._device_evict(victim)
        if event is not None and getattr(self.slots, "grows", 0) != grows:
            # The load reallocated the slot buffers: every adapter's rows now live in tensors whose copy may still
            # be in flight, so every later step waits for it, not only the new adapter's requests.
            self.copy_stream.fence(event)
        self._device[adapter_id] = _DeviceEntry(slot, weights.nbytes, event)
        self._fresh.add(adapter_id)
        self.device_tier.admit(adapter_id, weights.nbytes, self._frequency[adapter_id])
        copy_seconds = time.perf_counter() - started  # on CUDA: the time to enqueue, the copy overlaps compute
        self._device_cost.observe(weights.nbytes, copy_seconds)
        self.metrics.loaded("host", "device", copy_seconds, adapter_id)
        return True

    def _finish_device_copies(self, ready: list[str]) -> None:
        for adapter_id, entry in self._device.items():
            if entry.ready is not None and entry.ready.query():
                entry.ready = None
                self._ready(adapter_id, entry, ready)

    def _ready(self, adapter_id: str, entry: _DeviceEntry, ready: list[str]) -> None:
        """A device copy completed: the waiting requests may run; time their wait."""
        ready.append(adapter_id)
        self._fresh.add(adapter_id)
        wait, entry.wait = entry.wait, None
        if wait is not None:
            waited = time.perf_counter() - wait.requested_at
            self.metrics.waited(wait.origin, waited)

    def _device_evict(self, adapter_id: str) -> None:
        self._device.pop(adapter_id)
        self.slots.free(adapter_id)
        self.device_tier.evict(adapter_id)
        self.metrics.evicted("device", adapter_id=adapter_id)

    def _unload(self, adapter_id: str) -> None:
        if self._device.pop(adapter_id, None) is not None:
            self.slots.free(adapter_id)
            self.device_tier.drop(adapter_id)
        if self._host.pop(adapter_id, None) is not None:
            self.host_tier.drop(adapter_id)
        self._frequency.pop(adapter_id, None)

    def _fail(self, adapter_id: str, error: Exception) -> None:
        self.metrics.load_failed()
        self._wanted.pop(adapter_id, None)
        self._failed[adapter_id] = error
        self._broken[adapter_id] = time.monotonic() + self.broken_hold_s

    def _trim_disk(self, protect: str) -> None:
        """Keep adapters fetched from peers within the disk budget; adapters added by the operator stay."""
        if self.disk_budget_bytes is None:
            return
        records = self.store.list()
        used = sum(r.file_bytes for r in records)
        cached = [r for r in records if r.source.startswith(("http://", "https://", "peer:"))
                  and r.adapter_id != protect and r.adapter_id not in self._host
                  and r.adapter_id not in self._device and r.adapter_id not in self._in_flight]
        cached.sort(key=lambda r: self._frequency.get(r.adapter_id, 0) / max(1, r.file_bytes))
        evicted = 0
        for record in cached:
            if used <= self.disk_budget_bytes:
                break
            self.store.remove(record.adapter_id)
            self._known.discard(record.adapter_id)
            used -= record.file_bytes
            evicted += 1
        if evicted:
            self.metrics.evicted("disk", evicted)
        self.metrics.set_bytes("disk", used, self.disk_budget_bytes)

    def _publish_bytes(self) -> None:
        self.metrics.set_bytes("device", self.device_tier.used, self.device_tier.budget)
        self.metrics.set_bytes("host", self.host_tier.used, self.host_tier.budget)


# What a `DeviceSlots.load` with no free slot raises; the tiers evict and retry. One class with the engine's error,
# so the `except` catches what real slots raise (it once named a class nothing raised).
SlotsFull = AdapterSlotsFull


class CopyEvent(Protocol):
    def query(self) -> bool: ...


class CopyStream(Protocol):
    """Where host -> device copies run: `run(load)` issues them (returns load's value and an event, None when the
    copy is already complete); `fence(event)` makes every later step wait for that copy."""

    def run(self, load: Callable[[], int]) -> tuple[int, CopyEvent | None]: ...
    def fence(self, event: CopyEvent) -> None: ...


class ImmediateCopies:
    """CPU: the slot buffers are the "device"; a copy is complete when `load` returns."""

    def run(self, load: Callable[[], int]) -> tuple[int, CopyEvent | None]:
        return load(), None

    def fence(self, event: CopyEvent) -> None:
        return None


class CudaCopyStream:
    """A side stream for slot copies, so a cold adapter's upload overlaps the running batch's compute."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def run(self, load: Callable[[], int]) -> tuple[int, CopyEvent | None]:
        # After the compute stream's pending reads: a freed slot's rows may be overwritten only once nobody reads them.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            slot = load()
            event = torch.cuda.Event()
            event.record(self.stream)
        return slot, event

    def fence(self, event: CopyEvent) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


def _pinned(weights: AdapterWeights) -> AdapterWeights:
    """A copy of the factors in page-locked host memory, so host -> device copies can run asynchronously."""
    from dataclasses import replace

    modules = tuple(replace(m, lora_a=m.lora_a.pin_memory(), lora_b=m.lora_b.pin_memory()) for m in weights.modules)
    return replace(weights, modules=modules)
