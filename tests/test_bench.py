"""The load generator's arithmetic, without a node."""

from __future__ import annotations

import array

import pytest

from dcache.bench import BenchConfig, OpRecord, parse_ratio, summarize


def test_parse_ratio() -> None:
    assert parse_ratio("1:10") == (1, 10)
    assert parse_ratio("0:1") == (0, 1)
    for bad in ("1", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError, match="--ratio"):
            parse_ratio(bad)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BenchConfig(servers=("x",), sets=0, gets=0)
    with pytest.raises(ValueError):
        BenchConfig(servers=("x",), ops=0)
    with pytest.raises(ValueError):
        BenchConfig(servers=("x",), clients=0)
    with pytest.raises(ValueError):
        BenchConfig(servers=())


def test_percentiles_are_exact_on_known_data() -> None:
    record = OpRecord(latencies=array.array("d", [i / 1000 for i in range(1, 1001)]))  # 1..1000 ms
    record.misses = 3
    s = summarize("get", record, elapsed=2.0)
    assert s.count == 1000 and s.ops_per_s == 500
    assert s.p50_ms == pytest.approx(500)
    assert s.p99_ms == pytest.approx(990)
    assert s.p999_ms == pytest.approx(999)
    assert s.max_ms == pytest.approx(1000)
    assert s.misses == 3
