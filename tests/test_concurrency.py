"""16 threads of mixed Predict/Explain: every request answered exactly once, each answer equal
to the same request served alone."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from camserve import Client


def test_sixteen_threads_mixed_requests(resnet_server, cat, coffee):
    server, client = resnet_server
    rng = np.random.default_rng(3)
    images = [cat, coffee] + [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
                              for _ in range(6)]
    # (kind, image index, target, layer)
    plan = [("predict", i % 8, None, None) if i % 3 == 0 else
            ("explain", i % 8, (i * 37) % 1000 if i % 2 else None,
             "layer3" if i % 5 == 0 else None) for i in range(48)]

    def call(c, kind, index, target, layer):
        if kind == "predict":
            return c.predict(images[index], top_k=5)
        return c.explain(images[index], target=target, layer=layer, top_k=5)

    expected = {}
    for key in set(plan):
        expected[key] = call(client, *key)

    answers = Counter()
    results = {}
    lock = threading.Lock()
    errors = []

    def worker(t):
        with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
            for n, key in enumerate(plan[t::2] + plan[:t]):
                try:
                    result = call(c, *key)
                except Exception as exc:  # collected, reported below
                    errors.append(exc)
                    continue
                with lock:
                    answers[(t, n)] += 1
                    results[(t, n)] = (key, result)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    sent = sum(len(plan[t::2] + plan[:t]) for t in range(16))
    assert sum(answers.values()) == sent and set(answers.values()) == {1}
    batch_sizes = Counter()
    for key, result in results.values():
        want = expected[key]
        got_prediction = getattr(result, "prediction", result)
        want_prediction = getattr(want, "prediction", want)
        assert [c.index for c in got_prediction.top] == [c.index for c in want_prediction.top]
        np.testing.assert_allclose([c.logit for c in got_prediction.top],
                                   [c.logit for c in want_prediction.top], atol=1e-5)
        if key[0] == "explain":
            assert result.target.index == want.target.index and result.layer == want.layer
            np.testing.assert_allclose(result.raw, want.raw, atol=1e-5)
        batch_sizes[got_prediction.timing.batch_size] += 1
    assert max(batch_sizes) > 1, "nothing was batched: the test did not exercise batching"
