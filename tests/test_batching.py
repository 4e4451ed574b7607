"""An item's answer does not depend on what else was batched with it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from camserve import CamserveError

from conftest import TINY, resized, running, wait_for


def _requests(cat, coffee):
    rng = np.random.default_rng(7)
    noise = [rng.integers(0, 256, (120 + 10 * i, 160, 3), dtype=np.uint8) for i in range(4)]
    images = [resized(cat, (224, 224)), coffee, *noise, cat, resized(coffee, (100, 300))]
    kinds = ["predict", "explain", "explain", "predict", "explain", "predict", "explain",
             "explain"]
    targets = [None, None, 3, None, "espresso", None, 281, None]
    return list(zip(kinds, images, targets))


def _call(client, kind, image, target):
    if kind == "predict":
        return client.predict(image, top_k=10)
    return client.explain(image, target=target, top_k=10)


def _same(a, b, atol=1e-5):
    pa = a.prediction if hasattr(a, "prediction") else a
    pb = b.prediction if hasattr(b, "prediction") else b
    assert [c.index for c in pa.top] == [c.index for c in pb.top]
    np.testing.assert_allclose([c.logit for c in pa.top], [c.logit for c in pb.top], atol=atol)
    np.testing.assert_allclose([c.probability for c in pa.top], [c.probability for c in pb.top],
                               atol=atol)
    if hasattr(a, "raw"):
        assert a.target.index == b.target.index
        np.testing.assert_allclose(a.raw, b.raw, atol=atol)
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=atol)


def _batched(client, requests):
    """All requests at once, released together, so they share one batch."""
    answers = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i):
        barrier.wait()
        answers[i] = _call(client, *requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_alone_equals_in_a_full_mixed_batch(default_server, cat, coffee):
    requests = _requests(cat, coffee)
    # A long max delay makes the 8 concurrent requests fill one batch; a full batch starts at
    # once, so the delay is never waited out.
    with running(max_batch_size=8, max_delay_ms=60_000) as (_, client):
        batched = _batched(client, requests)
    assert [a.timing.batch_size for a in batched] == [8] * 8
    # The same model, one request at a time.
    _, client = default_server
    alone = [_call(client, *r) for r in requests]
    assert all(a.timing.batch_size == 1 for a in alone)
    for a, b in zip(alone, batched):
        _same(a, b)


def test_batch_of_one_server_equals_batching_server(cat, coffee):
    """The same requests on a server that never batches."""
    requests = _requests(cat, coffee)[:4]
    with running(model=TINY, max_batch_size=1) as (_, client):
        alone = [_call(client, *r) for r in requests]
    with running(model=TINY, max_batch_size=4, max_delay_ms=60_000) as (_, client):
        batched = _batched(client, requests)
    assert [a.timing.batch_size for a in batched] == [4] * 4
    for a, b in zip(alone, batched):
        _same(a, b)


def test_an_undecoded_item_is_decoded_on_the_worker_and_fails_alone():
    """A DeferredDecode item is decoded by the batcher's worker when it takes the item; one
    whose decode fails answers that error, and the rest of its batch runs."""
    from camserve_server.batching.batcher import Batcher
    from camserve_server.domain import DeferredDecode, ItemResult, WorkItem
    from camserve_server.errors import InvalidArgument

    seen, decoded_on = [], []

    def run_batch(works):
        seen.append([w.pixels for w in works])
        return [ItemResult(np.array([float(w.pixels[0, 0, 0])]), np.array([1.0]))
                for w in works]

    def decode(value):
        def later():
            decoded_on.append(threading.current_thread().name)
            if value is None:
                raise InvalidArgument("images[0] could not be decoded")
            return np.full((2, 2, 3), value, np.uint8)
        return DeferredDecode(later)

    # A long max delay gathers the three items into one batch.
    batcher = Batcher(run_batch, max_batch_size=3, max_delay_ms=60_000, max_queue=8)
    batcher.start()
    try:
        wait_idle(batcher)
        tickets = [batcher.submit(WorkItem(np.full((2, 2, 3), 1, np.uint8))),
                   batcher.submit(WorkItem(decode(2))), batcher.submit(WorkItem(decode(None)))]
        assert not batcher.idle()
        assert tickets[0].result(10).result.logits[0] == 1
        assert tickets[1].result(10).result.logits[0] == 2
        with pytest.raises(InvalidArgument, match="could not be decoded"):
            tickets[2].result(10)
    finally:
        batcher.stop()
    assert len(seen) == 1 and all(isinstance(p, np.ndarray) for p in seen[0])
    assert decoded_on == ["camserve-batcher"] * 2


class _Die(BaseException):
    """Not an Exception: what no handler of the worker's catches (SystemExit, say)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_decoding_fails_the_items_it_had_taken_and_restarts():
    """The worker dies in the middle of its deferred decodes, before the batch runs: the
    items it had taken fail at once (not at their deadline), one that had already failed its
    own decode keeps its error, and a new worker serves the next item."""
    from camserve_server.batching.batcher import Batcher
    from camserve_server.domain import DeferredDecode, ItemResult, WorkItem
    from camserve_server.errors import BatchFailed, InvalidArgument

    def run_batch(works):
        return [ItemResult(np.zeros(1), np.ones(1)) for _ in works]

    def fail(error):
        def decode():
            raise error
        return WorkItem(DeferredDecode(decode))

    plain = WorkItem(np.zeros((2, 2, 3), np.uint8))
    batcher = Batcher(run_batch, max_batch_size=3, max_delay_ms=60_000, max_queue=8,
                      restart_delay_s=0.0)
    batcher.start()
    try:
        wait_idle(batcher)
        tickets = [batcher.submit(plain), batcher.submit(fail(InvalidArgument("bad image"))),
                   batcher.submit(fail(_Die()))]
        with pytest.raises(BatchFailed, match="worker died"):
            tickets[0].result(10)
        with pytest.raises(BatchFailed, match="worker died"):
            tickets[2].result(10)
        with pytest.raises(InvalidArgument, match="bad image"):
            tickets[1].result(10)
        wait_idle(batcher)
        again = [batcher.submit(plain) for _ in range(3)]
        assert [t.result(10).batch_size for t in again] == [3, 3, 3]
    finally:
        batcher.stop(10)


def test_a_worker_decoding_a_lone_item_waits_for_the_items_being_decoded_elsewhere():
    """Two callers at once: one item undecoded, the other announced while the pool decodes
    it. The worker decodes the first, waits for the second (as long as its own decode took)
    and runs both in one batch."""
    from camserve_server.batching.batcher import Batcher
    from camserve_server.domain import DeferredDecode, ItemResult, WorkItem

    sizes, started, release = [], threading.Event(), threading.Event()

    def run_batch(works):
        sizes.append(len(works))
        return [ItemResult(np.zeros(1), np.ones(1)) for _ in works]

    def slow_decode():
        started.set()
        release.wait(10)
        return np.zeros((2, 2, 3), np.uint8)

    batcher = Batcher(run_batch, max_batch_size=4, max_delay_ms=0, max_queue=8)
    batcher.start()
    try:
        wait_idle(batcher)
        with batcher.arriving(1):
            lone = batcher.submit(WorkItem(DeferredDecode(slow_decode)))
            assert started.wait(10)
            time.sleep(1.0)  # the worker's decode takes 1 s: it then waits up to 1 s
            release.set()
            time.sleep(0.1)  # for the other item, which comes after that decode
            other = batcher.submit(WorkItem(np.zeros((2, 2, 3), np.uint8)))
        assert lone.result(10).batch_size == other.result(10).batch_size == 2
        assert sizes == [2] and not batcher.idle()  # its last batch had company
    finally:
        batcher.stop()


def wait_idle(batcher) -> None:
    wait_for(batcher.idle, what="the batcher's worker waiting for items")


def test_a_lone_call_is_decoded_by_the_idle_worker_with_the_pools_answer(monkeypatch, cat_path):
    """One image while the batcher is idle and its last batch ran alone: decoded on the
    worker, not in the pool; the answer equals that of the same image decoded in the pool (a
    call with two images). After a batch of two, the next lone call goes through the pool."""
    from camserve_server.api.pipeline import Pipeline

    decode_here, threads, pixels = Pipeline.decode_here, [], []

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        decoded = decode_here(self, *args, **kwargs)
        pixels.append(decoded.image.pixels)
        return decoded

    monkeypatch.setattr(Pipeline, "decode_here", spy)
    jpeg = cat_path.read_bytes()
    worker = "camserve-batcher"
    with running(model=TINY) as (server, client):
        wait_idle(server.batcher)
        alone = client.predict(jpeg, top_k=10)
        assert threads == [worker]
        pair = client.predict_many([jpeg, jpeg], top_k=10)
        assert [a.timing.batch_size for a in pair] == [2, 2]
        after_pair = client.predict(jpeg)
        assert worker not in threads[1:4] and after_pair.timing.batch_size == 1
        wait_idle(server.batcher)
        explained = client.explain(jpeg, outputs=("raw", "overlay_jpeg"))
        assert threads[4] == worker and explained.overlay is not None
        wait_idle(server.batcher)  # its worker may still be finishing that batch
        with pytest.raises(CamserveError) as refused:
            client.predict(b"not an image")
    assert threads[5:] == [worker]
    assert refused.value.code.name == "INVALID_ARGUMENT" and "images[0]" in str(refused.value)
    for i in (1, 2):  # the same decode wherever it runs
        np.testing.assert_array_equal(pixels[0], pixels[i])
    for a in pair:
        _same(alone, a)
