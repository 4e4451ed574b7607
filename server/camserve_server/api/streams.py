"""Streams: the frames of a bidirectional call go through the same batcher as unary calls and
are answered in frame order.

A reader thread takes frames off the call, validates and decodes each one and submits it to the
batcher; the handler thread waits for the frames in order and yields their answers.

- Policy ALL: every frame is answered. At most ``max_in_flight`` frames of the stream are
  queued or running; beyond that the reader stops reading, so gRPC flow control pushes back on
  a sender that is too fast.
- Policy LATEST: when a frame arrives while the stream's previous frame is still queued, that
  frame is withdrawn (skipped) before it costs compute, so at most one frame per stream waits.
  The next answer says how many frames were skipped since the previous one; the last frame is
  always answered.

A bad frame is answered with an error and the stream goes on. When the caller goes away, the
stream's queued frames are withdrawn at once.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterator, Optional

from ..batching.batcher import Batcher, Outcome, Ticket
from ..domain import WorkItem
from ..errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)

ALL = "all"  # the other policy is "latest"


@dataclass(frozen=True)
class Frame:
    """A parsed frame: the work for the engine and how to turn its outcome into a result."""

    work: WorkItem
    finish: Callable[[Outcome], Any]


@dataclass
class _Entry:
    frame_id: int
    ticket: Optional[Ticket] = None  # None when the frame failed before the batcher
    error: Optional[ServiceError] = None
    finish: Optional[Callable[[Outcome], Any]] = None


_END = _Entry(frame_id=-1)


class StreamSession:
    """One stream. ``answers()`` is the response iterator the handler returns."""

    def __init__(self, requests: Iterator, batcher: Batcher, *,
                 parse: Callable[[Any], Frame], policy_of: Callable[[Any], Optional[str]],
                 answer: Callable[..., Any], max_in_flight: int,
                 deadline: Optional[float] = None) -> None:
        self._requests = requests
        self._batcher = batcher
        self._parse = parse
        self._policy_of = policy_of
        self._answer = answer
        self._max_in_flight = max_in_flight
        self._deadline = deadline
        self._entries: Deque[_Entry] = deque()
        self._changed = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._latest: Optional[Ticket] = None  # LATEST: the stream's newest submitted frame
        self._outstanding: set = set()  # tickets submitted and not yet answered
        self.policy: Optional[str] = None
        self.frames = 0

    # --- the reader thread ---------------------------------------------------------------

    def _read(self) -> None:
        try:
            for request in self._requests:
                if self._closed:
                    break
                self.frames += 1
                self._push(self._submit(request))
        except Exception as exc:  # the call ended under us (cancelled, deadline, disconnect)
            log.debug("stream input ended: %s", exc)
        finally:
            self._push(_END)

    def _submit(self, request) -> _Entry:
        entry = _Entry(request.frame_id)
        try:
            policy = self._policy_of(request)
            if self.policy is None:
                self.policy = policy or ALL
            elif policy not in (None, self.policy):
                raise InvalidArgument(f"this stream's policy is {self.policy.upper()}; set the "
                                      "policy on the first frame only")
            frame = self._parse(request)
        except ServiceError as exc:
            entry.error = exc
            return entry
        if self.policy == ALL:
            if not self._acquire():
                entry.error = InvalidArgument("the stream was closed")
                return entry
        elif self._latest is not None:
            self._latest.withdraw("skipped")  # counted by the batcher when it drops it
        try:
            entry.ticket = self._batcher.submit(frame.work, self._deadline)
        except ServiceError as exc:
            self._release()
            entry.error = exc
            return entry
        entry.finish = frame.finish
        with self._changed:
            self._latest = entry.ticket
            self._outstanding.add(entry.ticket)
        return entry

    def _acquire(self) -> bool:
        """Wait for a free in-flight slot (ALL); False when the stream closed meanwhile."""
        with self._changed:
            while self._in_flight >= self._max_in_flight and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            self._in_flight += 1
            return True

    def _release(self) -> None:
        if self.policy != ALL:
            return
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def _push(self, entry: _Entry) -> None:
        with self._changed:
            self._entries.append(entry)
            self._changed.notify_all()

    # --- the handler thread --------------------------------------------------------------

    def _next(self) -> _Entry:
        with self._changed:
            while not self._entries:
                self._changed.wait()
            return self._entries.popleft()

    def answers(self) -> Iterator[Any]:
        reader = threading.Thread(target=self._read, name="camserve-stream-reader", daemon=True)
        reader.start()
        skipped = 0
        try:
            while True:
                entry = self._next()
                if entry is _END:
                    return
                if entry.ticket is None:
                    yield self._answer(entry.frame_id, skipped, error=entry.error)
                    skipped = 0
                    continue
                try:
                    outcome = entry.ticket.result()
                except CancelledError:
                    self._forget(entry.ticket)
                    if entry.ticket.reason != "skipped":
                        return  # the caller went away
                    skipped += 1
                    continue
                except ServiceError as exc:
                    self._forget(entry.ticket)
                    self._release()
                    yield self._answer(entry.frame_id, skipped, error=exc)
                    skipped = 0
                    continue
                self._forget(entry.ticket)
                self._release()
                yield self._answer(entry.frame_id, skipped, result=entry.finish(outcome))
                skipped = 0
        finally:
            self.close()

    def _forget(self, ticket: Ticket) -> None:
        with self._changed:
            self._outstanding.discard(ticket)

    def close(self) -> None:
        """Withdraw every queued frame and stop reading (the caller went away, or we are done)."""
        with self._changed:
            self._closed = True
            tickets = list(self._outstanding)
            self._outstanding.clear()
            self._changed.notify_all()
        for ticket in tickets:
            ticket.withdraw("cancelled")
