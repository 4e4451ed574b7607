"""What every benchmark script shares: a camserve server subprocess, closed-loop callers, the
server's memory, percentiles, the machine, and the results file.

A script's shape::

    p = harness.parser(__doc__)                 # adds --json PATH
    args = p.parse_args(argv)
    results = harness.Results(__file__, argv, args)   # machine, versions, commit, date, load
    with harness.Server("efficientnet_lite0", ["--max-queue", "64"]) as server:
        calls = harness.closed_loop(lambda i: client.predict(photo), callers=4, seconds=5)
    results.row("Predict", callers=4, images_per_s=calls.rate, **calls.percentiles())
    results.finish(args.json)                   # prints the tables, writes the JSON

The JSON (by default ``bench/results/<script>.json``) holds ``script``, ``command``, ``date``,
``commit``, ``machine``, ``versions``, ``load_average`` (``before`` and ``after``: 1, 5 and 15
minutes), ``settings`` (the parsed arguments), ``rows`` (each a dict with a ``table`` key and
the table's cells, in column order) and ``notes``. ``render`` turns it into the Markdown that
the script prints and that ``bench/report.py`` puts on docs/benchmarks.md, so the page shows
what a command printed and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PHOTO = ROOT / "tests" / "data" / "chelsea.jpg"  # skimage's "chelsea", 451x300 JPEG
DEFAULT_MODEL = "efficientnet_lite0"
BATCH = 8  # the in-process baselines' batch size

# A client option: a connection of its own (gRPC would otherwise share one among clients of the
# same target). The kernel spreads connections, not calls, over a server's --workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def photo() -> bytes:
    """The benchmarks' photo as JPEG bytes."""
    return PHOTO.read_bytes()


def default_weights(model: str) -> Optional[str]:
    """Seeded random weights (``--weights random``) for torchvision: and timm: models, so that
    nothing is downloaded and the server and this process load the same ones; None (the
    source's own) for any other."""
    return "random" if model.split(":", 1)[0] in ("torchvision", "timm") else None


# --- the machine and the results file --------------------------------------------------------


def machine() -> Dict[str, Any]:
    """The CPU model, the cores this process may use, the platform."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "platform": platform.platform()}


def versions() -> Dict[str, Optional[str]]:
    """Python and the installed versions of what the numbers depend on (no import needed)."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("camserve", "torch", "torchvision", "timm", "grpcio", "protobuf", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> List[float]:
    """The 1, 5 and 15-minute load averages: anything else running skews every number."""
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> Optional[str]:
    """The checkout's HEAD (with ``-dirty`` when tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the docstring's first paragraph, with ``--json PATH``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH",
                   help="where the results go (default bench/results/SCRIPT.json)")
    return p


class Results:
    """One run's results: made when the run starts (it notes the machine, versions, commit, date
    and load average), filled with ``row`` and ``note``, ended with ``finish``."""

    def __init__(self, script: str, argv: Optional[Sequence[str]] = None,
                 args: Optional[argparse.Namespace] = None) -> None:
        self.script = Path(script).stem
        argv = sys.argv[1:] if argv is None else list(argv)
        self.doc: Dict[str, Any] = {
            "script": self.script,
            "command": shlex.join([_interpreter(), f"bench/{Path(script).name}", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit(),
            "machine": machine(),
            "versions": versions(),
            "load_average": {"before": load_average(), "after": None},
            "settings": {k: v for k, v in vars(args).items() if k != "json"} if args else {},
            "rows": [],
            "notes": [],
        }
        m = self.doc["machine"]
        print(f"# {self.script}: {m['cpu']}, {m['cores']} cores, load average "
              f"{' / '.join(map(str, self.doc['load_average']['before']))}", file=sys.stderr,
              flush=True)

    @property
    def machine(self) -> Dict[str, Any]:
        return self.doc["machine"]

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return self.doc["rows"]

    def row(self, table: str, **cells: Any) -> Dict[str, Any]:
        """Add a row to ``table`` (the cells' order is the columns' order)."""
        row = {"table": table, **{k: _plain(v) for k, v in cells.items()}}
        self.doc["rows"].append(row)
        return row

    def note(self, text: str) -> None:
        """A sentence printed (and shown) under the tables."""
        self.doc["notes"].append(text)

    def finish(self, path: Optional[str] = None) -> Path:
        """Print the tables and write the JSON (to ``path`` or bench/results/SCRIPT.json)."""
        self.doc["load_average"]["after"] = load_average()
        out = Path(path) if path else RESULTS / f"{self.script}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        print("\n" + render(self.doc))
        print(f"wrote {out}")
        return out


def _interpreter() -> str:
    """This Python as a command names it: relative to the checkout when inside it (the
    project's .venv/bin/python), else by its name."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(ROOT))
    except ValueError:
        return executable.name


def _plain(value: Any) -> Any:
    """JSON-ready: numpy numbers become Python ones, floats keep 4 significant digits."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def cell(value: Any) -> str:
    """A value as a table shows it: 3 significant digits for floats (no fewer than the units),
    lists joined with commas, dicts as ``key: value``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        size = abs(value)
        return (f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else
                f"{value:.2f}" if size >= 0.01 or size == 0 else f"{value:.1e}")
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def render(doc: Dict[str, Any], heading: str = "###") -> str:
    """The tables (one per ``table`` name, in order of first appearance) and the notes, as
    Markdown."""
    tables: Dict[str, List[Dict[str, Any]]] = {}
    for row in doc["rows"]:
        tables.setdefault(row["table"], []).append(row)
    parts = []
    for name, rows in tables.items():
        columns = list(dict.fromkeys(k for row in rows for k in row if k != "table"))
        numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                       for r in rows if r.get(c) is not None) for c in columns]
        lines = [f"{heading} {name}", "",
                 "| " + " | ".join(c.replace("_", " ") for c in columns) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
        parts.append("\n".join(lines))
    parts += doc.get("notes", [])
    return "\n\n".join(parts) + "\n"


# --- numbers ---------------------------------------------------------------------------------


def percentiles(seconds: Iterable[float]) -> Dict[str, Optional[float]]:
    """p50, p90 and p99 in milliseconds of latencies given in seconds (None if there are none)."""
    import numpy as np

    ms = np.asarray(list(seconds), dtype=float) * 1000.0
    if not ms.size:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    p50, p90, p99 = np.percentile(ms, (50, 90, 99))
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def median(values: Iterable[float]) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# --- the server ------------------------------------------------------------------------------


class Server:
    """``python -m camserve_server`` on a free port of 127.0.0.1 with ``model`` (weights: see
    ``default_weights``) and ``flags``; returns once it prints that it serves. Its stderr goes
    to a temporary file (``tail()``, shown if it fails to start); ``stop()`` sends SIGTERM.
    ``port``, ``target``, ``process``; ``rss_mib()`` is its resident memory with its workers'."""

    def __init__(self, model: str = DEFAULT_MODEL, flags: Sequence[str] = (),
                 weights: Optional[str] = "default", log_level: str = "WARNING",
                 start_timeout: float = 600.0) -> None:
        weights = default_weights(model) if weights == "default" else weights
        command = [sys.executable, "-m", "camserve_server", "--host", "127.0.0.1", "--port",
                   "0", "--http-port", "off", "--model", model,
                   *(["--weights", weights] if weights else []), "--log-level", log_level, *flags]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True)
        self.port = 0
        self.http_port = 0  # with --http-port in flags: the port HTTP is served on
        self._served = False
        self._settled = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._settled.wait(start_timeout) or not self._served:
            self.stop()
            raise RuntimeError(f"the server did not start:\n{self.tail()}")
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stdout:  # read to the end, so that the pipe never fills
            if line.startswith("camserve-server listening on "):
                self.port = int(line.rsplit(":", 1)[1])
            elif line.startswith("camserve-server http on "):
                self.http_port = int(line.rsplit(":", 1)[1])
            elif line.startswith("camserve-server serving "):
                self._served = True
                self._settled.set()
        self._settled.set()  # it exited before it served

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def rss_mib(self) -> float:
        return rss_mib(self.process.pid)

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status. A server that
        had already ended by itself has its log's tail shown on stderr."""
        if self.process.poll() is not None and self.process.returncode != 0:
            print(f"# the server had exited with status {self.process.returncode}:\n"
                  f"{self.tail()}", file=sys.stderr, flush=True)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of a process and its children (a server's workers), MiB; 0 for a
    process that is gone."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024.0
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_mib(int(child))
    except OSError:
        pass
    return total


class MemorySampler:
    """The peak of ``rss_mib(pid)``, sampled every ``every`` seconds on a thread of its own."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, rss_mib(self.pid))

    def reset(self) -> float:
        """Start a new peak from now; the memory now."""
        self.peak = now = rss_mib(self.pid)
        return now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def settled_rss_mib(pid: int, tolerance: float = 0.5, limit: float = 20.0) -> float:
    """The memory once it stops growing (within ``tolerance`` MiB over a second)."""
    previous = rss_mib(pid)
    ends = time.monotonic() + limit
    while time.monotonic() < ends:
        time.sleep(1.0)
        now = rss_mib(pid)
        if abs(now - previous) < tolerance:
            return now
        previous = now
    return previous


# --- callers ---------------------------------------------------------------------------------


@dataclass
class Call:
    caller: int
    seconds: float
    code: str  # "OK", or the status code's name of an error the callers record
    answer: Any = None


@dataclass
class Calls:
    """The calls that ended in a window of ``seconds``; ``started`` of them began in it (more
    than ended: calls still open)."""

    calls: List[Call]
    seconds: float
    started: int = 0

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def rate(self) -> float:
        """Calls that ended per second."""
        return len(self.calls) / self.seconds if self.seconds > 0 else 0.0

    @property
    def latencies(self) -> List[float]:
        return [c.seconds for c in self.calls]

    @property
    def answers(self) -> List[Any]:
        return [c.answer for c in self.calls if c.code == "OK"]

    @property
    def codes(self) -> Counter:
        return Counter(c.code for c in self.calls)

    def percentiles(self) -> Dict[str, Optional[float]]:
        return percentiles(self.latencies)

    def callers_p50_ms(self) -> List[float]:
        """Each caller's p50, ms, sorted."""
        mine: Dict[int, List[float]] = {}
        for c in self.calls:
            mine.setdefault(c.caller, []).append(c.seconds)
        return sorted(median(v) * 1000.0 for v in mine.values())

    def mean_of(self, attribute: str) -> Optional[float]:
        """The mean of ``answer.timing.<attribute>`` over the answers (a server-side figure)."""
        values = [getattr(a.timing, attribute) for a in self.answers]
        return sum(values) / len(values) if values else None


def error_code(exc: BaseException) -> str:
    """A camserve or gRPC error's status code name; the exception's type name otherwise."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return getattr(code, "name", None) or type(exc).__name__


class Callers:
    """``callers`` threads, each calling ``call(i)`` back to back (``pause`` seconds apart)
    until ``stop()``, ``calls_each`` calls, or the caller's ``until(answer)`` says so. An
    exception of a type in ``errors`` is recorded by its ``error_code``; any other stops that
    caller and is raised again by ``take`` or ``stop``. A context manager: starts on
    entry, stops on exit."""

    def __init__(self, call: Callable[[int], Any], callers: int, *, pause: float = 0.0,
                 calls_each: Optional[int] = None, errors: tuple = (),
                 until: Optional[Callable[[Any], bool]] = None) -> None:
        self._call, self._pause, self._each = call, pause, calls_each
        self._errors, self._until = errors, until
        self._lock = threading.Lock()
        self._done: List[Call] = []
        self._started = 0
        self._failures: List[BaseException] = []
        self._stop = threading.Event()
        self._since = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(callers)]

    def start(self) -> Callers:
        self._since = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __enter__(self) -> Callers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set() and (self._each is None or n < self._each):
            with self._lock:
                self._started += 1
            started = time.perf_counter()
            try:
                answer, code = self._call(i), "OK"
            except self._errors as exc:
                answer, code = exc, error_code(exc)
            except BaseException as exc:
                with self._lock:
                    self._failures.append(exc)
                return
            with self._lock:
                self._done.append(Call(i, time.perf_counter() - started, code, answer))
            n += 1
            if self._until is not None and self._until(answer):
                return
            if self._pause:
                self._stop.wait(self._pause)

    def take(self) -> Calls:
        """The calls that ended since the last ``take`` (or the start)."""
        with self._lock:
            if self._failures:
                raise self._failures[0]
            now = time.perf_counter()
            out = Calls(self._done, now - self._since, self._started)
            self._done, self._started, self._since = [], 0, now
            return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait (at most ``timeout`` seconds) for every caller to end by itself; whether all
        did."""
        ends = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if ends is None else max(0.0, ends - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self, timeout: float = 120.0) -> Calls:
        """Tell every caller to stop after its call, wait (at most ``timeout``); ``take()``."""
        self._stop.set()
        self.wait(timeout)
        return self.take()


def closed_loop(call: Callable[[int], Any], callers: int, seconds: float,
                warmup: float = 0.0, **options: Any) -> Calls:
    """``callers`` threads call ``call(i)`` back to back: ``warmup`` seconds unmeasured, then
    the calls that end in the next ``seconds``."""
    with Callers(call, callers, **options) as running:
        time.sleep(warmup)
        running.take()
        time.sleep(seconds)
        return running.take()


async def closed_loop_async(call: Callable[[Any], Any], clients: Sequence[Any], seconds: float,
                            warmup: float = 0.0) -> Calls:
    """One asyncio caller per client awaiting ``call(client)`` back to back: ``warmup`` seconds
    unmeasured, then the calls that end in the next ``seconds``."""
    begin = time.perf_counter() + warmup
    end = begin + seconds
    done: List[Call] = []
    started = [0]

    async def caller(i: int, client: Any) -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            started[0] += t0 >= begin
            answer = await call(client)
            t1 = time.perf_counter()
            if begin <= t1 <= end:
                done.append(Call(i, t1 - t0, "OK", answer))

    await asyncio.gather(*(caller(i, c) for i, c in enumerate(clients)))
    return Calls(done, seconds, started[0])


# --- in process ------------------------------------------------------------------------------


def settings(model: str = DEFAULT_MODEL, weights: Optional[str] = "default", **more: Any):
    """The server's settings for ``model`` (weights as the ``Server`` gets them)."""
    from camserve_server.process.settings import Settings

    weights = default_weights(model) if weights == "default" else weights
    more.setdefault("http_port", None)  # no HTTP unless asked
    return Settings(model=model, weights=weights, **more)


def load_model(model: str = DEFAULT_MODEL, weights: Optional[str] = "default", device=None,
               **more: Any):
    """The model as the server loads it (weights as the ``Server`` gets them; ``more``: the
    spec's other fields, e.g. ``fold_batchnorm=False``), on ``device`` (default: the server's
    choice). The one place the benchmarks name what ``load_model`` takes."""
    from camserve_server.engine import models
    from camserve_server.engine.spec import ModelSpec

    weights = default_weights(model) if weights == "default" else weights
    return models.load_model(ModelSpec(source=model, weights=weights, **more), device)


def time_batches(fn: Callable[[], Any], batch: int, seconds: float, warmup: float = 0.0,
                 sync: Callable[[], Any] = lambda: None) -> Dict[str, Any]:
    """Run ``fn`` (one batch of ``batch`` images) for ``seconds`` after ``warmup`` (at least
    once, and at least 2 timed runs); ``sync`` after each (CUDA). Images/s and each batch's
    seconds."""
    fn()
    sync()
    warm_until = time.perf_counter() + warmup
    while time.perf_counter() < warm_until:
        fn()
    sync()
    latencies: List[float] = []
    started = time.perf_counter()
    while len(latencies) < 2 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        latencies.append(time.perf_counter() - t0)
    return {"images_per_s": batch * len(latencies) / (time.perf_counter() - started),
            "latencies": latencies}


class InProcess:
    """camserve's engine in this process: the in-process baseline. The same photo decoded
    once; the torch thread count of a one-process server (every usable core); loaded and run on
    a thread of its own, as the server's batcher worker runs it (torch's OpenMP threads belong
    to the thread that calls them: see bench_threads.py). ``run_here(fn)`` runs anything else
    (a reference implementation) on that thread too."""

    def __init__(self, model: str = DEFAULT_MODEL, image: Optional[bytes] = None,
                 weights: Optional[str] = "default") -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.run_here(self._load, model, image or photo(), weights)

    def run_here(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._thread.submit(fn, *args).result()

    def _load(self, model: str, image: bytes, weights: Optional[str]) -> None:
        from camserve_server.process.server import openmp_defaults, torch_threads

        openmp_defaults()  # as the server has them (before torch loads)
        import torch

        from camserve_server.domain import ExplainSpec, WorkItem
        from camserve_server.engine.engine import Engine
        from camserve_server.render import images

        self.model, self.weights = model, weights
        torch.set_num_threads(torch_threads(settings(model, weights)))
        self.served = load_model(model, weights)
        self.pixels = images.prepare(image, self.served.card.input_size,
                                     images.Limits(1 << 30, 1 << 30)).pixels
        self.engine = Engine(self.served)
        self.layer = self.served.card.default_layer
        spec = ExplainSpec(layers=(self.layer,))
        self.items = {"Predict": WorkItem(self.pixels), "Explain": WorkItem(self.pixels, spec)}
        for item in self.items.values():  # warm up both shapes
            for size in (1, BATCH, BATCH):
                self.engine.run([item] * size)

    def one(self, rpc: str, calls: int) -> List[float]:
        """Seconds of each of ``calls`` single-image runs (``rpc``: Predict or Explain)."""
        def timed() -> List[float]:
            out = []
            for _ in range(calls):
                started = time.perf_counter()
                self.engine.run([self.items[rpc]])
                out.append(time.perf_counter() - started)
            return out
        return self.run_here(timed)

    def batches(self, rpc: str, seconds: float, warmup: float = 0.0) -> Dict[str, Any]:
        """``time_batches`` at batch 8."""
        return self.run_here(time_batches, lambda: self.engine.run([self.items[rpc]] * BATCH),
                             BATCH, seconds, warmup)

    def rate(self, rpc: str, seconds: float) -> float:
        """Images/s at batch 8."""
        return self.batches(rpc, seconds)["images_per_s"]

    def close(self) -> None:
        self.run_here(self.engine.close)
        self._thread.shutdown()
