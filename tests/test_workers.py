"""``--workers N``: N server processes on one port, supervised; answers from every worker, a
killed worker restarted while the others answer, SIGTERM drains them all, /metrics on the
supervisor counts every worker's calls, a start-up failure stops the whole server, and no
worker outlives its supervisor."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from typing import Dict

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from camserve import CamserveError, Client

from conftest import DATA, TINY, ServerProcess, wait_for

CAT = DATA / "chelsea.jpg"
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
SERVES = re.compile(r"worker (\d+) serves \(pid (\d+)\)")
# Its own connection for each client: the kernel spreads connections, not calls.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="worker processes (SO_REUSEPORT, /proc) are tested on Linux")


class Supervised(ServerProcess):
    """``python -m camserve_server --workers N`` as a subprocess, its port and metrics port."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args)
        self.port = int(self.wait_line(self.stdout, r"listening on [\d.]+:(\d+)").group(1))

    @property
    def metrics_port(self) -> int:
        """The supervisor's metrics port (started with --metrics-port), once it has printed it
        (the line after the one with the port: it may not have been read yet)."""
        return int(self.wait_line(self.stdout, r"metrics on [\d.]+:(\d+)").group(1))

    def pids(self, pattern=STARTED) -> Dict[int, int]:
        """Each worker's latest pid that the supervisor logged, by worker index."""
        with self._lock:
            found = [pattern.search(line) for line in self.log]
        return {int(m.group(1)): int(m.group(2)) for m in found if m}


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie that no one reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def client_of(port: int, worker: int, tries: int = 64) -> Client:
    """A client whose connection reached ``worker`` (new connections until one does)."""
    for _ in range(tries):
        client = Client(f"127.0.0.1:{port}", timeout=60, options=OWN_CONNECTION)
        if client.predict(str(CAT)).timing.worker == worker:
            return client
        client.close()
    raise AssertionError(f"{tries} connections and none reached worker {worker}")


def answers_by_worker(port: int, workers=(1, 2), tries: int = 64) -> Counter:
    """Predict on new connections until every worker has answered; the answers' workers."""
    seen = Counter()
    for _ in range(tries):
        with Client(f"127.0.0.1:{port}", timeout=60, options=OWN_CONNECTION) as client:
            prediction = client.predict(str(CAT))
        assert prediction.top and prediction.timing.worker in workers
        seen[prediction.timing.worker] += 1
        if set(seen) == set(workers):
            return seen
    raise AssertionError(f"{tries} connections answered only by workers {sorted(seen)}")


def scrape(port: int) -> Dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server():
    supervised = Supervised("--model", TINY, "--workers", "2", "--metrics-port", "0",
                            "--grace-s", "5")
    try:
        supervised.wait_line(supervised.stdout, "serving " + re.escape(TINY))
        yield supervised
    finally:
        supervised.close()


def test_the_port_serves_and_both_workers_answer(server):
    assert len(server.stdout) == 3 and server.stdout[0].startswith("camserve-server listening")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    seen = answers_by_worker(server.port)
    assert set(seen) == {1, 2}
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        info = client.model_info()
    assert info.name == TINY and info.workers == 2 and info.state == "serving"


def test_metrics_on_the_supervisor_count_every_worker(server):
    before = scrape(server.metrics_port)
    seen = answers_by_worker(server.port)

    def counted() -> bool:
        after = scrape(server.metrics_port)
        return all(value(after, "camserve_requests_total", rpc="Predict", code="OK",
                         worker=str(w)) - value(before, "camserve_requests_total",
                                                rpc="Predict", code="OK", worker=str(w)) == n
                   for w, n in seen.items())

    wait_for(counted, 10, "per-worker request counts")
    after = scrape(server.metrics_port)
    total = sum(seen.values())
    assert value(after, "camserve_request_seconds_count", rpc="Predict") - value(
        before, "camserve_request_seconds_count", rpc="Predict") == total
    waited = dict(name="camserve_queue_seconds_count", priority="1", caller="peer")
    assert value(after, **waited) - value(before, **waited) == total
    for worker in ("1", "2"):
        assert value(after, "camserve_state", state="serving", worker=worker) == 1
        assert value(after, "camserve_worker_up", worker=worker) == 1
    assert value(after, "camserve_model_load_seconds") > 0
    wait_for(lambda: value(scrape(server.metrics_port), "camserve_queue_depth") == 0, 10,
             "an empty queue")


def test_a_killed_worker_is_restarted_while_the_other_answers(server):
    killed = server.pids()[2]
    with client_of(server.port, 1) as survivor:
        os.kill(killed, signal.SIGKILL)
        answered, deadline = 0, time.monotonic() + 120
        while server.pids(SERVES).get(2, killed) == killed:  # until its successor serves
            prediction = survivor.predict(str(CAT), timeout=30)
            assert prediction.timing.worker == 1
            answered += 1
            assert time.monotonic() < deadline, "worker 2 was not restarted"
            time.sleep(0.05)
        assert answered >= 1
    assert server.pids()[2] != killed and not alive(killed)
    assert re.search(rf"worker 2 \(pid {killed}\) was killed by SIGKILL; restarting",
                     "".join(server.log))
    assert set(answers_by_worker(server.port)) == {1, 2}
    metrics = scrape(server.metrics_port)
    assert value(metrics, "camserve_worker_process_restarts_total", worker="2") == 1
    assert value(metrics, "camserve_worker_process_restarts_total", worker="1") == 0
    assert value(metrics, "camserve_state", state="serving", worker="2") == 1


def test_a_hung_worker_is_killed_and_replaced(server):
    """SIGSTOP (a hang the process cannot notice itself): its heartbeat stops, and within
    --worker-hang-s the supervisor kills it and starts another, while the other answers."""
    hung = server.pids()[1]
    with client_of(server.port, 2) as survivor:
        os.kill(hung, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 120
            while server.pids(SERVES).get(1, hung) == hung:
                assert survivor.predict(str(CAT), timeout=30).timing.worker == 2
                assert time.monotonic() < deadline, "the stopped worker was not replaced"
                time.sleep(0.05)
        finally:
            if alive(hung):
                os.kill(hung, signal.SIGCONT)
    log = "".join(server.log)
    silent = re.search(rf"worker 1 \(pid {hung}\) has not beaten its heartbeat for "
                       r"([\d.]+) s \(stopped, or its event loop is stuck\): killing it", log)
    assert silent and float(silent.group(1)) >= 5.0  # the default --worker-hang-s
    assert re.search(rf"worker 1 \(pid {hung}\) was killed by SIGKILL; restarting", log)
    assert not alive(hung)
    assert set(answers_by_worker(server.port)) == {1, 2}
    assert value(scrape(server.metrics_port), "camserve_worker_process_restarts_total",
                 worker="1") == 1


def test_sigterm_drains_every_worker_and_exits_zero(server):
    """Callers on connections to both workers; SIGTERM to the supervisor: every call ends with
    an answer or UNAVAILABLE/CANCELLED, both workers exit, the supervisor exits 0."""
    pids = server.pids()
    clients = [client_of(server.port, w) for w in (1, 2, 1, 2)]
    outcomes: Counter = Counter()
    lock = threading.Lock()
    started = threading.Barrier(len(clients) + 1)

    def caller(client: Client) -> None:
        started.wait()
        while True:
            try:
                client.predict(str(CAT), timeout=30)
                result = "OK"
            except CamserveError as exc:
                result = exc.code.name
            with lock:
                outcomes[result] += 1
            if result != "OK":
                return

    threads = [threading.Thread(target=caller, args=(c,)) for c in clients]
    try:
        for t in threads:
            t.start()
        started.wait()
        wait_for(lambda: outcomes["OK"] >= 8, 60, "answers before the signal")
        server.process.send_signal(signal.SIGTERM)
        assert server.ended(60) == 0
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a call hung"
    finally:
        for c in clients:
            c.close()
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, outcomes
    assert not any(alive(pid) for pid in pids.values())
    log = "".join(server.log)
    for worker, pid in pids.items():
        assert f"worker {worker} (pid {pid}) exited with status 0" in log


def test_a_worker_that_fails_to_start_stops_the_server():
    supervised = Supervised("--workers", "2", "--model", TINY, "--weights", "/nonexistent/w.pt")
    try:
        assert supervised.ended() == 2
        pids = supervised.pids()
        assert set(pids) == {1, 2}
        assert not any(alive(pid) for pid in pids.values())
        log = "".join(supervised.log)
        assert "weights file '/nonexistent/w.pt' does not exist" in log
        assert "failed to start (exit status 2): stopping the server" in log
        assert not any("restart" in line for line in supervised.log if "started" in line)
    finally:
        supervised.close()


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "so_reuseport"])
def test_a_busy_port_exits_2_before_starting_workers(reuseport):
    """A port that something listens on is refused, even when the listener set SO_REUSEPORT
    (another group of workers): never shared silently."""
    holder = socket.socket()
    try:
        if reuseport:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        done = subprocess.run([sys.executable, "-m", "camserve_server", "--host", "127.0.0.1",
                               "--port", str(holder.getsockname()[1]), "--workers", "2"],
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert done.returncode == 2 and "listening" not in done.stdout
    assert "cannot listen on 127.0.0.1:" in done.stderr and "started" not in done.stderr


def test_workers_do_not_outlive_their_supervisor():
    supervised = Supervised("--model", TINY, "--workers", "2")
    try:
        supervised.wait_line(supervised.log, r"worker 2: listening")
        supervised.wait_line(supervised.log, r"worker 1: listening")
        pids = supervised.pids()
        supervised.process.kill()  # no chance to stop its workers itself
        supervised.process.wait()
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), 60,
                 "the workers' exit after their supervisor died")
    finally:
        supervised.close()
