"""bench/bench_http.py end to end on the tiny model and a tiny load: every protocol answers, and
its JSON has a row per RPC, caller count and protocol, each with its ratio to gRPC."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conftest import TESTS, TINY

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import bench_http  # noqa: E402


def test_bench_http_writes_a_row_per_rpc_callers_and_protocol(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))  # python:tiny_models
    out = tmp_path / "bench_http.json"
    argv = ["--model", TINY, "--callers", "1,2", "--seconds", "0.4", "--warmup", "0.1",
            "--rounds", "1", "--json", str(out)]
    assert bench_http.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].split()[1:] == ["bench/bench_http.py", *argv]
    rows = doc["rows"]
    assert {(r["rpc"], r["callers"], r["protocol"]) for r in rows} == {
        (rpc, n, protocol) for rpc in bench_http.RPCS for n in (1, 2)
        for protocol in bench_http.PROTOCOLS}
    for row in rows:
        assert row["images_per_s"] > 0 and set(row["codes"]) == {"OK"}, row
        assert row["ratio_to_grpc"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        if row["protocol"] == "gRPC":
            assert row["ratio_to_grpc"] == 1.0
    assert "HTTP binary OIP" in capsys.readouterr().out
