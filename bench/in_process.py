"""camserve's engine in the benchmark's own process: the in-process baseline that
bench_scale.py and bench_workers.py set gRPC against."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

BATCH = 8


class InProcess:
    """camserve's engine in this process, on the same photo decoded once, with the torch thread
    count of a one-process server (every usable core), on a thread of its own as in the server
    (on a busy machine torch ran up to 4x slower on the main thread than on another one)."""

    def __init__(self, model: str, photo: bytes) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._thread.submit(self._load, model, photo).result()

    def _load(self, model: str, photo: bytes) -> None:
        from camserve_server.process.server import openmp_defaults, torch_threads

        openmp_defaults()  # as the server has them (before torch loads)
        import torch

        from camserve_server.domain import ExplainSpec, WorkItem
        from camserve_server.engine.engine import Engine
        from camserve_server.engine.models import load_model
        from camserve_server.process.settings import Settings
        from camserve_server.render import images

        settings = Settings(model=model, weights=None if model == "efficientnet_lite0"
                            else "random")
        torch.set_num_threads(torch_threads(settings))
        served = load_model(settings)
        pixels = images.prepare(photo, served.card.input_size,
                                images.Limits(1 << 30, 1 << 30)).pixels
        self.engine = Engine(served)
        spec = ExplainSpec(layers=(served.card.default_layer,))
        self.items = {"Predict": WorkItem(pixels), "Explain": WorkItem(pixels, spec)}
        for item in self.items.values():  # warm up both shapes
            for size in (1, BATCH, BATCH):
                self.engine.run([item] * size)

    def one(self, rpc: str, calls: int) -> List[float]:
        """Seconds per single-image call."""
        return self._thread.submit(self._one, rpc, calls).result()

    def _one(self, rpc: str, calls: int) -> List[float]:
        out = []
        for _ in range(calls):
            started = time.perf_counter()
            self.engine.run([self.items[rpc]])
            out.append(time.perf_counter() - started)
        return out

    def rate(self, rpc: str, seconds: float) -> float:
        """Images/s at batch 8."""
        return self._thread.submit(self._rate, rpc, seconds).result()

    def _rate(self, rpc: str, seconds: float) -> float:
        batches, started = 0, time.perf_counter()
        while batches < 2 or time.perf_counter() - started < seconds:
            self.engine.run([self.items[rpc]] * BATCH)
            batches += 1
        return batches * BATCH / (time.perf_counter() - started)

    def close(self) -> None:
        self._thread.submit(self.engine.close).result()
        self._thread.shutdown()
