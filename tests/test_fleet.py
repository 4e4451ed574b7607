"""Replicas behind gRPC's own client-side load balancing: three ``camserve-server`` processes on
loopback (the tiny model) and one Client whose target names all three.

- the calls are spread round-robin: each replica answers at least 20 % of 90 calls;
- one replica is killed (SIGKILL) while 200 calls run, another is sent SIGTERM (it drains and
  exits 0) while another 200 run: no call fails, because the client retries UNAVAILABLE on
  another replica (its service config's retry policy).

Each replica's own access log (stderr) says which calls it answered and with what status."""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections import Counter
from typing import Callable, List, Optional

import pytest

from camserve import CamserveError, Client

from conftest import DATA, TINY, ServerProcess, wait_for

CAT = (DATA / "chelsea.jpg").read_bytes()
REPLICAS = 3
CALLERS = 4  # client threads: calls are in flight when a replica goes away
ACCESS = re.compile(r"camserve_server\.access: Predict (\w+) ")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="replica processes are signalled as on Linux")


class Replica(ServerProcess):
    """A ``camserve-server`` process of the tiny model on a port of its own."""

    def __init__(self) -> None:
        super().__init__("--model", TINY, "--max-delay-ms", "2", "--torch-threads", "1",
                         "--grace-s", "10")
        self.port = 0

    def wait_serving(self, timeout: float = 180) -> None:
        self.wait_line(self.stdout, "serving", timeout)
        self.port = int(self.find(self.stdout, r"listening on [\d.]+:(\d+)").group(1))

    def answered(self) -> Counter:
        """Its Predict calls so far, by status, from its access log."""
        with self._lock:
            found = [ACCESS.search(line) for line in self.log]
        return Counter(m.group(1) for m in found if m)


@pytest.fixture(scope="module")
def fleet():
    """Three replicas; a test that stops one gets it replaced before the next test."""
    replicas = [Replica() for _ in range(REPLICAS)]
    try:
        for replica in replicas:
            replica.wait_serving()
        yield replicas
    finally:
        for replica in replicas:
            replica.close()


@pytest.fixture
def replicas(fleet) -> List[Replica]:
    for i, replica in enumerate(fleet):
        if replica.process.poll() is not None:
            replica.close()
            fleet[i] = Replica()
            fleet[i].wait_serving()
    return list(fleet)


def client_of(replicas: List[Replica]) -> Client:
    client = Client(",".join(f"127.0.0.1:{r.port}" for r in replicas), timeout=60)
    client.wait_until_ready(60)
    return client


def call(client: Client, n: int, midway: Optional[Callable[[], None]] = None,
         after: int = 0) -> Counter:
    """``n`` Predict calls from CALLERS threads; ``midway()`` runs once ``after`` of them have
    answered, while the rest run. The outcomes, by status name."""
    outcomes: Counter = Counter()
    lock = threading.Lock()
    todo = iter(range(n))

    def caller() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                client.predict(CAT, timeout=60)
                code = "OK"
            except CamserveError as exc:
                code = exc.code.name
            with lock:
                outcomes[code] += 1

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    try:
        if midway is not None:
            wait_for(lambda: sum(outcomes.values()) >= after, 120)
            assert sum(outcomes.values()) < n, "every call ended before midway()"
            midway()
    finally:
        for thread in threads:
            thread.join(120)
    return outcomes


def answered(replicas: List[Replica], before: List[Counter]) -> List[Counter]:
    """Each replica's Predict calls since ``before``, by status."""
    return [r.answered() - b for r, b in zip(replicas, before)]


def test_calls_are_spread_over_every_replica(replicas):
    before = [r.answered() for r in replicas]
    with client_of(replicas) as client:
        for _ in range(90):
            assert client.predict(CAT, timeout=60).top
    wait_for(lambda: sum(a["OK"] for a in answered(replicas, before)) == 90, 30)
    shares = [a["OK"] for a in answered(replicas, before)]
    assert sum(shares) == 90 and min(shares) >= 18, shares  # each at least 20 %


def test_a_killed_replica_costs_no_call(replicas):
    killed, others = replicas[0], replicas[1:]
    before = [r.answered() for r in replicas]
    with client_of(replicas) as client:
        outcomes = call(client, 200, midway=killed.process.kill, after=60)
    assert killed.ended() == -signal.SIGKILL
    assert outcomes == Counter(OK=200), outcomes
    # The killed one was in the rotation until then; the other two answered the rest, and the
    # calls it held when it died were retried there (at most CALLERS logged by both).
    wait_for(lambda: sum(a["OK"] for a in answered(replicas, before)) >= 200, 30)
    now = answered(replicas, before)
    assert all(set(a) == {"OK"} for a in now), now
    assert 0 < now[0]["OK"] <= 60 + CALLERS, now
    assert 200 <= sum(a["OK"] for a in now) <= 200 + CALLERS, now
    assert all(a["OK"] >= 70 for a in now[1:]), now  # about (200 - 60) / 2 each
    assert all(r.process.poll() is None for r in others)


def test_a_replica_sent_sigterm_drains_and_costs_no_call(replicas):
    stopped, others = replicas[1], [replicas[0], replicas[2]]
    before = [r.answered() for r in replicas]
    with client_of(replicas) as client:
        outcomes = call(client, 200, midway=lambda: stopped.process.send_signal(signal.SIGTERM),
                        after=60)
    assert stopped.ended() == 0  # drained, exited cleanly
    assert outcomes == Counter(OK=200), outcomes
    # A draining replica finishes the calls it holds and refuses new ones with UNAVAILABLE,
    # which the client retried elsewhere: every OK it logged reached the caller, once.
    wait_for(lambda: sum(a["OK"] for a in answered(replicas, before)) >= 200, 30)
    now = answered(replicas, before)
    assert set(now[1]) <= {"OK", "UNAVAILABLE"}, now
    assert all(set(a) == {"OK"} for a in (now[0], now[2])), now
    assert sum(a["OK"] for a in now) == 200 and 0 < now[1]["OK"] <= 60 + CALLERS, now
    assert all(a["OK"] >= 70 for a in (now[0], now[2])), now
    assert all(r.process.poll() is None for r in others)
