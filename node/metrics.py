"""The node's Prometheus metrics, in one registry per node (tests run several nodes in one process)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


@dataclasses.dataclass
class NodeMetrics:
    registry: CollectorRegistry
    requests: Counter
    tokens: Counter
    latency: Histogram
    ttft: Histogram
    receipts: Counter
    earnings: Counter
    log_size: Gauge
    checkpoints: Counter
    checkpoint_failures: Counter
    adapter_credits: Counter

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
            earnings=Counter("longtail_earnings_open_units", "OPEN base units charged in receipts",
                             registry=registry),
            log_size=Gauge("longtail_log_size", "Receipts in this node's log", registry=registry),
            checkpoints=Counter("longtail_checkpoints", "Checkpoints posted on chain", registry=registry),
            checkpoint_failures=Counter("longtail_checkpoint_failures", "Checkpoint attempts that failed",
                                        registry=registry),
            adapter_credits=Counter("longtail_adapter_credits", "Adapter credits by outcome (stored, skipped "
                                    "when the backlog is full, failed)", ["outcome"], registry=registry),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
