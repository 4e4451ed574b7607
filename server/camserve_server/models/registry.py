"""The models a server serves, by name and version, while it serves: loading in the background,
unloading by draining, routing each call to its version, and the bounds on what may be loaded.

States of a version: LOADING (its calls answer UNAVAILABLE with a retry hint) → READY →
UNLOADING (calls already accepted finish, new ones are refused) → UNLOADED; or FAILED, with the
error, after a load that could not finish (every other model serves meanwhile). A model's calls
that name no version go to its newest READY version.

Thread-safe: the event loop routes calls while loader threads change the table (one lock).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from camserve.v1 import camserve_pb2 as pb

from ..api.pipeline import Pipeline
from ..errors import FailedPrecondition, NotFound, ResourceExhausted, StartupError, Unavailable
from .config import ModelConfig, Repository, check_name
from .runtime import ModelRuntime, Shared, load_runtime

log = logging.getLogger(__name__)

LOADING_RETRY_S = 2.0  # the retry hint while a version loads
MiB = 1 << 20


@dataclass
class Version:
    """One version's row in the table."""

    name: str
    version: int
    state: int = pb.MODEL_STATE_UNLOADED
    error: str = ""
    runtime: Optional[ModelRuntime] = None
    calls: int = 0  # calls using it now (unloading waits for them)
    source: str = ""
    drained: threading.Event = field(default_factory=threading.Event)


class Registry:
    """Every known version, and the loads and unloads in progress."""

    def __init__(self, repository: Repository, shared: Shared, default: str, *,
                 max_bytes: int = 0, drain_s: float = 10.0,
                 on_default: Callable[[bool], None] = lambda ready: None,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.repository = repository
        self.default = default
        self._shared = shared
        self._max_bytes = max_bytes
        self._drain_s = drain_s
        self._on_default = on_default
        self._on_change = on_change  # told after every change of a version's state
        self._lock = threading.RLock()
        self._table: Dict[Tuple[str, int], Version] = {}
        self._loading: Dict[str, Future] = {}  # model name → its load in progress
        self._stopping = False

    # --- routing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, ref: Optional[pb.ModelRef], field_name: str = "model") -> Iterator[Pipeline]:
        """The pipeline of the version a call names (empty: the default model, newest ready
        version), held for the call: an unload waits until it is given back."""
        row = self._resolve(ref, field_name)
        try:
            yield row.runtime.pipeline
        finally:
            with self._lock:
                row.calls -= 1
                if row.calls == 0 and row.state == pb.MODEL_STATE_UNLOADING:
                    row.drained.set()

    def _resolve(self, ref: Optional[pb.ModelRef], field_name: str) -> Version:
        name = (ref.name if ref is not None else "") or self.default
        version = ref.version if ref is not None else 0
        with self._lock:
            rows = self._rows(name)
            if not rows:
                check_name(name, f"{field_name}.name")
                if name in self._names():
                    raise NotFound(f"model {name!r} is not loaded; {self._servedwords()}",
                                   field=f"{field_name}.name", reason="MODEL_NOT_LOADED")
                raise NotFound(f"model {name!r} is not served here; {self._servedwords()}",
                               field=f"{field_name}.name", reason="UNKNOWN_MODEL")
            if version:
                row = next((r for r in rows if r.version == version), None)
                if row is None:
                    raise NotFound(f"model {name!r} has no version {version}; it has "
                                   f"{_versionswords(rows)}", field=f"{field_name}.version",
                                   reason="UNKNOWN_VERSION")
            else:
                ready = [r for r in rows if r.state == pb.MODEL_STATE_READY]
                row = ready[-1] if ready else rows[-1]
            self._refuse_unless_ready(row, field_name)
            row.calls += 1
            return row

    def _refuse_unless_ready(self, row: Version, field_name: str) -> None:
        what = f"model {row.name!r} version {row.version}"
        if row.state == pb.MODEL_STATE_READY and row.runtime is not None:
            return
        if row.state == pb.MODEL_STATE_LOADING:
            raise Unavailable(f"{what} is still loading; retry in {LOADING_RETRY_S:g} s "
                              "(ListModels says when it is ready)",
                              retry_after_s=LOADING_RETRY_S, reason="MODEL_LOADING")
        if row.state == pb.MODEL_STATE_FAILED:
            raise FailedPrecondition(f"{what} failed to load: {row.error}",
                                     field=f"{field_name}.name", reason="MODEL_FAILED")
        if row.state == pb.MODEL_STATE_UNLOADING:
            raise Unavailable(f"{what} is being unloaded; {self._servedwords()}",
                              reason="MODEL_UNLOADING")
        raise NotFound(f"{what} is not loaded; {self._servedwords()}",
                       field=f"{field_name}.name", reason="MODEL_NOT_LOADED")

    def _rows(self, name: str) -> List[Version]:
        return sorted((r for (n, _), r in self._table.items() if n == name),
                      key=lambda r: r.version)

    def _servedwords(self) -> str:
        ready = [f"{r.name}:{r.version}" for r in self.statuses() if r.state ==
                 pb.MODEL_STATE_READY]
        return f"loaded: {', '.join(ready)}" if ready else "no model is loaded"

    # --- the table ---------------------------------------------------------------------------

    def statuses(self, ready_only: bool = False) -> List[pb.ModelStatus]:
        """Every version the server knows (loaded, loading, failed or unloaded), by name and
        version; the models of the repository not loaded at all as version 0 UNLOADED."""
        with self._lock:
            rows = sorted(self._table.values(), key=lambda r: (r.name, r.version))
            known = {r.name for r in rows}
            statuses = [pb.ModelStatus(name=r.name, version=r.version, state=r.state,
                                       error=r.error, is_default=r.name == self.default,
                                       bytes=r.runtime.bytes if r.runtime else 0,
                                       source=r.source)
                        for r in rows]
        if not ready_only:
            names = self._names()
            statuses += [pb.ModelStatus(name=n, state=pb.MODEL_STATE_UNLOADED,
                                        is_default=n == self.default)
                         for n in names if n not in known]
            statuses.sort(key=lambda s: (s.name, s.version))
        return [s for s in statuses if not ready_only or s.state == pb.MODEL_STATE_READY]

    def _names(self) -> List[str]:
        try:
            return self.repository.names()
        except OSError:  # the folder went away: what is loaded still serves
            return []

    def of(self, name: str) -> List[pb.ModelStatus]:
        return [s for s in self.statuses() if s.name == name]

    def runtimes(self) -> List[ModelRuntime]:
        with self._lock:
            return [r.runtime for r in self._table.values() if r.runtime is not None]

    def depth(self, level: Optional[int] = None) -> int:
        """Items waiting in every model's queue (at ``level`` only, when given)."""
        return sum(r.batcher.depth(level) for r in self.runtimes())

    # --- loading -----------------------------------------------------------------------------

    def load(self, name: str) -> Future:
        """Load (or reload) a model's versions, as its policy says, on a thread of its own;
        the future's result is the model's statuses, its exception the load's error. Versions
        the policy no longer serves are unloaded once the new ones are ready."""
        check_name(name)
        try:
            config = self.repository.config(name)  # NotFound, or ValueError for a bad config
        except ValueError as exc:
            with self._lock:  # ListModels shows it, as version 0
                self._table[(name, 0)] = Version(name, 0, pb.MODEL_STATE_FAILED, str(exc))
            raise FailedPrecondition(f"model {name!r} cannot be loaded: {exc}", field="name",
                                     reason="BAD_MODEL_CONFIG") from None
        with self._lock:
            self._table.pop((name, 0), None)
            if self._stopping:
                raise Unavailable("the server is shutting down", reason="DRAINING")
            running = self._loading.get(name)
            if running is not None and not running.done():
                return running
            future: Future = Future()
            self._loading[name] = future
            # Rows appear at once, so that ListModels and calls see LOADING.
            for version in config.served():
                row = self._table.setdefault((name, version), Version(name, version))
                if row.state != pb.MODEL_STATE_READY:
                    row.state, row.error, row.source = pb.MODEL_STATE_LOADING, "", \
                        config.spec.source
        threading.Thread(target=self._load, args=(config, future),
                         name=f"camserve-load-{name}", daemon=True).start()
        return future

    def load_now(self, name: str) -> List[pb.ModelStatus]:
        """Load on this thread (start-up): its statuses, or raises the load's error."""
        return self.load(name).result()

    def _load(self, config: ModelConfig, future: Future) -> None:
        name = config.name
        try:
            import torch

            # The loader computes on one core (its probes), beside the models serving;
            # torch's thread count is per thread, and each batcher worker sets its own.
            torch.set_num_threads(1)
            versions = config.served()
            if not versions:
                raise StartupError(f"model {name!r} has no version folder its policy serves "
                                   f"(folders: {list(config.on_disk()) or 'none'}): add "
                                   f"{config.folder}/1/{config.weights or ''}")
            with self._lock:
                fresh = [v for v in versions
                         if self._table[(name, v)].state != pb.MODEL_STATE_READY]
            for version in fresh:
                self._load_version(config, version)
            # The policy's old versions go once the new ones serve.
            with self._lock:
                old = [r.version for (n, _), r in self._table.items()
                       if n == name and r.version not in versions and r.runtime is not None]
            for version in old:
                self._unload_version(name, version)
            future.set_result(self.of(name))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller and ListModels
            future.set_exception(exc)
        finally:
            with self._lock:
                if self._loading.get(name) is future:
                    del self._loading[name]
            self._on_change()

    def _load_version(self, config: ModelConfig, version: int) -> None:
        name = config.name
        row = self._table[(name, version)]
        try:
            missing = config.weights_file(version)
            if missing is not None and not missing.is_file():
                raise StartupError(f"the weights file {missing} does not exist")
            self._check_room(name, missing.stat().st_size if missing is not None else 0,
                             "its weights file", estimate=True)
            runtime = load_runtime(config, version, self._shared,
                                   on_worker=lambda alive: self._worker_changed(row, alive),
                                   stopping=lambda: self._stopping)
            try:
                self._check_room(name, runtime.bytes, "its parameters and buffers")
            except ResourceExhausted:
                runtime.stop(0)
                raise
        except BaseException as exc:
            with self._lock:
                row.state, row.error = pb.MODEL_STATE_FAILED, words(exc)
            log.error("model %s v%d failed to load: %s", name, version, row.error)
            raise
        with self._lock:
            row.runtime, row.state, row.error = runtime, pb.MODEL_STATE_READY, ""
            row.drained.clear()
        log.info("model %s v%d ready (%.0f MiB)", name, version, runtime.bytes / MiB)
        if name == self.default:
            self._on_default(True)

    def _check_room(self, name: str, size: int, what: str, estimate: bool = False) -> None:
        """Refuse a load that would take the loaded models past --max-models-bytes (the model's
        own versions not counted: a reload replaces them). An ``estimate`` (the weights file's
        size, before loading) refuses only beside other models: alone, the loaded size
        decides."""
        if not self._max_bytes:
            return
        with self._lock:
            others = [(r.name, r.version, r.runtime.bytes) for r in self._table.values()
                      if r.runtime is not None and r.name != name]
        used = sum(b for _, _, b in others)
        if used + size > self._max_bytes and (others or not estimate):
            loaded = ", ".join(f"{n}:{v} {_size(b)}" for n, v, b in others) or "nothing"
            raise ResourceExhausted(
                f"model {name!r} does not fit: {what} take {_size(size)} and the models "
                f"loaded take {_size(used)} of --max-models-bytes {_size(self._max_bytes)} "
                f"(loaded: {loaded}); unload one first", reason="MODELS_FULL")

    def _worker_changed(self, row: Version, alive: bool) -> None:
        if row.runtime is not None:
            row.runtime.alive = alive
        if row.name == self.default and row.state == pb.MODEL_STATE_READY:
            self._on_default(alive)

    # --- unloading ---------------------------------------------------------------------------

    def unload(self, name: str, version: int = 0) -> Future:
        """Unload a model's versions (0: all) on a thread of its own: refuse new calls, let those
        accepted finish (within the drain time), stop its batcher, free it."""
        check_name(name)
        with self._lock:
            rows = [r for r in self._rows(name) if r.runtime is not None or
                    r.state == pb.MODEL_STATE_LOADING]
            if not rows:
                raise NotFound(f"model {name!r} is not loaded; {self._servedwords()}",
                               field="name", reason="MODEL_NOT_LOADED")
            if version:
                rows = [r for r in rows if r.version == version]
                if not rows:
                    raise NotFound(f"model {name!r} has no version {version} loaded",
                                   field="version", reason="UNKNOWN_VERSION")
            ready_after = [r for r in self._table.values()
                           if r.state == pb.MODEL_STATE_READY and r not in rows]
            if not ready_after:
                raise FailedPrecondition(
                    f"{name}{':' + str(version) if version else ''} is the last model loaded: "
                    "a server keeps one; load another first", field="name",
                    reason="LAST_MODEL")
            if name == self.default and not [r for r in ready_after if r.name == name]:
                raise FailedPrecondition(
                    f"{name!r} is the default model (calls that name none go to it); it "
                    "cannot be unloaded while the server serves", field="name",
                    reason="DEFAULT_MODEL")
            for r in rows:
                if r.state == pb.MODEL_STATE_READY:
                    r.state = pb.MODEL_STATE_UNLOADING
                    if r.calls == 0:
                        r.drained.set()
        future: Future = Future()

        def run() -> None:
            try:
                for r in rows:
                    self._unload_version(name, r.version)
                future.set_result(self.of(name))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
            self._on_change()

        threading.Thread(target=run, name=f"camserve-unload-{name}", daemon=True).start()
        return future

    def _unload_version(self, name: str, version: int) -> None:
        with self._lock:
            row = self._table[(name, version)]
            runtime = row.runtime
            if runtime is None:
                row.state = pb.MODEL_STATE_UNLOADED
                return
            row.state = pb.MODEL_STATE_UNLOADING
            if row.calls == 0:
                row.drained.set()
        if not row.drained.wait(self._drain_s):
            log.warning("model %s v%d: %d calls still running after %.0fs; unloading anyway",
                        name, version, row.calls, self._drain_s)
        started = time.monotonic()
        runtime.stop(timeout=self._drain_s)
        with self._lock:
            row.runtime, row.state = None, pb.MODEL_STATE_UNLOADED
        del runtime
        log.info("model %s v%d unloaded in %.1fs", name, version, time.monotonic() - started)

    # --- polling -----------------------------------------------------------------------------

    def poll(self) -> None:
        """--model-control poll: load the versions the policies now serve (a new version folder,
        a new model) and unload those they no longer do, model by model."""
        for name in self.repository.names():
            try:
                config = self.repository.config(name)
            except (ValueError, NotFound) as exc:
                log.warning("model %s: %s", name, words(exc))
                continue
            with self._lock:
                loaded = {r.version for (n, _), r in self._table.items()
                          if n == name and r.state in (pb.MODEL_STATE_READY,
                                                       pb.MODEL_STATE_LOADING)}
                failed = {r.version for (n, _), r in self._table.items()
                          if n == name and r.state == pb.MODEL_STATE_FAILED}
            wanted = set(config.served())
            if wanted and (wanted - loaded - failed or loaded - wanted):
                log.info("model %s: serving versions %s (were %s)", name, sorted(wanted),
                         sorted(loaded))
                self.load(name)

    # --- shutting down -----------------------------------------------------------------------

    def stop(self, timeout: float) -> None:
        """Stop every runtime (the server has stopped its calls first)."""
        with self._lock:
            self._stopping = True
            rows = [r for r in self._table.values() if r.runtime is not None]
        for r in rows:
            r.runtime.stop(timeout)


def _versionswords(rows: List[Version]) -> str:
    return "version " + ", ".join(str(r.version) for r in rows) if rows else "no versions"


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def words(exc: BaseException) -> str:
    """An exception as ListModels and LoadModel report it."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text if isinstance(exc, (StartupError, ValueError, ResourceExhausted)) or hasattr(
        exc, "message") else f"{type(exc).__name__}: {text}"
