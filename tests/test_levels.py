"""Who goes first (batching/levels.py): interactive calls before stream frames before
expensive work, first come first served within a level, and a waiting lower level's share.
Checked on the queue's order, never on time taken."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from camserve_server.batching.batcher import Batcher
from camserve_server.batching.levels import (
    EXPENSIVE,
    INTERACTIVE,
    STREAM,
    LevelPolicy,
    Levels,
    Scheduling,
)
from camserve_server.domain import ItemResult, WorkItem

from conftest import record_levels, wait_for


@dataclass(eq=False)
class Item:
    name: str
    level: int
    enqueued: float


def test_levels_take_the_highest_first_and_fifo_within_one():
    now = time.monotonic()
    levels = Levels(share=60)
    for name, level in [("s1", STREAM), ("x1", EXPENSIVE), ("i1", INTERACTIVE), ("s2", STREAM),
                        ("i2", INTERACTIVE)]:
        levels.append(Item(name, level, now))
    assert len(levels) == 5 and levels.ahead(INTERACTIVE) == 2 and levels.ahead(STREAM) == 4
    assert [levels.popleft().name for _ in range(5)] == ["i1", "i2", "s1", "s2", "x1"]
    assert not levels
    with pytest.raises(IndexError):
        levels.popleft()


def test_a_waiting_lower_level_gets_one_item_in_every_share_plus_one():
    now = time.monotonic()
    levels = Levels(share=2)
    for i in range(8):
        levels.append(Item(f"i{i}", INTERACTIVE, now))
    for i in range(3):
        levels.append(Item(f"s{i}", STREAM, now))
    levels.append(Item("x0", EXPENSIVE, now))
    order = [levels.popleft().name for _ in range(12)]
    # After 2 taken above them, the stream's next goes first, then the expensive level's
    # (3 taken above it by then); the counts start over once a level's item is taken.
    assert order == ["i0", "i1", "s0", "x0", "i2", "i3", "s1", "i4", "i5", "s2", "i6", "i7"]


def test_a_level_that_was_empty_has_no_credit():
    now = time.monotonic()
    levels = Levels(share=2)
    for i in range(4):
        levels.append(Item(f"i{i}", INTERACTIVE, now))
    assert [levels.popleft().name for _ in range(3)] == ["i0", "i1", "i2"]
    levels.append(Item("s0", STREAM, now))  # arrives now: no items were taken while it waited
    levels.append(Item("i4", INTERACTIVE, now))
    assert [levels.popleft().name for _ in range(3)] == ["i3", "i4", "s0"]


def test_remove_takes_an_item_out_of_its_level():
    now = time.monotonic()
    levels = Levels()
    items = [Item(str(i), i % 3, now) for i in range(6)]
    for item in items:
        levels.append(item)
    levels.remove(items[4])
    assert len(levels) == 5 and items[4] not in list(levels)
    with pytest.raises(ValueError):
        levels.remove(items[4])


def _run(share: int, policies=()):
    """A slow engine's worker is busy with one item; three stream frames, then two
    interactive calls are queued: the order of the batches that follow."""
    release = threading.Event()
    batches = []

    def run_batch(works):
        batches.append([int(w.pixels[0, 0, 0]) for w in works])
        release.wait(30)
        return [ItemResult(np.zeros(1, np.float32), np.ones(1, np.float32)) for _ in works]

    def item(value: int) -> WorkItem:
        return WorkItem(np.full((2, 2, 3), value, np.uint8))

    batcher = Batcher(run_batch, max_batch_size=2, max_delay_ms=0, max_queue=16,
                      scheduling=Scheduling(share=share, policies=policies))
    batcher.start()
    try:
        first = batcher.submit(item(0))
        wait_for(lambda: batches == [[0]], 10, "the first batch running")
        frames = [batcher.submit(item(10 + i), level=STREAM) for i in range(3)]
        calls = [batcher.submit(item(1 + i)) for i in range(2)]
        assert batcher.depth() == 5
        release.set()
        for ticket in [first, *frames, *calls]:
            ticket.result(30)
    finally:
        release.set()
        batcher.stop()
    return batches


def test_the_batcher_runs_queued_interactive_calls_before_queued_frames():
    assert _run(share=60) == [[0], [1, 2], [10, 11], [12]]


def test_with_a_share_of_one_the_batcher_alternates_calls_and_frames():
    assert _run(share=1) == [[0], [1, 10], [2, 11], [12]]


def test_a_levels_max_batch_bounds_its_items_in_one_batch():
    """Frames at most one per batch: each batch after the first takes one, the call goes
    with the first of them."""
    assert _run(share=60, policies=(LevelPolicy(), LevelPolicy(max_batch=1))) == [
        [0], [1, 2], [10], [11], [12]]


def test_a_level_alone_keeps_full_batches():
    """max_batch holds only while a higher level is active: frames alone fill the batch."""
    queue, _ = _queue(LevelPolicy(), LevelPolicy(max_batch=1))
    for _ in range(3):
        queue.submit(WorkItem(PIXELS), level=STREAM)
    assert len(queue.gather(last_batch=1, jobs_waiting=False)) == 3
    queue.submit(WorkItem(PIXELS))
    for _ in range(3):
        queue.submit(WorkItem(PIXELS), level=STREAM)
    assert [p.level for p in queue.gather(last_batch=1, jobs_waiting=False)] == [
        INTERACTIVE, STREAM]
    # Within HIGHER_ACTIVE_S of that call, still one frame a batch.
    assert [p.level for p in queue.gather(last_batch=1, jobs_waiting=False)] == [STREAM]


def _queue(*policies: LevelPolicy, batch_seconds: float = 0.001, **scheduling):
    from camserve_server.batching.queue import WorkQueue
    from camserve_server.metrics import Metrics

    metrics = Metrics()
    queue = WorkQueue(max_batch_size=4, max_delay_ms=0, max_queue=16, max_job_forwards=100,
                      metrics=metrics, batch_seconds=batch_seconds, workers=1,
                      scheduling=Scheduling(policies=policies, **scheduling))
    return queue, metrics


PIXELS = np.zeros((2, 2, 3), np.uint8)


def test_an_item_past_its_levels_longest_wait_answers_deadline_exceeded():
    from camserve_server.errors import DeadlineExceeded

    queue, metrics = _queue(LevelPolicy(), LevelPolicy(max_wait_s=0.05))
    frame = queue.submit(WorkItem(PIXELS), level=STREAM)
    call = queue.submit(WorkItem(PIXELS))
    time.sleep(0.1)  # the frame's bound passes while it waits; the call has none
    batch = queue.gather(last_batch=1, jobs_waiting=False)
    assert [queue.admit(p) for p in batch] == [True, False]
    with pytest.raises(DeadlineExceeded) as caught:
        frame.result(0)
    assert caught.value.reason == "LEVEL_WAIT" and "priority 2" in caught.value.message
    assert not call.done() or call.exception(0) is None
    assert metrics.value("camserve_items_dropped_total", reason="deadline") == 1
    # A bound shorter than the expected wait refuses at once, before queueing.
    slow, _ = _queue(LevelPolicy(), LevelPolicy(max_wait_s=0.05), batch_seconds=1.0)
    with pytest.raises(DeadlineExceeded) as caught:
        slow.submit(WorkItem(PIXELS), level=STREAM)
    assert caught.value.reason == "LEVEL_WAIT" and slow.depth() == 0
    # A caller's own deadline, when it is the shorter, keeps its own message.
    with pytest.raises(DeadlineExceeded) as caught:
        slow.submit(WorkItem(PIXELS), time.monotonic() + 0.01, level=STREAM)
    assert caught.value.reason == "DEADLINE_TOO_SHORT"


def test_a_delaying_level_runs_its_late_items_behind_every_other():
    queue, _ = _queue(LevelPolicy(max_wait_s=0.02, delay=True))
    late = queue.submit(WorkItem(PIXELS, None))
    time.sleep(0.05)
    fresh = [queue.submit(WorkItem(PIXELS), level=level) for level in (EXPENSIVE, STREAM)]
    batch = queue.gather(last_batch=1, jobs_waiting=False)
    assert [p.future for p in batch] == [fresh[1], fresh[0], late]
    assert [p.delayed for p in batch] == [False, False, True]
    assert all(queue.admit(p) for p in batch)  # it still runs


def test_an_expensive_item_refused_evicts_nothing():
    """A full queue and too many expensive forwards: the expensive item is refused, and no
    queued item loses its place (an evicted item is answered; one evicted for a refused item
    would never be)."""
    from types import SimpleNamespace

    from camserve_server.batching.queue import WorkQueue
    from camserve_server.errors import QueueFull
    from camserve_server.metrics import Metrics

    queue = WorkQueue(max_batch_size=2, max_delay_ms=0, max_queue=2, max_job_forwards=10,
                      metrics=Metrics(), batch_seconds=0.01, workers=1)
    queued = [queue.submit(WorkItem(PIXELS), level=EXPENSIVE, caller="greedy")
              for _ in range(2)]
    with pytest.raises(QueueFull) as caught:  # the greedy caller's newest would give way
        queue.submit(WorkItem(PIXELS, SimpleNamespace(extra_cost=50)), caller="polite")
    assert caught.value.reason == "EXPENSIVE_WORK_FULL"
    assert queue.depth() == 2 and not any(t.done() for t in queued)


def test_a_levels_most_items_queued():
    from camserve_server.errors import QueueFull

    queue, metrics = _queue(LevelPolicy(), LevelPolicy(max_queued=2))
    for _ in range(2):
        queue.submit(WorkItem(PIXELS), level=STREAM)
    with pytest.raises(QueueFull) as caught:
        queue.submit(WorkItem(PIXELS), level=STREAM)
    assert caught.value.reason == "LEVEL_QUEUE_FULL" and caught.value.retry_after_s > 0
    queue.submit(WorkItem(PIXELS))  # another level is still taken
    queue.submit(WorkItem(PIXELS), level=EXPENSIVE)
    assert queue.depth() == 4 and queue.depth(STREAM) == 2
    assert metrics.value("camserve_items_dropped_total", reason="level_full") == 1


def test_the_scheduling_flags():
    from camserve_server.process.server import scheduling
    from camserve_server.process.settings import parse_settings

    default = scheduling(parse_settings([]))
    assert (default.levels, default.unary, default.stream, default.expensive, default.share,
            default.highest) == (3, INTERACTIVE, STREAM, EXPENSIVE, 4, 0)
    assert all(p == LevelPolicy() for p in default.policies)
    one = scheduling(parse_settings(["--priority-levels", "1"]))
    assert (one.unary, one.stream, one.expensive) == (0, 0, 0)
    chosen = scheduling(parse_settings([
        "--priority-levels", "4", "--default-priority", "stream=3", "--default-priority",
        "expensive=4", "--level-max-wait-ms", "3=250", "--level-delay", "3",
        "--level-max-batch", "4=2", "--level-max-queued", "4=10", "--level-share", "2",
        "--highest-priority", "2"]))
    assert (chosen.levels, chosen.unary, chosen.stream, chosen.expensive, chosen.share,
            chosen.highest) == (4, 0, 2, 3, 2, 1)
    assert chosen.policies[2] == LevelPolicy(max_wait_s=0.25, delay=True)
    assert chosen.policies[3] == LevelPolicy(max_queued=10, max_batch=2)
    from_env = scheduling(parse_settings([], {"CAMSERVE_LEVEL_MAX_BATCH": "2=4,3=1"}))
    assert [p.max_batch for p in from_env.policies] == [0, 4, 1]


@pytest.mark.parametrize("argv, says", [
    (["--level-max-batch", "4=1"], "priority 4 is not one of the 3 priorities"),
    (["--priority-levels", "2", "--default-priority", "stream=3"], "priority 3 is not one"),
    (["--default-priority", "bulk=2"], "say unary, stream or expensive"),
    (["--level-max-wait-ms", "x=2"], "say a priority"),
    (["--level-max-wait-ms", "2"], "expected KEY=VALUE"),
    (["--level-max-queued", "2=-1"], "must be at least 0"),
    (["--highest-priority", "0"], "must be at least 1"),
    (["--priority-levels", "10"], "must be in 1..9"),
])
def test_bad_scheduling_flags_are_refused(argv, says, capsys):
    from camserve_server.process.settings import parse_settings

    with pytest.raises(SystemExit):
        parse_settings(argv, {})
    assert says in capsys.readouterr().err


def test_only_a_priority_token_asks_above_the_highest_priority(cat_path, monkeypatch):
    """--highest-priority 2: a caller's unary calls, asked or by default, wait at 2 at best;
    one with a --priority-token gets 1. A priority token is accepted as an ordinary one."""
    from camserve import Client

    from conftest import TINY, running

    with running(model=TINY, highest_priority=2, auth_tokens=("plain",),
                 priority_tokens=("vip",)) as (server, _):
        levels = record_levels(server.batcher, monkeypatch)
        target = f"127.0.0.1:{server.port}"
        with Client(target, token="plain") as plain, Client(target, token="vip") as vip:
            plain.predict(cat_path)
            plain.predict(cat_path, priority=1)
            plain.predict(cat_path, priority=3)
            vip.predict(cat_path)
            vip.predict(cat_path, priority=1)
            info = vip.model_info()
        assert levels == [STREAM, STREAM, EXPENSIVE, INTERACTIVE, INTERACTIVE]
        assert info.highest_priority == 2


def test_tritonclient_priority_overtakes_queued_default_calls(cat_path):
    """tritonclient's infer(..., priority=1) over HTTP, with the server's default for unary
    calls at 2: while a slow engine runs one batch, three default calls and then one at
    priority 1 are queued; the priority-1 call runs in the next batch, ahead of them."""
    httpclient = pytest.importorskip("tritonclient.http")
    from conftest import TINY, running

    with running(model=TINY, http_port=0, default_priorities=(("unary", 2),),
                 max_batch_size=1, level_share=9) as (server, _):
        worker = server.batcher._workers[0]
        run, release, order = worker.run_batch, threading.Event(), []

        def slow(works, *rest):  # the levels of the batch's items, then a wait
            order.append([p.level for p in worker.running[:len(works)]])
            release.wait(60)
            return run(works, *rest)

        worker.run_batch = slow
        image, results = cat_path.read_bytes(), []

        def infer(**kwargs):  # a caller of its own, on a thread of its own
            triton = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}",
                                                      network_timeout=120.0)
            try:
                tensor = httpclient.InferInput("image", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
                results.append(triton.infer("camserve", [tensor], **kwargs))
            finally:
                triton.close()

        def start(**kwargs) -> threading.Thread:
            thread = threading.Thread(target=infer, kwargs=kwargs, daemon=True)
            thread.start()
            return thread

        try:
            callers = [start()]
            wait_for(lambda: len(order) == 1, 30, "the first call running")
            callers += [start() for _ in range(3)]
            wait_for(lambda: server.batcher.depth() == 3, 30, "three calls queued")
            callers.append(start(priority=1))
            wait_for(lambda: server.batcher.depth() == 4, 30, "the priority call queued")
        finally:
            release.set()
        for thread in callers:
            thread.join(60)
        assert [r.as_numpy("probabilities").shape for r in results] == [(1, 10)] * 5
        assert order == [[STREAM], [INTERACTIVE], [STREAM], [STREAM], [STREAM]]


def test_an_item_with_extra_forwards_waits_at_the_expensive_level():
    from types import SimpleNamespace

    from camserve_server.batching.queue import WorkQueue
    from camserve_server.metrics import Metrics

    queue = WorkQueue(max_batch_size=2, max_delay_ms=0, max_queue=8, max_job_forwards=100,
                      metrics=Metrics(), batch_seconds=0.1, workers=1)
    pixels = np.zeros((2, 2, 3), np.uint8)
    queue.submit(WorkItem(pixels, SimpleNamespace(extra_cost=5)))  # asked as interactive
    queue.submit(WorkItem(pixels), level=STREAM)
    assert [p.level for p in queue.items] == [STREAM, EXPENSIVE]
    # An interactive item queued now waits behind neither; a frame behind the frame.
    assert queue.expected_wait(level=INTERACTIVE) < queue.expected_wait(level=EXPENSIVE)
    assert queue.items.ahead(INTERACTIVE) == 0 and queue.items.ahead(STREAM) == 1


def test_a_full_queue_refuses_the_newest_lower_item_to_make_room_for_a_higher_one():
    from camserve_server.batching.queue import WorkQueue
    from camserve_server.errors import QueueFull
    from camserve_server.metrics import Metrics

    metrics = Metrics()
    queue = WorkQueue(max_batch_size=2, max_delay_ms=0, max_queue=3, max_job_forwards=100,
                      metrics=metrics, batch_seconds=0.1, workers=1)
    pixels = np.zeros((2, 2, 3), np.uint8)
    frames = [queue.submit(WorkItem(pixels), level=STREAM) for _ in range(3)]
    with pytest.raises(QueueFull):  # no lower level to give way
        queue.submit(WorkItem(pixels), level=STREAM)
    call = queue.submit(WorkItem(pixels))
    assert not frames[0].done() and not frames[1].done() and not call.done()
    with pytest.raises(QueueFull, match="gave its place") as refused:
        frames[2].result(0)
    assert refused.value.retry_after_s > 0
    assert metrics.value("camserve_items_dropped_total", reason="evicted") == 1
    assert [p.level for p in queue.items] == [INTERACTIVE, STREAM, STREAM]
    queue.submit(WorkItem(pixels))
    queue.submit(WorkItem(pixels))
    with pytest.raises(QueueFull):  # full of interactive calls: refused, nothing evicted
        queue.submit(WorkItem(pixels))
    assert len(queue.items) == 3 and all(f.done() for f in frames)


def test_the_pool_runs_a_unary_calls_decode_before_queued_frames():
    from camserve_server.batching.levels import LevelPool

    pool = LevelPool(1, "test-pool", share=60)
    release, ran = threading.Event(), []
    try:
        busy = pool.submit(release.wait, 30)
        frames = [pool.submit_at(STREAM, ran.append, f"frame {i}") for i in range(3)]
        call = pool.submit(ran.append, "call")
        failing = pool.submit(int, "not a number")
        release.set()
        for future in [busy, *frames, call]:
            future.result(30)
        with pytest.raises(ValueError):
            failing.result(30)
        assert ran == ["call", "frame 0", "frame 1", "frame 2"]
        release.clear()
        pool.submit(release.wait, 30)
        left = pool.submit_at(STREAM, ran.append, "never")
    finally:
        release.set()
        pool.shutdown(wait=True, cancel_futures=True)
    assert left.done()  # run, or cancelled: never left pending
    with pytest.raises(RuntimeError):
        pool.submit(ran.append, "after")


# --- callers within a level --------------------------------------------------------------------


@dataclass(eq=False)
class Sent:
    name: str
    caller: str
    enqueued: float
    level: int = INTERACTIVE


def test_callers_take_turns_within_a_level():
    """A greedy caller's eight items and a polite one's two: the polite caller's come second
    and fourth, not after the greedy caller's eight; each caller's own stay in order."""
    levels, now = Levels(share=60), time.monotonic()
    for i in range(8):
        levels.append(Sent(f"g{i}", "greedy", now + i))
    levels.append(Sent("p0", "polite", now + 10))
    levels.append(Sent("p1", "polite", now + 11))
    assert levels.oldest().name == "g0"
    assert [levels.popleft().name for _ in range(10)] == [
        "g0", "p0", "g1", "p1", "g2", "g3", "g4", "g5", "g6", "g7"]


def test_a_full_queue_refuses_the_greedy_caller_first():
    levels, now = Levels(), time.monotonic()
    for i in range(3):
        levels.append(Sent(f"g{i}", "greedy", now + i))
    levels.append(Sent("p0", "polite", now + 5))
    assert levels.greedier(INTERACTIVE, "polite").name == "g2"  # 3 >= 1 + 2
    assert levels.greedier(INTERACTIVE, "greedy") is None  # it is the greedy one
    assert levels.newest_below(INTERACTIVE) is None
    levels.append(Sent("s0", "polite", now + 6, STREAM))
    levels.append(Sent("s1", "greedy", now + 7, STREAM))
    levels.append(Sent("s2", "greedy", now + 8, STREAM))
    assert levels.newest_below(INTERACTIVE).name == "s2"  # the greediest of the lower level


def test_the_queue_bounds_each_callers_items():
    from camserve_server.batching.queue import WorkQueue
    from camserve_server.errors import QueueFull
    from camserve_server.metrics import Metrics

    queue = WorkQueue(max_batch_size=4, max_delay_ms=0, max_queue=6, max_job_forwards=100,
                      metrics=Metrics(), batch_seconds=0.01, workers=1,
                      max_queue_per_caller=2)
    work = WorkItem(np.zeros((4, 4, 3), np.uint8))
    greedy = [queue.submit(work, caller="greedy") for _ in range(2)]
    with pytest.raises(QueueFull) as caught:
        queue.submit(work, caller="greedy")
    assert caught.value.reason == "CALLER_QUEUE_FULL" and caught.value.retry_after_s > 0
    polite = queue.submit(work, caller="polite")  # others still get in
    greedy[0].cancel()  # a withdrawn item gives its caller's slot back
    queue.submit(work, caller="greedy")
    assert queue.depth() == 3 and not polite.done()
    # A call is admitted whole at its first item: three items would pass the bound of two for
    # a caller with one waiting; a caller with nothing waiting may send more than the bound.
    with pytest.raises(QueueFull):
        queue.submit(work, caller="polite", admit=3)
    calls = [queue.submit(work, caller="batch", admit=3 if i == 0 else 0) for i in range(3)]
    assert queue.depth() == 6 and not any(c.done() for c in calls)


def test_a_call_over_its_callers_bound_is_refused_before_its_images_are_decoded(
        cat_path, monkeypatch):
    from camserve import CamserveError
    from camserve_server.render import images

    from conftest import TINY, running

    with running(model=TINY, max_queue_per_caller=2, max_batch_size=1) as (server, client):
        worker = server.batcher._workers[0]
        run, release = worker.run_batch, threading.Event()

        def blocked(works, *rest):
            release.wait(60)
            return run(works, *rest)

        worker.run_batch = blocked
        prepare, decoded = images.prepare, []

        def counting(*args, **kwargs):
            decoded.append(1)
            return prepare(*args, **kwargs)

        monkeypatch.setattr(images, "prepare", counting)
        waiting = []
        threads = [threading.Thread(target=lambda n=n: waiting.append(
            client.predict_many([cat_path] * n)), daemon=True) for n in (1, 2)]
        try:
            threads[0].start()
            wait_for(lambda: worker.running, 30, "the first call running")
            threads[1].start()
            wait_for(lambda: server.batcher.depth() == 2, 30, "two items of its queued")
            before = len(decoded)
            with pytest.raises(CamserveError) as caught:
                client.predict_many([cat_path] * 3)
            assert caught.value.reason == "CALLER_QUEUE_FULL"
            assert len(decoded) == before, "a refused call's images were decoded"
        finally:
            release.set()
        for thread in threads:
            thread.join(60)
        assert len(waiting) == 2


def test_a_full_queue_gives_a_polite_callers_item_the_greedy_ones_place():
    from camserve_server.batching.queue import WorkQueue
    from camserve_server.errors import QueueFull
    from camserve_server.metrics import Metrics

    queue = WorkQueue(max_batch_size=4, max_delay_ms=0, max_queue=4, max_job_forwards=100,
                      metrics=Metrics(), batch_seconds=0.01, workers=1)
    work = WorkItem(np.zeros((4, 4, 3), np.uint8))
    greedy = [queue.submit(work, caller="greedy") for _ in range(4)]
    queue.submit(work, caller="polite")
    with pytest.raises(QueueFull) as caught:
        greedy[-1].result(timeout=1)
    assert "a caller with fewer items waiting" in caught.value.message
    assert queue.depth() == 4


def test_callers_over_a_real_server(cat_path, monkeypatch, capsys):
    """Who the queue takes a call's items for: with --tenant-header on, each tenant header is
    a caller of its own (on one connection); a call without one is its connection; a token's
    caller is a digest of it, never the token. A call is admitted whole at its first item."""
    from camserve import Client

    from conftest import TINY, running

    with running(model=TINY, tenant_header=True, auth_tokens=("secret-1",)) as (server, _):
        batcher, seen = server.batcher, []
        submit = batcher.submit

        def recording(work, deadline=None, level=INTERACTIVE, caller="", admit=1):
            seen.append((caller, admit))
            return submit(work, deadline, level, caller, admit)

        monkeypatch.setattr(batcher, "submit", recording)
        with Client(f"127.0.0.1:{server.port}", token="secret-1") as client:
            client.predict_many([cat_path] * 3, metadata=[("x-camserve-tenant", "batch-job")])
            client.predict(cat_path, metadata=[("x-camserve-tenant", "person")])
            client.predict(cat_path)
        assert [a for _, a in seen] == [3, 0, 0, 1, 1]
        callers = [c for c, _ in seen]
        assert callers[:4] == ["tenant:batch-job"] * 3 + ["tenant:person"]
        assert callers[4].startswith("token:") and "secret-1" not in callers[4]
        with Client(f"127.0.0.1:{server.port}", token="secret-1") as client:
            info = client.model_info()  # GetModelInfo shows the scheduling
        assert (info.priority_levels, info.level_share, info.max_queue_per_caller,
                info.tenant_header) == (3, 4, 0, True)
        from camserve import cli

        assert cli.main(["--target", f"127.0.0.1:{server.port}", "--token", "secret-1",
                         "info"]) == 0
        assert ("scheduling:   priorities 1-3 (unary 1, streams 2, expensive 3; callers may "
                "ask for 1 or lower), a waiting lower priority goes first after 4 above it; "
                "callers by tenant header take turns, no bound per caller"
                ) in capsys.readouterr().out


def test_a_calls_priority_sets_its_level(tiny_server, cat_path, monkeypatch):
    """Triton's meaning: 1 the highest, 0 the call's default; out of range is refused."""
    from camserve import CamserveError
    from camserve_server.api import request

    assert [request.level(p, STREAM, 3, 0) for p in (0, 1, 2, 3)] == [
        STREAM, INTERACTIVE, STREAM, EXPENSIVE]
    # Without a priority token, no level above the highest a caller may ask for.
    assert [request.level(p, INTERACTIVE, 3, STREAM) for p in (0, 1, 2, 3)] == [
        STREAM, STREAM, STREAM, EXPENSIVE]
    server, client = tiny_server
    levels = record_levels(server.batcher, monkeypatch)
    client.predict(cat_path)
    client.predict(cat_path, priority=3)
    client.explain(cat_path, priority=2)
    assert levels == [INTERACTIVE, EXPENSIVE, STREAM]
    list(client.stream_predict([cat_path]))
    assert levels[-1] == STREAM
    from camserve.v1 import camserve_pb2 as pb

    with pytest.raises(CamserveError) as caught:
        client._call(client._stub.Predict, pb.PredictRequest(
            images=[pb.Image(encoded=cat_path.read_bytes())], priority=7), None)
    assert caught.value.reason == "INVALID_PRIORITY"
    assert "priorities 1 (the highest) to 3" in caught.value.details
    with pytest.raises(CamserveError) as caught:
        client.predict(cat_path, priority=4)  # the server has 3
    assert caught.value.reason == "INVALID_PRIORITY"
    with pytest.raises(CamserveError) as caught:
        client.predict(cat_path, priority=-1)  # refused before it is sent
    assert caught.value.reason == "INVALID_OPTION"


def test_the_decode_pool_takes_callers_in_turn():
    """A caller's many images to decode do not hold up another caller's one."""
    from camserve_server.batching.levels import LevelPool

    pool, order, gate = LevelPool(1, "test-pool"), [], threading.Event()
    try:
        pool.submit(gate.wait)  # the one thread is busy until the tasks below are queued
        done = [pool.submit_for(INTERACTIVE, "greedy", order.append, f"g{i}") for i in range(4)]
        done.append(pool.submit_for(INTERACTIVE, "polite", order.append, "p0"))
        gate.set()
        for future in done:
            future.result(timeout=10)
        assert order == ["g0", "p0", "g1", "g2", "g3"]
    finally:
        pool.shutdown()
