"""Where one request's time went, as the standard `Server-Timing` header (W3C Server Timing).

The node names its stages (`engine`, `payment`, `receipt`, `total`) so a client
or a benchmark can subtract the engine's share from its own latency and see
exactly what HTTP, payment and the receipt add.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

HEADER = "Server-Timing"


@dataclasses.dataclass
class StageTimes:
    """Seconds spent per named stage of one request; a stage entered twice accumulates."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def header(self) -> str:
        """`engine;dur=812.345, payment;dur=0.412, ...`: durations in milliseconds, as the standard says."""
        return ", ".join(f"{name};dur={1000 * seconds:.3f}" for name, seconds in self.seconds.items())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """{metric name: duration in ms} from a Server-Timing header; metrics without `dur` are left out."""
    durations: dict[str, float] = {}
    for metric in (value or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip().lower() == "dur" and name:
                try:
                    durations[name] = float(raw.strip().strip('"'))
                except ValueError:
                    continue
    return durations
