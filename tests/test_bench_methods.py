"""bench/bench_methods.py --quick end to end on the tiny model, every method of camserve's
registry: each has a row with camserve's images/s and pytorch-grad-cam's (none for a method it
lacks), their ratio and each one's cost over the plain forward; Guided Grad-CAM has Captum's
too; the random map no goal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY

pytest.importorskip("pytorch_grad_cam", reason="the references are pytorch-grad-cam's")
pytest.importorskip("captum", reason="Guided Grad-CAM's reference is Captum's")

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import bench_methods  # noqa: E402
import harness  # noqa: E402


def test_bench_methods_quick_writes_a_row_per_method(tmp_path, capsys):
    from camserve_server.domain import METHODS

    out = tmp_path / "bench_methods.json"
    argv = ["--model", TINY, "--quick", "--seconds", "0.05", "--methods", ",".join(METHODS),
            "--json", str(out)]
    assert bench_methods.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].split()[1:] == ["bench/bench_methods.py", *argv]
    baselines = [r for r in doc["rows"] if r["table"].endswith("baselines at batch 8")]
    assert [r["case"] for r in baselines] == ["forward b8 (as built)", "camserve Predict b8"]
    assert all(r["images_per_s"] > 0 for r in baselines)
    rows = {r["method"]: r for r in doc["rows"] if "method" in r}
    assert list(rows) == list(METHODS)
    for name, row in rows.items():
        assert row["camserve_images_per_s"] > 0 and row["camserve_cost"] > 0, row
        if name not in bench_methods.PGC:  # a method pytorch-grad-cam lacks: camserve's only
            assert row["pgc_images_per_s"] is None and row["ratio"] is None, row
            continue
        assert row["pgc_images_per_s"] > 0, row
        assert row["ratio"] > 0 and row["pgc_cost"] > 0, row
        assert row["pytorch_grad_cam"] == bench_methods.PGC[name][0]
        assert (row["ratio_captum"] is not None) == (name == "guided_gradcam"), row
        assert (row["goal"] is None) == (name == "random"), row
        assert row["result"] in ((None,) if name == "random" else ("PASS", "MISS"))
    assert rows["guided_gradcam"]["captum_images_per_s"] > 0
    assert "1.5 x Captum" in rows["guided_gradcam"]["goal"]
    printed = capsys.readouterr().out
    assert harness.render(doc) in printed  # the tables it printed are the ones it wrote


def test_bench_methods_knows_every_method_and_refuses_unknown_ones():
    from camserve_server.domain import METHODS

    assert set(bench_methods.PGC) <= set(METHODS)
    assert set(bench_methods.QUICK_METHODS) <= set(METHODS)
    with pytest.raises(SystemExit):
        bench_methods.parse_args(["--methods", "gradcam,nosuch"])
