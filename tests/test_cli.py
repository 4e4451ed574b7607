"""Every CLI command end to end, as a person runs it, against a real server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve import AsyncClient, CamserveError, Client
from camserve._calls import resolve_target
from camserve.cli import build_parser, cmd_info
from camserve.results import ModelInfo, ModelStatus
from camserve.v1 import camserve_pb2 as pb
from camserve_server.process.server import CamServer
from camserve_server.process.settings import Settings

from conftest import DATA, TINY, running, wait_for

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
    assert "cannot reach a camserve server at 127.0.0.1:1 " in done.stderr
    assert "camserve-server" in done.stderr and "--target HOST:PORT" in done.stderr
    assert "Traceback" not in done.stderr
    # A name that does not resolve says the same, with the port it would have used.
    done = run("info", "--target", "no-such-host.invalid")
    assert done.returncode == 1
    assert "cannot reach a camserve server at no-such-host.invalid:50051 " in done.stderr


def test_a_host_without_a_port_gets_the_default_port():
    assert resolve_target("localhost") == "localhost:50051"
    assert resolve_target("10.0.0.7") == "10.0.0.7:50051"
    assert resolve_target("::1") == "[::1]:50051" and resolve_target("[::1]") == "[::1]:50051"
    assert resolve_target("localhost:7000") == "localhost:7000"
    assert resolve_target("dns:///camserve.default.svc:50051") == \
        "dns:///camserve.default.svc:50051"


def test_connection_flags_after_the_subcommand(default_server, cat_path):
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    done = run("info", "--target", target, "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert "state:        serving" in done.stdout
    done = run("predict", str(cat_path), "--top-k", "1", "--target", target)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{cat_path}: Egyptian cat")
    # Given on both sides, the one after the subcommand wins.
    done = run("--target", "127.0.0.1:1", "info", "--target", target)
    assert done.returncode == 0, done.stderr


def test_info_while_the_model_loads_shows_the_state():
    server = CamServer(Settings(host="127.0.0.1", port=0, http_port=None,
                                model="python:tiny_models:slow_loading_cnn"))
    port = server.listen()
    loader = threading.Thread(target=server.load)
    loader.start()
    try:
        done = run("info", target=f"127.0.0.1:{port}")
        assert done.returncode == 1
        assert "state:        loading" in done.stdout and "run this again" in done.stdout
        assert "classes" not in done.stdout and "methods" not in done.stdout
        done = run("info", "--json", target=f"127.0.0.1:{port}")
        assert done.returncode == 1 and json.loads(done.stdout)["state"] == "loading"
        done = run("health", target=f"127.0.0.1:{port}")
        assert done.returncode == 1 and done.stdout.strip() == "NOT_SERVING"
        with Client(f"127.0.0.1:{port}") as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(CamserveError) as caught:
                client.wait_until_ready(timeout=0.2)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert caught.value.reason == "LOADING"
    finally:
        loader.join()
        server.stop(grace=0)


def test_a_reader_that_goes_away_ends_the_cli_quietly(default_server, cat_path):
    """`camserve predict ... | head -c0`: no BrokenPipeError traceback, exit 141 as Unix tools
    do. The pipe's reading end is closed before the CLI writes, so the write always fails."""
    server, _ = default_server
    for args in (["predict", str(cat_path)], ["info", "--json"]):
        child = subprocess.Popen([CLI, "--target", f"127.0.0.1:{server.port}", *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child.stdout.close()
        stderr = child.stderr.read().decode()
        assert child.wait(timeout=300) == 141, stderr
        assert stderr == ""


def test_the_callers_request_id_is_in_the_access_log(default_server, caplog):
    server, _ = default_server
    caplog.set_level(logging.INFO, logger="camserve_server.access")
    done = run("--request-id", "cli-test-4711", "info", target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "camserve_server.access"
                and "id=cli-test-4711" in r.getMessage()]

    wait_for(lambda: len(lines()) == 2)  # camserve info: GetModelInfo, then ListModels
    line, listed = lines()
    assert line.startswith("GetModelInfo OK") and "items=0" in line and "peer=ipv" in line
    assert line.endswith("model=camserve:1") and listed.startswith("ListModels OK")


def test_an_all_zero_map_is_explained(default_server, coffee_path, tmp_path):
    """A counterfactual map of the class the model is sure of is zero everywhere: said, with
    what it means, on the terminal and in the JSON."""
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    done = run("explain", str(coffee_path), "-o", str(tmp_path), "--counterfactual",
               target=target)
    assert done.returncode == 0, done.stderr
    assert ("note: the map is zero everywhere: nothing at layer bn2 lowers the score of "
            "'espresso' here, so its heatmap is blank") in done.stdout
    done = run("explain", str(coffee_path), "-o", str(tmp_path), "--counterfactual", "--json",
               target=target)
    notes = json.loads(done.stdout)[0]["maps"][0]["notes"]
    assert [n["kind"] for n in notes] == ["all_zero"]
    done = run("explain", str(coffee_path), "-o", str(tmp_path), "--json", target=target)
    assert json.loads(done.stdout)[0]["maps"][0]["notes"] == []


@pytest.fixture(scope="module")
def flat_and_noisy_video(tmp_path_factory):
    """4 frames, 160x120: flat grey (a JPEG of about 1 kB) and noise (over 20 kB), in turn."""
    cv2 = pytest.importorskip("cv2", reason="camserve stream needs OpenCV")
    path = tmp_path_factory.mktemp("video") / "flat-and-noisy.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    rng = np.random.default_rng(0)
    for i in range(4):
        frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) if i % 2 else \
            np.full((120, 160, 3), 128, np.uint8)
        writer.write(frame)
    writer.release()
    return path


def test_stream_prints_each_failed_frame_and_goes_on(flat_and_noisy_video, tmp_path):
    with running(model=TINY, max_image_bytes=8_000) as (server, _):
        done = run("stream", str(flat_and_noisy_video), "-o", str(tmp_path / "out.mp4"),
                   target=f"127.0.0.1:{server.port}")
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if line.startswith("camserve: frame")]
    assert [line.split(":")[1].strip() for line in failed] == ["frame 1", "frame 3"]
    assert all("INVALID_ARGUMENT" in line and "8000" in line.replace(",", "")
               for line in failed), failed
    assert "frames sent 4, answered 2, skipped 0, failed 2" in done.stdout


def test_stream_refuses_a_class_out_of_range_once(default_server, flat_and_noisy_video):
    server, _ = default_server
    done = run("stream", str(flat_and_noisy_video), "--explain", "--class", "1000",
               target=f"127.0.0.1:{server.port}")
    assert done.returncode == 1
    assert done.stderr.count("class index 1000 is out of range") == 1
    assert "frame" not in done.stderr


def test_a_second_server_on_a_busy_port_says_so(default_server):
    server, _ = default_server
    done = subprocess.run([str(Path(sys.executable).parent / "camserve-server"), "--port",
                           str(server.port)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"port {server.port} is in use" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr and "Failed to add port" not in done.stderr


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


def test_evaluate_with_road(tiny_server_large, cat_path, tmp_path):
    """--road adds ROAD's MoRF, LeRF and combined columns (--json: the same keys)."""
    server, _ = tiny_server_large
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(cat_path.read_bytes())
    done = run("evaluate", str(folder), "--method", "gradcam", "--steps", "2", "--road",
               "--json", target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)
    assert set(table) == {"gradcam", "random"}
    for row in table.values():
        assert set(row) == {"deletion", "insertion", "road_morf", "road_lerf",
                            "road_combined", "images"}
        assert -1 <= row["road_morf"] <= 1 and row["road_combined"] == pytest.approx(
            (row["road_lerf"] - row["road_morf"]) / 2, abs=1e-6)


def test_evaluate_a_single_map_per_image(default_server, cat_path, tmp_path):
    """`--method random` alone gives one map per image (it used to end in a TypeError)."""
    server, _ = default_server
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(cat_path.read_bytes())
    done = run("evaluate", str(folder), "--method", "random", "--steps", "2",
               target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["random"] and rows[0][3] == "1"


def test_evaluate_sizes_its_timeout_to_the_work(default_server, cat_path, tmp_path,
                                                monkeypatch, capsys):
    """Each call's timeout grows with the forwards it asks for (--timeout per 64), and a call
    that still runs out says which timeout it had and how to raise it."""
    from camserve import CamserveError, Client, cli

    server, client = default_server
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(cat_path.read_bytes())
    timeouts = []

    def explain_many(self, images, **options):
        timeouts.append(options["timeout"])
        raise CamserveError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    monkeypatch.setattr(Client, "explain_many", explain_many)
    code = cli.main(["--target", f"127.0.0.1:{server.port}", "evaluate", str(folder),
                     "--steps", "16", "--timeout", "10"])
    assert code == 1
    # Every method the server has (random among them): 2 x (16 + 1) forwards a map, plus 64
    # Score-CAM channels.
    forwards = len(client.model_info().methods) * (2 * 16 + 2) + 64
    assert timeouts == [pytest.approx(10 * forwards / 64)]
    err = capsys.readouterr().err
    assert f"DEADLINE_EXCEEDED: Deadline Exceeded (the call's timeout was " \
           f"{10 * forwards / 64:.0f} s; pass --timeout SECONDS for more)" in err


def test_stream_reports_local_problems_as_local(default_server, tmp_path):
    """A file OpenCV cannot open, a missing file, a camera that is not there and an output
    OpenCV cannot write are this machine's problems: said once, not as a server's
    INVALID_ARGUMENT; a misspelled class is refused once, before the first frame."""
    pytest.importorskip("cv2", reason="camserve stream needs OpenCV")
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    for args, message in (
            ([str(notes)], f"camserve: cannot open video file '{notes}'"),
            ([str(tmp_path / "missing.mp4")], "cannot open video file"),
            (["--camera", "97"], "camserve: cannot open camera 97"),
            ([str(notes), "-o", str(tmp_path / "out.gif")],
             "choose a video file name ending in .mp4, .avi, .mkv, .mov"),
            ([str(notes), "--explain", "--class", "unicorn"],
             "no class is labelled 'unicorn'")):
        done = run("stream", *args, target=target)
        assert done.returncode == 1, args
        lines = [line for line in done.stderr.splitlines() if line.startswith("camserve:")]
        assert len(lines) == 1 and message in lines[0], done.stderr
        if "unicorn" not in message:
            assert "INVALID_ARGUMENT" not in done.stderr
        assert "frames sent" not in done.stdout


def test_scorecam_by_default_on_a_layer_wider_than_the_servers_cap(tiny_server, cat_path,
                                                                   tmp_path):
    """Without --score-cam-channels, Score-CAM uses the server's cap of most active channels
    (it used to be refused when the layer had more channels than the cap)."""
    server, client = tiny_server
    info = client.model_info()
    assert info.layers[0].channels > info.max_score_cam_channels  # what this test is about
    done = run("explain", str(cat_path), "-o", str(tmp_path), "--method", "scorecam", "--json",
               target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    maps = json.loads(done.stdout)[0]["maps"]
    assert [m["method"] for m in maps] == ["scorecam"] and np.ptp(maps[0]["raw"]) > 0


def test_stream_latest_writes_the_sources_timeline(tmp_path):
    """Under --policy latest a slow model skips frames; the video written still has one frame
    per source frame (a skipped frame repeats the answer before it; before the first answer,
    the first answer), not one per answer, even when only the last frame is answered."""
    cv2 = pytest.importorskip("cv2", reason="camserve stream needs OpenCV")
    source = tmp_path / "twelve.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(12):
        writer.write(np.full((120, 160, 3), 20 * i, np.uint8))
    writer.release()
    out = tmp_path / "out.mp4"
    with running(model="python:tiny_models:slow_cnn", max_delay_ms=0) as (server, _):
        done = run("stream", str(source), "-o", str(out), "--policy", "latest",
                   target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    counts = re.search(r"frames sent (\d+), answered (\d+), skipped (\d+), failed 0", done.stdout)
    sent, answered, skipped = (int(n) for n in counts.groups())
    assert sent == 12 and answered + skipped == 12
    assert skipped > 0, "the model kept up: the test did not make it skip"
    assert f"wrote 12 frames to {out}" in done.stdout
    assert int(cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT)) == 12


def _subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def test_every_help_works(capsys):
    """`camserve --help` (the installed entry point) and every subcommand's --help exit 0 and
    print their help, without reST markup."""
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: camserve") and "``" not in done.stdout
    assert "Exit status: 0 when" in " ".join(done.stdout.split())
    for name in _subcommands():
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([name, "--help"])
        assert exited.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: camserve {name}") and "``" not in out, name
        assert "--target" in out, name


def test_every_option_and_positional_has_help():
    parser = build_parser()
    for name, sub in [("camserve", parser), *_subcommands().items()]:
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), \
                f"{name}: {action.option_strings or action.dest} has no help"


def test_info_prints_floats_rounded(capsys):
    """mean and std travel as float32: info prints 0.485, not 0.48500001430511475."""
    message = pb.GetModelInfoResponse(
        name="resnet", state=pb.SERVER_STATE_SERVING, labels=["a", "b", "c"],
        input_size=pb.ImageSize(height=224, width=224), mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225])
    info = ModelInfo.from_proto(message)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)

    class Answers:
        def model_info(self, model=None):
            return info

        def models(self, ready=False):
            return [ModelStatus("resnet", 1, "ready", is_default=True)]

    assert cmd_info(Answers(), argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "224x224, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in out, out
    assert "loaded:       resnet:1 (default)" in out, out


def test_health_command_and_client_health(default_server):
    server, client = default_server
    done = run("health", target=f"127.0.0.1:{server.port}")
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    assert client.health() == "SERVING"
    assert client.health("camserve.v1.CamserveService") == "SERVING"
    with pytest.raises(CamserveError) as caught:
        client.health("no.such.Service")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND

    async def check():
        async with AsyncClient(f"127.0.0.1:{server.port}") as aclient:
            return await aclient.health()

    assert asyncio.run(check()) == "SERVING"
