"""Client side of streams: frames in, results with frame ids out (shared by Client and
AsyncClient)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import grpc

from . import _calls
from .errors import CamserveError, invalid
from .images import to_proto
from .results import Explanation, Prediction
from .v1 import camserve_pb2 as pb

POLICIES = {"all": pb.STREAM_POLICY_ALL, "latest": pb.STREAM_POLICY_LATEST}


@dataclass(frozen=True)
class Frame:
    """A frame with its own id and/or options. Plain images get ids 0, 1, 2, ... and the
    stream's options; ``options`` overrides any of the stream's options (top_k; for
    explanations target, method, layer, outputs and the advanced ones) for this frame only."""

    image: Any
    frame_id: Optional[int] = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamResult:
    """The answer for one frame.

    ``result`` is a Prediction (stream_predict) or an Explanation (stream_explain), or None
    when the frame failed; ``error`` then says why (the stream goes on). ``skipped`` counts
    the frames the server skipped (policy "latest") since the previous answer.
    ``latency_ms`` runs from handing the frame to gRPC to receiving its answer.
    """

    frame_id: int
    skipped: int
    result: Optional[Union[Prediction, Explanation]]
    error: Optional[CamserveError]
    latency_ms: float

    @property
    def ok(self) -> bool:
        return self.error is None


def policy_value(policy: str) -> int:
    try:
        return POLICIES[policy.lower()]
    except (KeyError, AttributeError):
        raise invalid(f"policy must be 'all' or 'latest', not {policy!r}") from None


class Tracker:
    """Frames sent and not answered yet, in order: send times for latencies, images for
    overlays. Thread-safe (gRPC reads requests on its own thread)."""

    def __init__(self, kind: str, options: Mapping[str, Any], policy: str) -> None:
        if kind == "explain":
            _calls.explain_fields(**options)  # refuse bad options before anything is sent
        self._kind = kind
        self._options = dict(options)
        self._policy = policy_value(policy)
        self._sent: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._count = 0
        self.error: Optional[CamserveError] = None  # a frame this side could not send

    def request(self, item: Any):
        """The request message for the next frame (records it as sent)."""
        frame = item if isinstance(item, Frame) else Frame(item)
        frame_id = frame.frame_id if frame.frame_id is not None else self._count
        policy = self._policy if self._count == 0 else pb.STREAM_POLICY_UNSPECIFIED
        options = {**self._options, **frame.options}
        if self._kind == "predict":
            if set(options) - {"top_k"}:
                raise invalid(f"stream_predict frames take only top_k, not "
                              f"{sorted(set(options) - {'top_k'})}")
            message = pb.StreamPredictRequest(
                frame_id=frame_id, image=to_proto(frame.image),
                top_k=_calls.check_top_k(options.get("top_k", 5)), policy=policy)
        else:
            message = pb.StreamExplainRequest(frame_id=frame_id, image=to_proto(frame.image),
                                              policy=policy, **_calls.explain_fields(**options))
        with self._lock:
            self._sent[frame_id] = (time.perf_counter(), frame.image)
            self._count += 1
        return message

    def requests(self, frames):
        try:
            for item in frames:
                yield self.request(item)
        except CamserveError as exc:  # raised to the caller once the answers are in
            self.error = exc

    async def arequests(self, frames):
        try:
            if hasattr(frames, "__aiter__"):
                async for item in frames:
                    yield self.request(item)
            else:
                for item in frames:
                    yield self.request(item)
        except CamserveError as exc:
            self.error = exc

    def result(self, answer) -> StreamResult:
        """The StreamResult for one answer; frames sent before it and never answered were
        skipped."""
        now = time.perf_counter()
        with self._lock:
            sent_at, image = now, None
            while self._sent:
                frame_id, (t, img) = self._sent.popitem(last=False)
                if frame_id == answer.frame_id:
                    sent_at, image = t, img
                    break
        error = None
        if answer.WhichOneof("outcome") == "error":
            code = next((c for c in grpc.StatusCode if c.value[0] == answer.error.code),
                        grpc.StatusCode.UNKNOWN)
            error, value = CamserveError(code, answer.error.message), None
        elif self._kind == "predict":
            r = answer.result
            value = Prediction.from_proto(r.prediction, r.image_size, r.timing)
        else:
            value = Explanation.from_proto(answer.result, image)
        return StreamResult(answer.frame_id, answer.skipped, value, error,
                            (now - sent_at) * 1000.0)
