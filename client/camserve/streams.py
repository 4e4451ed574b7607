"""Client side of streams: frames in, results with frame ids out (shared by Client and
AsyncClient)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from . import _calls, reasons
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
    the frames of this stream that the server skipped (policy "latest"; 0 with "all") between
    the previous answer's frame and this one, so the answers' ``skipped`` add up, with the
    answers themselves, to the frames sent.
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
        raise invalid(f"policy must be 'all' or 'latest', not {policy!r}",
                      reasons.UNKNOWN_POLICY) from None


class Tracker:
    """Frames sent and not answered yet, in order: send times for latencies, images for
    overlays. Builds the stream's messages: a config first (the policy and the stream's
    options), then frames, with a config before any frame whose options differ from the
    previous frame's. Each distinct set of options is checked and converted once.
    Thread-safe (gRPC reads requests on its own thread)."""

    def __init__(self, kind: str, options: Mapping[str, Any], policy: str,
                 model: Optional[pb.ModelRef] = None) -> None:
        self._kind = kind
        self._model = model  # the stream's model, named in every config (None: the default)
        self._options = dict(options)
        self._policy = policy_value(policy)
        self._configs: dict = {}  # options key -> options message
        self._current: Optional[tuple] = None  # the options key the server has now
        self._sent: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._count = 0
        self.error: Optional[CamserveError] = None  # a frame this side could not send
        self._options_message(self._options)  # refuse bad options before anything is sent

    def _options_message(self, options: Mapping[str, Any]):
        key = tuple(sorted((name, repr(value)) for name, value in options.items()))
        if key not in self._configs:
            if self._kind == "predict":
                if set(options) - {"top_k"}:
                    raise invalid(f"stream_predict frames take only top_k, not "
                                  f"{sorted(set(options) - {'top_k'})}",
                                  reasons.UNKNOWN_OPTION)
                self._configs[key] = _calls.predict_options(options.get("top_k", 5))
            else:
                self._configs[key] = _calls.explain_options(**options)
        return key, self._configs[key]

    def _config(self, options_message, first: bool):
        policy = self._policy if first else pb.STREAM_POLICY_UNSPECIFIED
        if self._kind == "predict":
            return pb.StreamPredictRequest(config=pb.StreamPredictConfig(
                policy=policy, options=options_message, model=self._model))
        return pb.StreamExplainRequest(config=pb.StreamExplainConfig(
            policy=policy, options=options_message, model=self._model))

    def messages(self, item: Any) -> list:
        """The messages for the next frame: a config when its options change, then the frame
        (records it as sent)."""
        frame = item if isinstance(item, Frame) else Frame(item)
        frame_id = frame.frame_id if frame.frame_id is not None else self._count
        key, options = self._options_message({**self._options, **frame.options})
        out = []
        if key != self._current:
            out.append(self._config(options, first=self._current is None))
            self._current = key
        stream_frame = pb.StreamFrame(frame_id=frame_id, image=to_proto(frame.image))
        out.append(pb.StreamPredictRequest(frame=stream_frame) if self._kind == "predict"
                   else pb.StreamExplainRequest(frame=stream_frame))
        with self._lock:
            self._sent[frame_id] = (time.perf_counter(), frame.image)
            self._count += 1
        return out

    def requests(self, frames):
        try:
            for item in frames:
                yield from self.messages(item)
        except CamserveError as exc:  # raised to the caller once the answers are in
            self.error = exc

    async def arequests(self, frames):
        try:
            if hasattr(frames, "__aiter__"):
                async for item in frames:
                    for message in self.messages(item):
                        yield message
            else:
                for item in frames:
                    for message in self.messages(item):
                        yield message
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
            error, value = CamserveError.from_status(answer.error), None
        elif self._kind == "predict":
            r = answer.result
            value = Prediction.from_proto(r.prediction, r.image_size, r.timing, r.embedding)
        else:
            value = Explanation.from_proto(answer.result, image)
        return StreamResult(answer.frame_id, answer.skipped, value, error,
                            (now - sent_at) * 1000.0)
