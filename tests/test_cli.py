"""Every CLI command end to end, as a person runs it, against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import DATA

CLI = str(Path(sys.executable).parent / "camserve")


def run(*args, target=None, env=None):
    environment = dict(os.environ, **(env or {}))
    command = [CLI] + (["--target", target] if target else []) + list(args)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def test_info(default_server):
    server, _ = default_server
    done = run("info", target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    assert "efficientnet_lite0" in done.stdout and "bn2 1280x7x7 (default)" in done.stdout
    # CAMSERVE_TARGET is the default target.
    done = run("info", "--json", env={"CAMSERVE_TARGET": f"127.0.0.1:{server.port}"})
    data = json.loads(done.stdout)
    assert data["default_layer"] == "bn2" and len(data["labels"]) == 1000


def test_predict(default_server, cat_path, coffee_path):
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    done = run("predict", str(cat_path), str(coffee_path), "--top-k", "2", target=target)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{coffee_path}: espresso")
    done = run("predict", str(coffee_path), "--json", target=target)
    data = json.loads(done.stdout)
    assert data[0]["top"][0]["label"] == "espresso" and len(data[0]["top"]) == 5


def test_predict_reports_bad_files_and_answers_the_rest(default_server, cat_path, tmp_path):
    server, _ = default_server
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    done = run("predict", str(cat_path), str(bad), str(tmp_path / "missing.jpg"),
               target=f"127.0.0.1:{server.port}")
    assert done.returncode == 1
    assert done.stdout.startswith(f"{cat_path}: ")
    assert "broken.jpg: INVALID_ARGUMENT" in done.stderr and "missing.jpg" in done.stderr


def test_explain_writes_overlay_and_heatmap(default_server, cat_path, coffee_path, tmp_path):
    server, _ = default_server
    out = tmp_path / "out"
    done = run("explain", str(cat_path), str(coffee_path), "-o", str(out),
               target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    assert "explained espresso (967) with gradcam at bn2" in done.stdout
    for stem, size in (("chelsea", (300, 451)), ("coffee", (400, 600))):
        overlay = np.asarray(Image.open(out / f"{stem}.overlay.png"))
        heat = np.asarray(Image.open(out / f"{stem}.heatmap.png"))
        assert overlay.shape == (*size, 3) and heat.shape == size
        assert heat.min() == 0 and heat.max() == 255


def test_explain_class_by_label_and_index(default_server, cat_path, tmp_path):
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    done = run("explain", str(cat_path), "-o", str(tmp_path), "--class", "espresso", "--json",
               target=target)
    assert done.returncode == 0, done.stderr
    by_label = json.loads(done.stdout)[0]["maps"][0]
    assert by_label["target"]["index"] == 967 and by_label["layer"] == "bn2"
    done = run("explain", str(cat_path), "-o", str(tmp_path), "--class", "967", "--json",
               "--layer", "bn2", target=target)
    by_index = json.loads(done.stdout)[0]["maps"][0]
    np.testing.assert_allclose(by_index["raw"], by_label["raw"], atol=1e-6)
    done = run("explain", str(cat_path), "-o", str(tmp_path), "--class", "unicorn",
               target=target)
    assert done.returncode == 1 and "no class is labelled 'unicorn'" in done.stderr


def test_server_down_is_one_clear_error(tmp_path, cat_path):
    done = run("predict", str(cat_path), str(cat_path), target="127.0.0.1:1", )
    assert done.returncode == 1
    assert done.stderr.count("UNAVAILABLE") == 1


def test_usage_errors():
    done = run("explain", "x.jpg")  # no -o
    assert done.returncode == 2 and "-o/--output" in done.stderr
    done = run("explain", "x.jpg", "-o", "out", "--method", "nope")
    assert done.returncode == 2 and "gradcam" in done.stderr


def test_explain_several_methods_and_classes_with_a_grid(default_server, cat_path, tmp_path):
    server, _ = default_server
    done = run("explain", str(cat_path), "-o", str(tmp_path), "--method", "gradcam",
               "--method", "eigencam", "--class", "285", "--class", "espresso", "--grid",
               target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    for method in ("gradcam", "eigencam"):
        for index in (285, 967):
            assert (tmp_path / f"chelsea.{method}.{index}.overlay.png").exists()
    grid = np.asarray(Image.open(tmp_path / "chelsea.grid.png"))
    assert grid.shape[0] > 2 * 224 and grid.shape[1] > 2 * 300  # 2 rows x 2 columns of tiles


def test_evaluate_prints_a_table(default_server, tmp_path):
    server, _ = default_server
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (folder / name).write_bytes((DATA / name).read_bytes())
    done = run("evaluate", str(folder), "--method", "gradcam", "--method", "layercam",
               "--steps", "8", target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"gradcam", "layercam", "random"}
    for deletion, insertion, images in rows.values():
        assert 0 <= float(deletion) <= 1 and 0 <= float(insertion) <= 1 and images == "2"
