"""Streams: the frames of a bidirectional call go through the same batcher as unary calls and
are answered in frame order. No thread of its own: a reader task takes messages off the call,
validates, decodes and submits each frame; ``answers()`` yields the answers in order.

What one stream may hold is bounded: every frame holds one of ``max_in_flight`` slots from
the moment it is read (whether it is valid or not) until its answer is written or it is
skipped.

- Policy ALL: every frame is answered. With every slot held, the reader stops reading, so
  gRPC flow control pushes back on a sender that is too fast (or a caller that does not read).
- Policy LATEST: the reader never waits for the server. A frame still queued when a newer one
  arrives is withdrawn (skipped) before it costs compute, and when every slot is held the
  oldest answers not yet written are dropped (skipped) too, so a caller that does not read
  its answers costs the server a few frames, not memory. Each answer's ``skipped`` counts
  the frames read between the previous answer's frame and its own that got no answer; the
  last frame is always answered.

A bad frame is answered with an error and the stream goes on; so is every frame after a bad
config, until a good one (a message that is not a request at all ends the stream with
INVALID_ARGUMENT). A stream that sends no frame
within ``idle_s`` of opening is ended with DEADLINE_EXCEEDED. When the caller goes away, the
stream's queued frames are withdrawn at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Optional

from ..batching.batcher import Batcher, Ticket
from ..batching.levels import STREAM
from ..domain import WorkItem
from ..errors import DeadlineExceeded, InvalidArgument, ServiceError
from .calls import CALLER, Call, Malformed
from .request import stream_policy

log = logging.getLogger(__name__)

ALL, LATEST = "all", "latest"


@dataclass(frozen=True)
class Prepared:
    """A decoded frame: the work for the engine, and how to turn its outcome into a result."""

    work: WorkItem
    finish: Callable[[Any], Awaitable[Any]]
    batcher: Batcher  # the batcher of the frame's model
    level: int = STREAM  # its queue level (the config's priority)


@dataclass
class _Entry:
    frame_id: int
    seq: int  # the frame's place in the stream: 0 for the first frame read
    ticket: Optional[Ticket] = None  # None when the frame failed before the batcher
    error: Optional[ServiceError] = None
    finish: Optional[Callable[[Any], Awaitable[Any]]] = None
    dropped: bool = False  # skipped after it was read (LATEST)


@dataclass
class Tally:
    """The frames every stream holds together (read, not yet answered or skipped): a
    metric (camserve_stream_frames_held), bounded by max_streams x max_in_flight."""

    frames: int = 0


@dataclass
class _End:
    error: Optional[ServiceError] = None  # why the stream ends early; None: the caller closed


async def settled(ticket: Ticket) -> None:
    """Wait until a batcher ticket is done, in the event loop, without taking its outcome
    (a withdrawn ticket is cancelled; awaiting it must not look like our own cancellation)."""
    if ticket.done():
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_) -> None:
        loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    ticket.add_done_callback(wake)
    await waiter


class StreamSession:
    """One stream. ``configure(config message) -> options`` validates a config;
    ``prepare(frame, options) -> Prepared`` decodes a frame; ``answer(frame_id, skipped,
    result=None, error=None)`` builds an answer message."""

    def __init__(self, requests: AsyncIterator, *,
                 configure: Callable[[Any], Any],
                 default_options: Any,
                 prepare: Callable[[Any, Any], Awaitable[Prepared]],
                 answer: Callable[..., Any], max_in_flight: int, idle_s: float,
                 deadline: Optional[float], frames: Call, tally: Tally) -> None:
        self._requests = requests
        self._caller = CALLER.get()  # who the stream's frames are from (the queue's turns)
        self._configure = configure
        self._prepare = prepare
        self._answer = answer
        self._max = max_in_flight
        self._idle_s = idle_s
        self._deadline = deadline
        self._frames = frames
        self._options = default_options
        self._config_error: Optional[ServiceError] = None  # the last config's, if it was bad
        self.policy: Optional[str] = None
        self._entries: Deque[Any] = deque()  # _Entry, then an _End
        self._changed = asyncio.Event()  # set when entries or slots change
        self._tally = tally
        self._count = 0  # frames read and not yet answered or skipped (_held)
        self._read_frames = 0  # frames read so far: the next frame's seq
        self._answered = -1  # the seq of the last frame answered
        self._queued: Optional[_Entry] = None  # LATEST: the newest submitted frame

    @property
    def _held(self) -> int:
        return self._count

    @_held.setter
    def _held(self, value: int) -> None:
        self._tally.frames += value - self._count
        self._count = value

    # --- the reader task -----------------------------------------------------------------

    async def _read(self) -> None:
        end = _End()
        try:
            await self._read_messages()
        except ServiceError as exc:
            end = _End(exc)
        except Exception as exc:  # the call ended under us (cancelled, deadline, disconnect)
            log.debug("stream input ended: %s", exc)
        self._push(end)

    async def _read_messages(self) -> None:
        requests = self._requests.__aiter__()
        while True:
            if self.policy != LATEST:
                await self._slot()
            try:
                message = await requests.__anext__()
            except StopAsyncIteration:
                return
            if isinstance(message, Malformed):
                raise message.error
            which = message.WhichOneof("content")
            if which == "config":
                self._apply(message.config)
                continue
            if which != "frame":
                raise InvalidArgument("a stream message is empty: set config or frame",
                                      reason="MALFORMED_REQUEST")
            if self.policy is None:
                self.policy = ALL
            self._frames.items += 1
            entry = await self._submit(message.frame, self._read_frames)
            self._read_frames += 1
            if self.policy == LATEST:
                self._make_room()
                if self._held >= self._max:
                    await self._slot()
            self._held += 1
            self._push(entry)

    def _apply(self, config) -> None:
        """Take a config; a bad one fails the frames after it, until the next config."""
        try:
            policy = stream_policy(config.policy)
            if self.policy is None:
                self.policy = policy or ALL
            elif policy not in (None, self.policy):
                raise InvalidArgument(f"this stream's policy is {self.policy.upper()}; only "
                                      "the first message may set it", field="config.policy",
                                      reason="POLICY_CHANGED")
            self._options, self._config_error = self._configure(config), None
        except ServiceError as exc:
            self._config_error = exc

    async def _submit(self, frame, seq: int) -> _Entry:
        entry = _Entry(frame.frame_id, seq)
        if self._config_error is not None:
            entry.error = self._config_error
            return entry
        try:
            prepared = await self._prepare(frame, self._options)
            entry.ticket = prepared.batcher.submit(prepared.work, self._deadline,
                                                  prepared.level, self._caller)
        except ServiceError as exc:
            entry.error = exc
            return entry
        entry.finish = prepared.finish
        if self.policy == LATEST:
            previous, self._queued = self._queued, entry
            if previous is not None and previous.ticket.withdraw("skipped"):
                self._drop(previous)
        return entry

    def _make_room(self) -> None:
        """LATEST: drop the oldest answers not yet written until a slot is free."""
        for entry in list(self._entries):
            if self._held < self._max:
                return
            if isinstance(entry, _Entry) and (entry.ticket is None or entry.ticket.done()):
                self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        if entry.dropped:
            return
        entry.dropped = True
        try:
            self._entries.remove(entry)
        except ValueError:
            return  # not pushed yet (it is the entry being submitted): never counted
        self._held -= 1
        self._changed.set()

    async def _slot(self) -> None:
        while self._held >= self._max:
            self._changed.clear()
            await self._changed.wait()

    def _push(self, item) -> None:
        self._entries.append(item)
        self._changed.set()

    # --- the handler's side --------------------------------------------------------------

    async def _head(self):
        while not self._entries:
            self._changed.clear()
            await self._changed.wait()
        return self._entries[0]

    async def answers(self) -> AsyncIterator[Any]:
        reader = asyncio.ensure_future(self._read())
        idle = asyncio.get_running_loop().call_later(self._idle_s, self._idle)
        try:
            while True:
                entry = await self._head()
                if isinstance(entry, _End):
                    if entry.error is not None:
                        raise entry.error
                    return
                idle.cancel()
                if entry.ticket is not None:
                    await settled(entry.ticket)
                if entry.dropped:
                    continue
                self._entries.popleft()
                if entry is self._queued:
                    self._queued = None
                answer = await self._outcome(entry)
                if answer is not None:
                    yield answer
                self._held -= 1
                self._changed.set()
        finally:
            idle.cancel()
            reader.cancel()
            self.close()

    async def _outcome(self, entry: _Entry):
        """The answer for a settled entry (None when its ticket was withdrawn). It counts
        as skipped the frames between the previous answer's and this one."""
        ticket = entry.ticket
        if ticket is not None and ticket.cancelled():
            return None
        skipped, self._answered = entry.seq - self._answered - 1, entry.seq
        if ticket is None:
            return self._answer(entry.frame_id, skipped, error=entry.error)
        error = ticket.exception()
        if error is not None:
            return self._answer(entry.frame_id, skipped, error=error)
        return self._answer(entry.frame_id, skipped, result=await entry.finish(ticket.result()))

    def _idle(self) -> None:
        if self._frames.items == 0:
            self._entries.appendleft(_End(DeadlineExceeded(
                f"no frame arrived within {self._idle_s:g} s of opening the stream "
                "(stream_idle_s): open a stream when you have frames to send",
                reason="STREAM_IDLE")))
            self._changed.set()

    def close(self) -> None:
        """Withdraw every queued frame (the caller went away, or the stream ended)."""
        for entry in self._entries:
            if isinstance(entry, _Entry) and entry.ticket is not None:
                entry.ticket.withdraw("cancelled")
        self._entries.clear()
        self._held = 0
