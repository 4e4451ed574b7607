"""Precision, several devices and the device data path, checked on CPU.

- ``--precision bf16`` runs on CPU: maps stay close to fp32 (correlation) and the top-1 class
  agrees on the test photos; fp16 is refused at start-up on CPU with a clear message.
- Several devices share one queue: fake engines on two "devices" show that an idle worker takes
  the next batch, that running out of memory splits a batch on its own device only, and that a
  prefetched (upcoming) batch is the one that runs next. A real server on ``--device cpu
  --device cpu`` lists both devices and counts batches by device.
- JPEGs decoded by the engine (``--jpeg-decode device``: the code CUDA runs, on CPU here) give
  the host path's pixels within one grey level, and a JPEG that cannot be decoded fails alone.
"""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import wait

import numpy as np
import pytest
import torch

from camserve import CamserveError
from camserve_server.batching.batcher import Batcher
from camserve_server.domain import EncodedJpeg, ExplainSpec, ItemResult, WorkItem
from camserve_server.engine.device import DataPath
from camserve_server.engine.engine import Engine
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec
from camserve_server.errors import OutOfMemory, StartupError
from camserve_server.metrics import Metrics
from camserve_server.process.server import CamServer
from camserve_server.process.settings import Settings, parse_settings
from camserve_server.render import images

from conftest import DATA, TINY, encode, load_rgb, resized, running

PHOTOS = ("chelsea.jpg", "coffee.jpg")
GRADIENT_METHODS = ("gradcam", "gradcam_plus_plus", "xgradcam", "layercam", "hirescam",
                    "eigencam")


# --- precision ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model():
    return load_model(ModelSpec())


def test_bf16_on_cpu_keeps_maps_and_top1(default_model):
    photos = [resized(load_rgb(DATA / name), (224, 224)) for name in PHOTOS]
    spec = ExplainSpec(methods=GRADIENT_METHODS, layers=(default_model.card.default_layer,))
    answers = {}
    for precision in ("fp32", "bf16"):
        engine = Engine(default_model, precision=precision)
        try:
            answers[precision] = engine.run([WorkItem(p, spec) for p in photos])
        finally:
            engine.close()
    for full, half in zip(answers["fp32"], answers["bf16"]):
        assert isinstance(half, ItemResult)
        assert half.logits.dtype == np.float32 and half.maps[0].raw.dtype == np.float32
        assert int(full.logits.argmax()) == int(half.logits.argmax())
        assert np.abs(full.probabilities - half.probabilities).max() < 0.05
        assert len(full.maps) == len(half.maps) == len(GRADIENT_METHODS)
        for a, b in zip(full.maps, half.maps):
            assert (a.method, a.target) == (b.method, b.target)
            assert a.raw.max() > 0
            # Measured on these photos: correlation 0.9995-0.9999, max difference 1.4-2.8 %
            # of the map's maximum.
            assert np.corrcoef(a.raw.ravel(), b.raw.ravel())[0, 1] > 0.995, a.method
            assert np.abs(a.raw - b.raw).max() < 0.1 * a.raw.max(), a.method


def test_fp16_on_cpu_is_refused_at_start_up():
    server = CamServer(Settings(host="127.0.0.1", port=0, http_port=None, model=TINY, device="cpu",
                                precision="fp16"))
    with pytest.raises(StartupError, match="fp16 needs a CUDA device.*bf16"):
        server.start()


def test_precision_and_device_flags():
    s = parse_settings(["--precision", "bf16", "--device", "cpu", "--device", "cpu"])
    assert (s.precision, s.devices) == ("bf16", ("cpu", "cpu"))
    assert parse_settings([], {"CAMSERVE_DEVICE": "cuda:0,cuda:1"}).devices == ("cuda:0",
                                                                               "cuda:1")
    assert parse_settings([]).device == "auto"
    with pytest.raises(SystemExit):
        parse_settings(["--precision", "fp8"])
    with pytest.raises(ValueError, match="precision"):
        Settings(precision="int8")


# --- several devices: the batcher with fake engines ------------------------------------------

def _result(value: float = 0.0) -> ItemResult:
    logits = np.array([value, 0.0], dtype=np.float32)
    return ItemResult(logits, logits)


class Gate:
    """Holds the first batch that any engine sharing it runs, until released."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self._taken = threading.Lock()

    def hold_first(self) -> None:
        if self._taken.acquire(blocking=False):
            assert self.released.wait(30)

    def set(self) -> None:
        self.released.set()


class FakeEngine:
    """Records each batch it ran; ``gate`` (when given) holds the first batch until released."""

    def __init__(self, name: str, gate: Gate = None, oom_over: int = 0) -> None:
        self.name = name
        self.batches = []
        self.upcoming = []
        self.started = threading.Event()
        self._gate = gate
        self._oom_over = oom_over

    def run_batch(self, works, upcoming=()):
        if self._oom_over and len(works) > self._oom_over:
            self.batches.append(("oom", len(works)))
            raise OutOfMemory("simulated")
        self.batches.append([float(w.pixels[0, 0, 0]) for w in works])
        self.upcoming.append([float(w.pixels[0, 0, 0]) for w in upcoming])
        self.started.set()
        if self._gate is not None:
            self._gate.hold_first()
        return [_result(float(w.pixels[0, 0, 0])) for w in works]


def _item(value: int) -> WorkItem:
    return WorkItem(np.full((2, 2, 3), value, dtype=np.uint8))


def test_an_idle_worker_takes_the_next_batch():
    gate = Gate()
    a, b = FakeEngine("fake:0", gate), FakeEngine("fake:1", gate)
    metrics = Metrics()
    batcher = Batcher([a.run_batch, b.run_batch], device=["fake:0", "fake:1"], metrics=metrics,
                      max_batch_size=4, max_delay_ms=0, max_queue=16)
    batcher.start()
    try:
        first = batcher.submit(_item(1))
        assert a.started.wait(10) or b.started.wait(10)
        busy = a if a.started.is_set() else b
        idle = b if busy is a else a
        # The busy worker holds its batch; the other one answers the next item meanwhile.
        second = batcher.submit(_item(2))
        assert second.result(10).device == idle.name
        assert not first.done()
        gate.set()
        assert first.result(10).device == busy.name
        assert first.result().result.logits[0] == 1 and second.result().result.logits[0] == 2
        # Many more: each answered once, by one of the two devices.
        tickets = [batcher.submit(_item(10 + i)) for i in range(12)]
        wait(tickets, 30)
        assert sorted(t.result().result.logits[0] for t in tickets) == list(range(10, 22))
        assert {t.result().device for t in tickets} <= {"fake:0", "fake:1"}
        ran = sorted(v for e in (a, b) for batch in e.batches for v in batch)
        assert ran == [1, 2, *range(10, 22)]
        batches = {d: metrics.registry.get_sample_value("camserve_device_batches_total",
                                                        {"device": d}) or 0
                   for d in ("fake:0", "fake:1")}
        assert sum(batches.values()) == len(a.batches) + len(b.batches)
        assert batches["fake:0"] == len(a.batches) and batches["fake:1"] == len(b.batches)
    finally:
        gate.set()
        batcher.stop(10)


def test_out_of_memory_splits_on_its_own_device():
    gate = Gate()
    engines = [FakeEngine(f"fake:{i}", gate, oom_over=1) for i in range(2)]
    metrics = Metrics()
    batcher = Batcher([e.run_batch for e in engines], device=[e.name for e in engines],
                      metrics=metrics, max_batch_size=4, max_delay_ms=300, max_queue=16)
    batcher.start()
    try:
        # Whichever worker takes the first item holds it; the other gets the next four as one
        # batch, which does not fit its device: split there, until batches of one.
        first = batcher.submit(_item(1))
        assert engines[0].started.wait(10) or engines[1].started.wait(10)
        busy = next(e for e in engines if e.started.is_set())
        free = next(e for e in engines if e is not busy)
        tickets = [batcher.submit(_item(v)) for v in (2, 3, 4, 5)]
        wait(tickets, 30)
        assert all(t.result().device == free.name for t in tickets)
        assert sorted(t.result().result.logits[0] for t in tickets) == [2, 3, 4, 5]
        assert ("oom", 4) in free.batches
        assert sorted(b[0] for b in free.batches if b[0] != "oom") == [2, 3, 4, 5]
        assert busy.batches == [[1.0]] and not first.done()
        assert metrics.registry.get_sample_value("camserve_oom_splits_total") == 3
        gate.set()
        assert first.result(10).device == busy.name
    finally:
        gate.set()
        batcher.stop(10)


def test_each_worker_prepares_on_its_own_thread_before_it_counts_alive():
    """The server's warm-up and torch thread count run on the thread that computes; a worker
    counts alive (health SERVING) only once it has prepared."""
    engines = [FakeEngine(f"fake:{i}") for i in range(2)]
    release = threading.Event()
    prepared, alive = [], []

    def prepare(name):
        def run():
            prepared.append((name, threading.current_thread().name))
            assert release.wait(30)
            return 0.5
        return run

    batcher = Batcher([e.run_batch for e in engines], device=[e.name for e in engines],
                      max_batch_size=4, max_delay_ms=0, max_queue=16, on_worker=alive.append,
                      prepare=[prepare(e.name) for e in engines])
    batcher.start()
    try:
        deadline = threading.Event()
        while len(prepared) < 2 and not deadline.wait(0.01):
            pass
        assert sorted(prepared) == [("fake:0", "camserve-batcher-0"),
                                    ("fake:1", "camserve-batcher-1")]
        assert alive == []  # nobody counts alive while preparing
        release.set()
        assert batcher.submit(_item(3)).result(10).result.logits[0] == 3.0
        assert alive and alive[-1] is True
    finally:
        release.set()
        batcher.stop(10)


def test_a_failing_warm_up_stops_the_server_from_starting(monkeypatch):
    from camserve_server.models import runtime

    def broken(*_args):
        raise RuntimeError("no memory for the warm-up batch")

    monkeypatch.setattr(runtime, "warm_up", broken)
    with pytest.raises(StartupError, match="fails its warm-up: no memory"):
        CamServer(Settings(model=TINY, port=0, http_port=None)).start()


def test_after_a_batch_with_company_the_worker_waits_for_as_many(monkeypatch):
    """Closed-loop callers come back one by one: after a batch of n, the worker waits (a
    fraction of a batch's time) for n items instead of starting a batch of 1. After a batch of
    1 it never waits. (The window is made 5 s here so that the 50 ms gaps fall inside it.)"""
    import time

    from camserve_server.batching import queue as module

    monkeypatch.setattr(module, "COMPANY_WAIT", 100.0)
    monkeypatch.setattr(module, "COMPANY_WAIT_MAX_S", 5.0)
    engine = FakeEngine("fake:0")
    batcher = Batcher(engine.run_batch, device="fake:0", max_batch_size=8, max_delay_ms=0,
                      max_queue=16)
    batcher.start()
    try:
        batcher.submit(_item(1)).result(10)
        second = batcher.submit(_item(2))
        time.sleep(0.05)
        third = batcher.submit(_item(3))
        second.result(10), third.result(10)
        engine._gate = Gate()  # hold the next batch while three items queue behind it
        engine.started.clear()
        held = batcher.submit(_item(4))
        assert engine.started.wait(10)
        company = [batcher.submit(_item(v)) for v in (5, 6, 7)]
        engine._gate.set()
        held.result(10), [t.result(10) for t in company]
        back = [batcher.submit(_item(8))]
        time.sleep(0.05)
        back += [batcher.submit(_item(v)) for v in (9, 10)]
        [t.result(10) for t in back]
    finally:
        batcher.stop(10)
    assert engine.batches == [[1.0], [2.0], [3.0], [4.0], [5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]


def test_prefetched_batch_runs_next_on_the_same_worker():
    gate = Gate()
    engine = FakeEngine("fake:0", gate)
    batcher = Batcher(engine.run_batch, device="fake:0", max_batch_size=2, max_delay_ms=0,
                      max_queue=16, prefetch=True)
    batcher.start()
    try:
        first = batcher.submit(_item(1))
        assert engine.started.wait(10)
        # While the first batch runs, two full batches wait.
        tickets = [batcher.submit(_item(v)) for v in (2, 3, 4, 5)]
        gate.set()
        wait([first, *tickets], 30)
        assert [t.result().result.logits[0] for t in (first, *tickets)] == [1, 2, 3, 4, 5]
        assert engine.batches == [[1.0], [2.0, 3.0], [4.0, 5.0]]
        # The first batch ran with nothing upcoming (the queue filled later); the second was
        # handed the third as its upcoming batch, which then ran next.
        assert engine.upcoming[0] == []
        assert engine.upcoming[1] == [4.0, 5.0]
    finally:
        gate.set()
        batcher.stop(10)


# --- the data path: JPEGs decoded by the engine -----------------------------------------------

LIMITS = images.Limits(32 << 20, 50_000_000, device_jpeg=True)


@pytest.mark.parametrize("name", PHOTOS)
def test_device_decode_matches_the_host_within_one_level(name):
    data = (DATA / name).read_bytes()
    deferred = images.prepare(data, (224, 224), LIMITS)
    host = images.prepare(data, (224, 224), images.Limits(32 << 20, 50_000_000))
    assert isinstance(deferred.pixels, EncodedJpeg) and deferred.size == host.size
    path = DataPath(torch.device("cpu"), (224, 224))
    staged = path.stage([WorkItem(deferred.pixels), WorkItem(host.pixels)])
    pixels = path.wait(staged).numpy()
    assert not staged.errors and pixels.shape == (2, 224, 224, 3)
    assert np.array_equal(pixels[1], host.pixels)  # arrays pass through unchanged
    diff = np.abs(pixels[0].astype(int) - host.pixels.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.5


def test_only_plain_jpegs_are_deferred():
    cat = load_rgb(DATA / "chelsea.jpg")
    gray = encode(cat[:, :, 0])
    assert isinstance(images.prepare(gray, (224, 224), LIMITS).pixels, EncodedJpeg)
    for data in (encode(cat, "PNG"), encode(cat, "JPEG", exif=_rotated_exif())):
        assert isinstance(images.prepare(data, (224, 224), LIMITS).pixels, np.ndarray)
    # An overlay's copy of the whole image decodes on the host; the model's input still goes
    # to the device as it would without one (the same input whatever the outputs).
    full = images.prepare(encode(cat), (224, 224), LIMITS, full_pixels=1 << 20)
    assert isinstance(full.pixels, EncodedJpeg) and full.full is not None
    # The pixel limit is still checked from the header, before queueing.
    with pytest.raises(Exception, match="max_image_pixels"):
        images.prepare(encode(cat), (224, 224), images.Limits(32 << 20, 1000, True))


def _rotated_exif() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def test_undecodable_jpeg_fails_alone_in_the_engine():
    model = load_model(ModelSpec(source=TINY))
    engine = Engine(model)
    try:
        good = (DATA / "chelsea.jpg").read_bytes()
        size = images.peek_size(good)
        bad = EncodedJpeg(good[:len(good) // 2], size)
        answers = engine.run([WorkItem(EncodedJpeg(good, size)), WorkItem(bad),
                              WorkItem(resized(load_rgb(DATA / "coffee.jpg"),
                                               model.card.input_size))])
    finally:
        engine.close()
    assert isinstance(answers[0], ItemResult) and isinstance(answers[2], ItemResult)
    assert "could not be decoded as JPEG" in str(answers[1])
    assert "decode_jpeg.cpp" not in str(answers[1])


# --- a real server on two CPU "devices", decoding JPEGs in the engine -------------------------

def test_server_on_two_cpu_devices_with_device_jpeg_decode(cat_path, coffee_path):
    photos = [cat_path.read_bytes(), coffee_path.read_bytes()]
    with running(model=TINY, max_batch_size=4, jpeg_decode="host") as (_, client):
        host = [client.explain(p, top_k=3) for p in photos]
    with running(model=TINY, device="cpu,cpu", max_batch_size=4, jpeg_decode="device",
                 metrics_port=0) as (server, client):
        info = client.model_info()
        assert list(info.devices) == ["cpu", "cpu"]
        threads = []
        answers = [None] * 8

        def call(i):
            answers[i] = client.explain(photos[i % 2], top_k=3)

        for i in range(8):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
        for t in threads:
            t.join()
        truncated = photos[0][:len(photos[0]) // 2]
        with pytest.raises(CamserveError) as error:
            client.predict(truncated)
        assert error.value.code.name == "INVALID_ARGUMENT"
        assert "could not be decoded" in error.value.details
        with urllib.request.urlopen(
                f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    assert 'camserve_device_batches_total{device="cpu"}' in text
    for i, a in enumerate(answers):
        b = host[i % 2]
        assert a.target.index == b.target.index and a.timing.device == "cpu"
        assert a.heatmap.shape == b.heatmap.shape
        # The engine's resize is within one grey level of Pillow's: maps stay close.
        assert np.abs(a.heatmap - b.heatmap).max() < 0.05
        assert np.corrcoef(a.raw.ravel(), b.raw.ravel())[0, 1] > 0.99
