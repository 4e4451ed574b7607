"""The benchmark harness end to end (a script against a real server with a tiny model and a
tiny load writes its JSON), and docs/benchmarks.md is what bench/report.py makes from the
committed results, so the page cannot drift from them."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import TESTS, TINY

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import bench_workers  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

KEYS = {"script", "command", "date", "commit", "machine", "versions", "load_average",
        "settings", "rows", "notes"}


def _valid(doc: dict, script: str) -> None:
    assert KEYS <= set(doc), KEYS - set(doc)
    assert doc["script"] == script
    assert doc["command"].split()[1] == f"bench/{script}.py"
    assert {"cpu", "cores"} <= set(doc["machine"]) and doc["machine"]["cores"] >= 1
    assert {"python", "torch"} <= set(doc["versions"])
    assert len(doc["load_average"]["before"]) == 3 and len(doc["load_average"]["after"]) == 3
    assert doc["rows"] and all("table" in row for row in doc["rows"])


def test_a_script_against_a_real_server_writes_its_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))  # python:tiny_models
    out = tmp_path / "workers.json"
    argv = ["--model", TINY, "--configs", "1x1", "--callers", "2", "--seconds", "0.5",
            "--warmup", "0.2", "--rounds", "1", "--json", str(out)]
    assert bench_workers.main(argv) == 0
    doc = json.loads(out.read_text())
    _valid(doc, "bench_workers")
    assert doc["command"].split()[1:] == ["bench/bench_workers.py", *argv]
    rows = {row["rpc"]: row for row in doc["rows"]}
    assert set(rows) == {"Predict", "Explain"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["engine_b8_images_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["ratio"] > 0 and row["mean_batch"] >= 1
    printed = capsys.readouterr().out
    assert harness.render(doc) in printed  # the tables it printed are the ones it wrote


def test_thread_callers_record_errors_and_windows():
    def call(i):
        time.sleep(0.01)
        if i == 1:
            raise ValueError("no")
        return i

    calls = harness.closed_loop(call, 2, seconds=0.3, warmup=0.05, errors=(ValueError,))
    assert calls.codes["OK"] > 5 and calls.codes["ValueError"] > 5
    assert calls.answers and set(calls.answers) == {0}
    assert 0.2 < calls.seconds < 1.0 and calls.rate > 10
    assert calls.percentiles()["p50_ms"] >= 10
    with pytest.raises(ValueError):  # an error the callers do not record stops the run
        harness.closed_loop(call, 2, seconds=0.05)


def test_results_round_trip_and_render(tmp_path):
    results = harness.Results("bench/example.py", ["--quick"])
    assert results.doc["command"].endswith(" bench/example.py --quick")
    results.row("a table", case="x", ms=12.3456, rounds=[1.0, 2.5], codes={"OK": 3})
    results.row("a table", case="y|z", ms=None, rounds=[], codes={})
    results.note("A note.")
    doc = json.loads(results.finish(str(tmp_path / "x.json")).read_text())
    assert harness.render(doc) == (
        "### a table\n\n| case | ms | rounds | codes |\n|---|---:|---|---|\n"
        "| x | 12.3 | 1.00, 2.50 | OK: 3 |\n| y\\|z |  |  |  |\n\nA note.\n")


def test_the_benchmarks_page_is_what_the_report_makes():
    for path in sorted(harness.RESULTS.glob("*.json")):
        _valid(json.loads(path.read_text()), path.stem)
        assert f"{path.stem}.py" in " ".join(report.SCRIPTS), f"{path.name}: no such script"
    assert report.PAGE.read_text() == report.page(), \
        "docs/benchmarks.md is stale: run python bench/report.py"
