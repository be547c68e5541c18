"""Adapter tier metrics: Prometheus objects for the node's `/metrics`, plus plain counters for benchmarks.

Every figure is kept twice on purpose: the Prometheus collectors live in a registry the
node chooses (so several engines in one test process do not collide on the global
registry), and the plain counters give scripts and tests exact numbers without
scraping text.
"""

from __future__ import annotations

import threading
from collections import Counter as PlainCounter
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TIERS = ("device", "host", "disk", "remote")
# Load latencies run from tens of microseconds (host -> device, tiny adapter) to seconds (a peer fetch).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counters at one instant, for benchmarks and tests."""

    hits: dict[str, int]
    misses: dict[str, int]
    evictions: dict[str, int]
    bytes: dict[str, int]
    budget: dict[str, int]
    load_failures: int
    load_latencies_s: tuple[float, ...]  # cold waits: admission -> usable slot, adapter from disk or a peer
    cold_buckets: tuple[tuple[float, int], ...] = ()  # cumulative: (upper bound s, cold waits at most that long)
    cold_sum_s: float = 0.0
    cold_count: int = 0

    def hit_rate(self, tier: str) -> float:
        total = self.hits.get(tier, 0) + self.misses.get(tier, 0)
        return self.hits.get(tier, 0) / total if total else float("nan")

    def latency_quantile(self, q: float) -> float:
        return quantile(list(self.load_latencies_s), q)


class AdapterMetrics:
    """Hits and misses per tier, load latency, bytes and budget per tier, evictions, failed loads."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "longtail",
                 keep_latencies: int = 100_000):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._hits = Counter("adapter_tier_hits", "Adapter lookups served by a tier", ["tier"],
                             namespace=namespace, registry=self.registry)
        self._misses = Counter("adapter_tier_misses", "Adapter lookups a tier could not serve", ["tier"],
                               namespace=namespace, registry=self.registry)
        self._evictions = Counter("adapter_evictions", "Adapters evicted from a tier to respect its budget",
                                  ["tier"], namespace=namespace, registry=self.registry)
        self._failures = Counter("adapter_load_failures", "Adapter loads that failed (rejected, corrupt, unreachable)",
                                 namespace=namespace, registry=self.registry)
        self._bytes = Gauge("adapter_tier_bytes", "Bytes of adapters resident in a tier", ["tier"],
                            namespace=namespace, registry=self.registry)
        self._budget = Gauge("adapter_tier_budget_bytes", "Byte budget of a tier", ["tier"],
                             namespace=namespace, registry=self.registry)
        self._latency = Histogram("adapter_load_seconds", "Time of one transfer of an adapter between tiers",
                                  ["source", "target"], buckets=LATENCY_BUCKETS, namespace=namespace,
                                  registry=self.registry)
        self._wait = Histogram("adapter_wait_seconds",
                               "From a request's admission to its adapter being usable on the device, by the "
                               "tier the adapter came from", ["origin"], buckets=LATENCY_BUCKETS,
                               namespace=namespace, registry=self.registry)
        self._lock = threading.Lock()
        self._plain_hits: PlainCounter[str] = PlainCounter()
        self._plain_misses: PlainCounter[str] = PlainCounter()
        self._plain_evictions: PlainCounter[str] = PlainCounter()
        self._plain_bytes: dict[str, int] = {}
        self._plain_budget: dict[str, int] = {}
        self._plain_failures = 0
        self._cold_latencies: deque[float] = deque(maxlen=keep_latencies)
        self._cold_buckets = [0] * len(LATENCY_BUCKETS)
        self._cold_sum = 0.0
        self._cold_count = 0
        # Per adapter: loads onto the device, device hits, device evictions (GET /v1/adapters, /metrics). Plain
        # counters only: a Prometheus label per adapter would grow the registry without bound with thousands.
        self._per_adapter: dict[str, PlainCounter[str]] = {}

    def _count(self, adapter_id: str | None, what: str) -> None:
        if adapter_id is not None:
            with self._lock:
                self._per_adapter.setdefault(adapter_id, PlainCounter())[what] += 1

    def per_adapter(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {key: dict(counts) for key, counts in self._per_adapter.items()}

    def hit(self, tier: str, adapter_id: str | None = None) -> None:
        self._hits.labels(tier).inc()
        with self._lock:
            self._plain_hits[tier] += 1
        if tier == "device":
            self._count(adapter_id, "hits")

    def miss(self, tier: str) -> None:
        self._misses.labels(tier).inc()
        with self._lock:
            self._plain_misses[tier] += 1

    def evicted(self, tier: str, count: int = 1, adapter_id: str | None = None) -> None:
        self._evictions.labels(tier).inc(count)
        with self._lock:
            self._plain_evictions[tier] += count
        if tier == "device":
            self._count(adapter_id, "evictions")

    def load_failed(self) -> None:
        self._failures.inc()
        with self._lock:
            self._plain_failures += 1

    def set_bytes(self, tier: str, used: int, budget: int | None = None) -> None:
        self._bytes.labels(tier).set(used)
        with self._lock:
            self._plain_bytes[tier] = used
            if budget is not None:
                self._budget.labels(tier).set(budget)
                self._plain_budget[tier] = budget

    def loaded(self, source: str, target: str, seconds: float, adapter_id: str | None = None) -> None:
        """One transfer: disk or remote -> host on the loader thread, host -> device in poll."""
        self._latency.labels(source, target).observe(seconds)
        if target == "device":
            self._count(adapter_id, "loads")

    def waited(self, origin: str, seconds: float) -> None:
        """A request's adapter became usable after `seconds`; cold when it came from disk or a peer."""
        self._wait.labels(origin).observe(seconds)
        if origin != "host":
            with self._lock:
                self._cold_latencies.append(seconds)
                self._cold_sum += seconds
                self._cold_count += 1
                for index, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self._cold_buckets[index] += 1

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(dict(self._plain_hits), dict(self._plain_misses), dict(self._plain_evictions),
                                   dict(self._plain_bytes), dict(self._plain_budget), self._plain_failures,
                                   tuple(self._cold_latencies), tuple(zip(LATENCY_BUCKETS, self._cold_buckets, strict=True)),
                                   self._cold_sum, self._cold_count)


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of a list (NaN when empty); one definition for tests and benchmarks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
