"""One frozen settings object from flags and CAMSERVE_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from camserve_server.process.settings import Settings, build_parser, parse_settings


def test_defaults():
    s = parse_settings([], environ={})
    assert s == Settings()
    assert (s.port, s.model, s.max_batch_size, s.device) == (50051, "efficientnet_lite0", 8,
                                                             "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1


def test_environment_then_flags():
    env = {"CAMSERVE_PORT": "6000", "CAMSERVE_LAYER": "layer4, layer3",
           "CAMSERVE_MEAN": "0.1,0.2,0.3", "CAMSERVE_MAX_DELAY_MS": "2.5",
           "CAMSERVE_INPUT_SIZE": "192x256"}
    s = parse_settings([], environ=env)
    assert (s.port, s.layers, s.mean, s.max_delay_ms, s.input_size) == (
        6000, ("layer4", "layer3"), (0.1, 0.2, 0.3), 2.5, (192, 256))
    s = parse_settings(["--port", "7000", "--layer", "layer2"], environ=env)
    assert s.port == 7000 and s.layers == ("layer2",) and s.max_delay_ms == 2.5
    assert s.fold_batchnorm is True
    assert parse_settings([], environ={"CAMSERVE_FOLD_BATCHNORM": "off"}).fold_batchnorm is False
    assert parse_settings(["--fold-batchnorm", "on"],
                          environ={"CAMSERVE_FOLD_BATCHNORM": "off"}).fold_batchnorm is True
    assert s.static_padding is True
    assert parse_settings(["--static-padding", "off"]).static_padding is False


@pytest.mark.parametrize("argv, message", [
    (["--max-batch-size", "0"], "max-batch-size"),
    (["--port", "70000"], "port"),
    (["--mean", "0.5,0.5"], "mean needs 3 values"),
    (["--std", "1,0,1"], "std values must be positive"),
    (["--input-size", "abc"], "HEIGHTxWIDTH"),
    (["--fold-batchnorm", "maybe"], "say on or off"),
])
def test_invalid_settings_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_settings(argv, environ={})
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["camserve-server", "--help"], ["camserve-server", "-h"],
                                     [sys.executable, "-m", "camserve_server", "--help"]])
def test_help_lists_every_flag_with_its_default(command):
    bin_dir = Path(sys.executable).parent
    if command[0] == "camserve-server":
        command = [str(bin_dir / "camserve-server")] + command[1:]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())  # argparse wraps lines
    for action in build_parser()._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert flag in text
        if flag != "--help":
            assert "(default:" in action.help, flag
    # each default as the help states it is the one Settings has
    for f in dataclasses.fields(Settings):
        if not f.metadata["hidden"] and f.metadata["shown"] is None and not isinstance(
                f.default, bool):
            assert f"(default: {f.default})" in text, f.name
    assert "hf:PATH" in text


def test_every_setting_has_a_flag_and_an_environment_variable():
    flags = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(Settings):
        assert f.name in flags, f.name
    env = {"CAMSERVE_MAX_QUEUE": "7", "CAMSERVE_AUTH_TOKEN": "a,b", "CAMSERVE_WORKER_INDEX": "2"}
    s = parse_settings([], environ=env)
    assert (s.max_queue, s.auth_tokens, s.worker_index) == (7, ("a", "b"), 2)
