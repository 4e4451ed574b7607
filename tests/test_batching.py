"""An item's answer does not depend on what else was batched with it."""

from __future__ import annotations

import threading

import numpy as np

from conftest import TINY, resized, running


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
