"""The Server-Timing header the node sends and the client reads back."""

from __future__ import annotations

import pytest

from longtail.node.timing import StageTimes, parse_server_timing


def test_stage_times_round_trip_through_the_header():
    times = StageTimes()
    times.add("engine", 0.8125)
    times.add("payment", 0.0004)
    times.add("payment", 0.0002)  # a stage entered twice (reserve, then settle) accumulates
    with times.stage("receipt"):
        pass
    parsed = parse_server_timing(times.header())
    assert list(parsed) == ["engine", "payment", "receipt"]
    assert parsed["engine"] == pytest.approx(812.5) and parsed["payment"] == pytest.approx(0.6)
    assert 0 <= parsed["receipt"] < 5


def test_parse_accepts_the_standards_forms_and_skips_metrics_without_duration():
    header = 'cache;desc="Cache Read";dur=23.2, miss, db;dur=53, app;dur="47.2", bad;dur=x'
    assert parse_server_timing(header) == {"cache": 23.2, "db": 53.0, "app": 47.2}
    assert parse_server_timing(None) == {} and parse_server_timing("") == {}
