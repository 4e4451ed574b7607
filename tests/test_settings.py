"""One frozen settings object from flags and CAMSERVE_* environment variables."""

from __future__ import annotations

import dataclasses

import pytest

from camserve_server.process.settings import Settings, parse_settings


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
