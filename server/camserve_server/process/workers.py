"""``--workers N``: N server processes on one port, supervised by the process that was started.

The supervisor (this module's :func:`supervise`, run by ``camserve-server`` when N > 1) starts
no gRPC server and loads no model (it imports torch only when ``--workers auto`` counts GPUs);
its workers are fresh interpreters, never forks of it. It:

- chooses the port: it binds it without SO_REUSEPORT first, so a port that anything listens
  on, even another group of SO_REUSEPORT servers, is refused (exit status 2) instead of being
  silently shared; then it keeps a SO_REUSEPORT socket bound there, never listening (the kernel
  sends it no connection), so that no one takes the port while its workers start or restart.
  It prints ``camserve-server listening on HOST:PORT`` once, as a single process does;
- starts N workers, each a fresh interpreter (``python -m camserve_server`` with the same flags
  and ``--worker-index 1..N``): a normal server that binds the same port with SO_REUSEPORT and
  has its own model replica, batcher and torch threads (cores / N unless --torch-threads). The
  kernel spreads *connections* over the workers. When all serve, it prints ``camserve-server
  serving MODEL on HOST:PORT``;
- kills a worker that hangs: each worker's event loop writes a byte to its own pipe every
  HEARTBEAT_S (0.5 s); a serving worker silent for --worker-hang-s (stopped by SIGSTOP, or
  its loop stuck) is killed with SIGKILL, which closes its listening socket and its
  connections (their calls fail UNAVAILABLE, and new connections go to the other workers), and
  is restarted like a worker that died. A hang while a worker loads is not watched;
- restarts a worker that dies, after a backoff that doubles with each death in a row (0.5 s to
  30 s; a worker that served for a minute starts again from 0.5 s). A worker that exits with
  status 2 before it served (StartupError: bad model, bad flags, busy port...) stops the whole
  server with status 2: restarting would fail the same way;
- on SIGTERM or SIGINT, sends SIGTERM to every worker (each drains its calls within
  --grace-s, as a single process does), waits for them, kills any still alive after grace + 10
  s, and exits 0; a second signal meanwhile is passed on (each worker then stops at once) and
  the exit status is 130. Workers ignore SIGINT, which Ctrl-C sends to the whole group;
- serves /metrics (``--metrics-port``) for all workers together: the workers write their
  numbers to a fresh folder (PROMETHEUS_MULTIPROC_DIR), removed at exit.

A worker dies with its supervisor: the kernel sends it SIGTERM (PR_SET_PDEATHSIG) when the
supervisor goes, however it goes, and it drains and exits. Its log lines start with
``worker I:``; the supervisor logs ``worker I started (pid P)`` for each start.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Optional, Sequence, Tuple

from .metrics import SupervisorMetrics
from .settings import Settings

log = logging.getLogger("camserve_server.workers")

BACKOFF_S = 0.5  # the first restart's delay; doubled for each death in a row
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a worker that served this long starts its backoff over
KILL_MARGIN_S = 10.0  # on shut-down, workers alive after grace + this are killed
FATAL_GRACE_S = 5.0  # after a start-up failure, the other workers get this long
STARTUP_FAILED = 2  # a worker's exit status for StartupError (and for bad flags)
SUPERVISOR_PID = "_CAMSERVE_SUPERVISOR_PID"  # in a worker's environment
HEARTBEAT_FD = "_CAMSERVE_HEARTBEAT_FD"  # in a worker's environment: the pipe it beats on

SERVING = "camserve-server serving "  # the lines a server prints on stdout
LISTENING = "camserve-server listening on "
METRICS = "camserve-server metrics on "
HTTP = "camserve-server http on "
INTERRUPTED = 130  # stopped at once by a second signal


# --- the supervisor ------------------------------------------------------------------------

def supervise(settings: Settings, argv: Sequence[str], stop: threading.Event,
              now: Optional[threading.Event] = None) -> int:
    """Run ``settings.workers`` worker processes until ``stop`` is set (by SIGTERM/SIGINT);
    the exit status: 0, or 2 when the port or a worker's start-up failed. ``now`` (a second
    signal) while they drain stops them at once: the status is then 130."""
    return Supervisor(settings, argv, now).run(stop)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        self.serving_since: Optional[float] = None  # since it said it serves (this start)
        self.deaths = 0  # in a row, for the backoff
        self.restart_at = 0.0


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str],
                 now: Optional[threading.Event] = None) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.now = now if now is not None else threading.Event()
        self.workers = [_Worker(i) for i in range(1, settings.workers + 1)]
        self.port = 0
        self.http_port: Optional[int] = None  # --http-port, chosen and held here for the workers
        self.folder = ""
        self.metrics: Optional[SupervisorMetrics] = None
        self._events: queue.Queue = queue.Queue()  # (index, pid) of a worker that serves
        self._beats: Dict[int, float] = {}  # pid -> when its heartbeat was last heard

    def run(self, stop: threading.Event) -> int:
        s = self.settings
        try:
            keeper, self.port = reserve_port(s.host, s.port)
        except OSError as exc:
            print(f"camserve-server: cannot listen on {s.host}:{s.port}: {exc.strerror or exc}"
                  "; pass another --port, or stop the server that holds it", file=sys.stderr)
            return STARTUP_FAILED
        http_keeper = None
        if s.http_port is not None:
            try:
                http_keeper, self.http_port = reserve_port(s.host, s.http_port)
            except OSError as exc:
                keeper.close()
                print(f"camserve-server: cannot serve HTTP on {s.host}:{s.http_port}: "
                      f"{exc.strerror or exc}; pass another --http-port (or --http-port off)",
                      file=sys.stderr)
                return STARTUP_FAILED
        self.folder = tempfile.mkdtemp(prefix="camserve-metrics-")
        self.metrics = SupervisorMetrics(self.folder, s.workers)
        try:
            print(f"{LISTENING}{s.host}:{self.port}", flush=True)
            if self.http_port is not None:
                print(f"{HTTP}{s.host}:{self.http_port}", flush=True)
            if s.metrics_port is not None:
                try:
                    metrics_port = self.metrics.serve(s)
                except OSError as exc:
                    print(f"camserve-server: cannot serve metrics on {s.metrics_address}:"
                          f"{s.metrics_port}: {exc.strerror or exc}", file=sys.stderr)
                    return STARTUP_FAILED
                log.info("metrics of all workers on http://%s:%d/metrics", s.metrics_address,
                         metrics_port)
                print(f"{METRICS}{s.metrics_address}:{metrics_port}", flush=True)
            log.info("starting %d workers on port %d (%s)", s.workers, self.port, s.model)
            for worker in self.workers:
                self._start(worker)
            status = self._supervise(stop)
            if status == 0:
                log.info("signal received: draining %d workers (grace %.0fs)", s.workers,
                         s.grace_s)
                self._stop_all(s.grace_s)
                if self.now.is_set():
                    return INTERRUPTED
            else:
                self._stop_all(min(s.grace_s, FATAL_GRACE_S))
            return status
        finally:
            self._stop_all(0)  # only if something above raised: kill what is left
            self.metrics.close()
            keeper.close()
            if http_keeper is not None:
                http_keeper.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _supervise(self, stop: threading.Event) -> int:
        announced = False
        while not stop.is_set():
            self._note_serving()
            now = time.monotonic()
            for worker in self.workers:
                if worker.process is not None:
                    status = worker.process.poll()
                    if status is not None and self._exited(worker, status, now):
                        return STARTUP_FAILED
                    if status is None:
                        self._check_heartbeat(worker, now)
                elif now >= worker.restart_at:
                    self._start(worker)
            if not announced and all(w.serving_since is not None for w in self.workers):
                announced = True
                s = self.settings
                log.info("all %d workers serve", s.workers)
                print(f"{SERVING}{s.model} on {s.host}:{self.port}", flush=True)
            stop.wait(0.1)
        return 0

    def _start(self, worker: _Worker) -> None:
        s = self.settings
        flags = ["--port", str(self.port), "--workers", str(s.workers),
                 "--worker-index", str(worker.index)]
        http = {}
        if self.http_port is not None:  # each worker shares it, as the gRPC port
            flags += ["--http-port", str(self.http_port)]
            http = {"CAMSERVE_HTTP_PORT": str(self.http_port)}
        # The environment says the same as the flags, so that a flag equal to its default
        # (which the environment would otherwise override) still holds.
        env = dict(os.environ, CAMSERVE_PORT=str(self.port), CAMSERVE_WORKERS=str(s.workers),
                   CAMSERVE_WORKER_INDEX=str(worker.index), PROMETHEUS_MULTIPROC_DIR=self.folder,
                   **http, **{SUPERVISOR_PID: str(os.getpid())})
        beats, beat = os.pipe()
        env[HEARTBEAT_FD] = str(beat)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "camserve_server", *self.argv, *flags],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
                pass_fds=(beat,))
        except BaseException:
            os.close(beats)
            raise
        finally:
            os.close(beat)
        log.info("worker %d started (pid %d)%s", worker.index, process.pid,
                 f"; restart {worker.starts}" if worker.starts else "")
        worker.process, worker.serving_since = process, None
        worker.starts += 1
        self.metrics.started(worker.index)
        threading.Thread(target=self._read, args=(worker.index, process),
                         name=f"camserve-worker-{worker.index}-stdout", daemon=True).start()
        threading.Thread(target=self._listen, args=(process.pid, beats),
                         name=f"camserve-worker-{worker.index}-heartbeat", daemon=True).start()

    def _listen(self, pid: int, beats: int) -> None:
        """A worker's heartbeat pipe, until the worker's end closes (it exited)."""
        try:
            while os.read(beats, 512):
                self._beats[pid] = time.monotonic()
        finally:
            os.close(beats)
            self._beats.pop(pid, None)

    def _check_heartbeat(self, worker: _Worker, now: float) -> None:
        """Kill a serving worker whose heartbeat has been silent for --worker-hang-s; it is
        then restarted as one that died."""
        hang_s = self.settings.worker_hang_s
        if not hang_s or worker.serving_since is None:
            return
        silent = now - max(worker.serving_since, self._beats.get(worker.process.pid, 0.0))
        if silent > hang_s:
            log.error("worker %d (pid %d) has not beaten its heartbeat for %.1f s (stopped, or "
                      "its event loop is stuck): killing it", worker.index, worker.process.pid,
                      silent)
            worker.process.kill()

    def _read(self, index: int, process: subprocess.Popen) -> None:
        """A worker's stdout: its serving line becomes an event; the lines the supervisor
        prints itself are swallowed; anything else is passed on."""
        for line in process.stdout:
            if line.startswith(SERVING):
                self._events.put((index, process.pid))
            elif not line.startswith((LISTENING, METRICS)):
                sys.stdout.write(line)
                sys.stdout.flush()
        process.stdout.close()

    def _note_serving(self) -> None:
        while True:
            try:
                index, pid = self._events.get_nowait()
            except queue.Empty:
                return
            worker = self.workers[index - 1]
            if worker.process is not None and worker.process.pid == pid:
                worker.serving_since = time.monotonic()
                log.info("worker %d serves (pid %d)", index, pid)

    def _exited(self, worker: _Worker, status: int, now: float) -> bool:
        """A worker's process ended on its own: plan its restart; True if it failed to start
        (the whole server must stop)."""
        self._note_serving()  # a serving line read just before it died
        pid, served = worker.process.pid, worker.serving_since
        worker.process, worker.serving_since = None, None
        if status == STARTUP_FAILED and served is None:
            self.metrics.exited(worker.index, pid, restarting=False)
            log.error("worker %d (pid %d) failed to start (exit status %d): stopping the "
                      "server", worker.index, pid, status)
            print(f"camserve-server: worker {worker.index} failed to start (its error is "
                  "above); stopping", file=sys.stderr, flush=True)
            return True
        self.metrics.exited(worker.index, pid, restarting=True)
        if served is not None and now - served >= STABLE_S:
            worker.deaths = 0
        worker.deaths += 1
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (worker.deaths - 1))
        worker.restart_at = now + delay
        log.error("worker %d (pid %d) %s; restarting it in %.1f s", worker.index, pid,
                  describe(status), delay)
        return False

    def _stop_all(self, grace: float) -> None:
        """SIGTERM to every worker still running; kill those alive after grace + a margin."""
        running = [w for w in self.workers if w.process is not None]
        for worker in running:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + (KILL_MARGIN_S if grace else 0.0)
        hurried = False
        for worker in running:
            process = worker.process
            try:
                while True:
                    if self.now.is_set() and not hurried:  # a second signal: pass it on
                        hurried = True
                        deadline = min(deadline, time.monotonic() + KILL_MARGIN_S)
                        for other in running:
                            if other.process is not None and other.process.poll() is None:
                                other.process.send_signal(signal.SIGTERM)
                    try:
                        status = process.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= deadline:
                            raise
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) still runs %.0f s after SIGTERM: killing it",
                            worker.index, process.pid, grace + KILL_MARGIN_S)
                process.kill()
                status = process.wait()
            log.info("worker %d (pid %d) %s", worker.index, process.pid, describe(status))
            self.metrics.exited(worker.index, process.pid, restarting=False)
            worker.process = None


def describe(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def reserve_port(host: str, port: int) -> Tuple[socket.socket, int]:
    """Check that nothing listens on ``host:port`` and hold it for the workers: a SO_REUSEPORT
    socket bound there, never listening. Port 0 picks a free port. Raises OSError."""
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    keeper = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as gRPC sets it: connections of an earlier server in TIME_WAIT do not
        # count, a socket that listens (with or without SO_REUSEPORT) does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        chosen = probe.getsockname()[1]
        keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        keeper.bind((address[0], chosen, *address[2:]))  # beside the probe: neither listens
    except BaseException:
        keeper.close()
        raise
    finally:
        probe.close()
    return keeper, chosen


# --- a worker ------------------------------------------------------------------------------

def become_worker(settings: Settings) -> Settings:
    """Set up this process as the supervisor's worker ``settings.worker_index``: it dies with
    the supervisor, tags its log lines, and takes its own GPU when there are several."""
    _die_with_supervisor()
    # Ctrl-C reaches the whole process group: the supervisor alone counts it, and passes
    # each signal on as SIGTERM (the first drains, the second stops at once).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tag = f"worker {settings.worker_index}: "
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tag(tag))
    if settings.device in ("auto", "cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if gpus > 1:
            settings = settings.replace(device=f"cuda:{(settings.worker_index - 1) % gpus}")
    return settings


def heartbeat():
    """In a worker: the callable that beats its heartbeat once (a byte on the pipe the
    supervisor gave it; never blocks), or None outside a supervisor."""
    fd = int(os.environ.pop(HEARTBEAT_FD, "") or -1)
    if fd < 0:
        return None
    os.set_blocking(fd, False)

    def beat() -> None:
        try:
            os.write(fd, b".")
        except (BlockingIOError, BrokenPipeError):
            pass  # a full pipe has beats enough; a closed one has no supervisor to hear them

    return beat


class _Tag(logging.Filter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_camserve_tagged", False):
            record.msg = self.tag + str(record.msg)
            record._camserve_tagged = True
        return True


def _die_with_supervisor() -> None:
    """SIGTERM to this process when the supervisor exits (however it exits)."""
    supervisor = int(os.environ.get(SUPERVISOR_PID) or 0)
    if not supervisor:
        return
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:  # elsewhere: notice that this process was handed to another parent
        threading.Thread(target=_watch_parent, args=(supervisor,), name="camserve-parent",
                         daemon=True).start()
    elif os.getppid() != supervisor:  # it went before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(supervisor: int) -> None:
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)

