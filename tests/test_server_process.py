"""The server as a process: ``python -m camserve_server``, configured by flags and environment,
reporting SERVING once loaded, draining and exiting 0 on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve import CamserveError, Client

TESTS = Path(__file__).parent
SLOW = "python:tiny_models:slow_cnn"


def start(*args, env=None):
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, PYTHONPATH=path, **(env or {}))
    process = subprocess.Popen([sys.executable, "-m", "camserve_server", "--host", "127.0.0.1",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    line = process.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    assert match, (line, process.stderr.read() if process.poll() is not None else "")
    return process, int(match.group(1))


def test_sigterm_under_load_answers_every_call_once_and_exits_zero(cat_path):
    """8 callers keep the server busy; SIGTERM arrives: every call ends with an answer or a
    clear status (UNAVAILABLE, CANCELLED), none hangs, none is answered twice; exit 0."""
    process, port = start("--port", "0", "--grace-s", "5", env={
        "CAMSERVE_MODEL": "python:tiny_models:slow_cnn", "CAMSERVE_MAX_BATCH_SIZE": "4",
        "CAMSERVE_MAX_DELAY_MS": "20"})
    outcomes = Counter()
    calls = Counter()
    stop = threading.Event()
    lock = threading.Lock()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            info = client.wait_until_ready(60)
            assert info.name == "python:tiny_models:slow_cnn" and info.max_delay_ms == 20
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING

            def caller(n):
                i = 0
                while not stop.is_set():
                    key = (n, i)
                    try:
                        client.predict(str(cat_path), timeout=30)
                        result = "OK"
                    except CamserveError as exc:
                        result = exc.code.name
                    with lock:
                        calls[key] += 1
                        outcomes[result] += 1
                    if result not in ("OK",):
                        return  # the server is going away
                    i += 1

            threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            while outcomes["OK"] < 8:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
            stop.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a call hung"
    finally:
        process.kill()
        process.wait()
    assert set(calls.values()) == {1}, "a call was answered twice"
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, outcomes
    assert outcomes["OK"] >= 8


def test_bad_model_exits_2_with_a_message():
    process, _ = start("--port", "0", "--model", "torchvision:resnet18")
    assert process.wait(120) == 2
    assert "needs --weights PATH" in process.stderr.read()


def test_flag_errors_exit_2():
    done = subprocess.run([sys.executable, "-m", "camserve_server", "--max-batch-size", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "max-batch-size must be at least 1" in done.stderr


def _long_explain(port, outcome):
    """An Explain of the slow model that takes seconds (256 faithfulness steps, in slices)."""
    import numpy as np

    def call():
        with Client(f"127.0.0.1:{port}", retries=0, timeout=120) as client:
            try:
                outcome["answer"] = client.explain(np.full((32, 32, 3), 100, np.uint8),
                                                   faithfulness_steps=256)
            except CamserveError as exc:
                outcome["error"] = exc
    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_a_second_signal_stops_at_once_and_cuts_calls_off_with_a_status():
    """SIGINT drains (a 60 s grace); a second SIGINT stops at once: exit status 130, and the
    call in flight answers UNAVAILABLE, the server shutting down, instead of finishing. Under
    a supervisor, which passes each signal on to its workers as SIGTERM: so both the
    supervisor's path and a server's own (each worker is one) are taken."""
    process, port = start("--port", "0", "--grace-s", "60", "--model", SLOW, "--workers", "2",
                          "--torch-threads", "1")
    try:
        while "camserve-server serving" not in process.stdout.readline():  # every worker
            assert process.poll() is None
        outcome = {}
        thread = _long_explain(port, outcome)
        time.sleep(1.5)  # its slices are running
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None, "the first signal must drain, not stop"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130  # not drained: the call had a minute to finish
        thread.join(30)
    finally:
        process.kill()
        process.wait()
    assert "1 torch thread per engine" in process.stderr.read()
    error = outcome["error"]
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "DRAINING", error
    assert "shutting down" in error.details, error.details


def test_without_the_server_extra_it_says_what_to_install():
    for missing in ("grpc_reflection", "torch"):
        done = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.modules[{missing!r}] = None\n"
             "from camserve_server.__main__ import main\nsys.exit(main(['--port', '0']))"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "pip install 'camserve[server]'" in done.stderr
        assert missing in done.stderr and "Traceback" not in done.stderr
