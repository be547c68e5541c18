"""The node's Prometheus metrics, in one registry per node (tests run several nodes in one process)."""

from __future__ import annotations

import dataclasses
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ExactCounter:
    """A counter of integer base units rendered digit for digit: prometheus_client keeps a float, which loses
    base units above 2^53 (a few OPEN at 18 decimals); Prometheus reads the text as a float anyway, but any other
    reader of /metrics gets the exact figure."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self._value = 0
        self._lock = threading.Lock()

    def inc(self, amount: int = 1) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"{self.name} counts non-negative integers, got {amount!r}")
        with self._lock:
            self._value += amount

    @property
    def value(self) -> int:
        return self._value

    def render(self) -> bytes:
        return (f"# HELP {self.name}_total {self.documentation}\n# TYPE {self.name}_total counter\n"
                f"{self.name}_total {self._value}\n").encode()


@dataclasses.dataclass
class NodeMetrics:
    registry: CollectorRegistry
    requests: Counter
    tokens: Counter
    latency: Histogram
    ttft: Histogram
    receipts: Counter
    earnings: ExactCounter
    log_size: Gauge
    checkpoints: Counter
    checkpoint_failures: Counter

    @classmethod
    def create(cls) -> NodeMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("longtail_requests", "Inference requests by endpoint and outcome",
                             ["endpoint", "status"], registry=registry),
            tokens=Counter("longtail_tokens", "Tokens processed", ["kind"], registry=registry),
            latency=Histogram("longtail_request_seconds", "End-to-end request latency", registry=registry,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)),
            ttft=Histogram("longtail_ttft_seconds", "Time to first token", registry=registry,
                           buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)),
            receipts=Counter("longtail_receipts", "Receipts signed and logged", registry=registry),
            earnings=ExactCounter("longtail_earnings_open_units", "OPEN base units charged in receipts"),
            log_size=Gauge("longtail_log_size", "Receipts in this node's log", registry=registry),
            checkpoints=Counter("longtail_checkpoints", "Checkpoints posted on chain", registry=registry),
            checkpoint_failures=Counter("longtail_checkpoint_failures", "Checkpoint attempts that failed",
                                        registry=registry),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry) + self.earnings.render()
