"""The server as a process: ``python -m camserve_server``, configured by flags and environment,
reporting SERVING once loaded, draining and exiting 0 on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from camserve import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

TESTS = Path(__file__).parent


def start(*args, env=None):
    environment = dict(os.environ, PYTHONPATH=str(TESTS), **(env or {}))
    process = subprocess.Popen([sys.executable, "-m", "camserve_server", "--host", "127.0.0.1",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    line = process.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    assert match, (line, process.stderr.read() if process.poll() is not None else "")
    return process, int(match.group(1))


def test_sigterm_drains_in_flight_calls_and_exits_zero(cat_path):
    process, port = start("--port", "0", env={
        "CAMSERVE_MODEL": "python:tiny_models:tiny_cnn", "CAMSERVE_MAX_DELAY_MS": "400",
        "CAMSERVE_MAX_BATCH_SIZE": "64"})
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            info = client.wait_until_ready(60)
            assert info.name == "python:tiny_models:tiny_cnn" and info.max_delay_ms == 400
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            answers, errors = [], []

            def call():
                try:
                    answers.append(client.explain(str(cat_path)))
                except Exception as exc:  # reported by the assertion below
                    errors.append(exc)

            threads = [threading.Thread(target=call) for _ in range(6)]
            for t in threads:
                t.start()
            # The calls wait up to 400 ms for their batch to fill: stop the server meanwhile.
            threading.Event().wait(0.15)
            process.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(60)
        assert process.wait(60) == 0
        assert not errors, errors
        assert len(answers) == 6
    finally:
        process.kill()
        process.wait()


def test_bad_model_exits_2_with_a_message():
    process, _ = start("--port", "0", "--model", "torchvision:resnet18")
    assert process.wait(120) == 2
    assert "needs --weights PATH" in process.stderr.read()


def test_flag_errors_exit_2():
    done = subprocess.run([sys.executable, "-m", "camserve_server", "--max-batch-size", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "max-batch-size must be at least 1" in done.stderr
