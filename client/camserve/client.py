"""The blocking client."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import grpc

from . import _calls, reasons
from .errors import CamserveError, invalid
from .images import to_proto
from .methods import method_value
from .results import Comparison, Explanation, ModelInfo, ModelStatus, Prediction, SanityReport
from .streams import StreamResult, Tracker
from .v1 import camserve_pb2 as pb
from .v1 import camserve_pb2_grpc as pb_grpc

_UNSET = object()


class Client:
    """A connection to one camserve server, or to several replicas.

    ``target``: ``host[:port]`` (the port defaults to 50051), several comma-separated
    addresses, or a gRPC URI such as ``dns:///camserve.default.svc:50051``; calls are balanced
    round-robin over every address. Unary calls that fail with UNAVAILABLE (a replica going
    away) or RESOURCE_EXHAUSTED (a busy one; the server's retry hint sets the delay) are
    retried up to ``retries`` times within their timeout (0 turns retries off); streams are
    never retried.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call, ``metadata`` (pairs
    of lower-case key and value) too. TLS: ``tls=True`` trusts the system's CAs,
    ``root_certificates`` (PEM bytes or a path) trusts those; ``client_cert`` and
    ``client_key`` present a client certificate (mutual TLS).

    Every call takes ``timeout`` (seconds; default: the client's), ``metadata`` (added to the
    client's for that call) and ``request_id`` (sent as ``x-request-id``, which the server's
    access log shows), and raises :class:`CamserveError` on failure. One Client may be shared
    by many threads: the underlying gRPC channel is thread-safe. Use it as a context manager,
    or call ``close()``.
    """

    def __init__(self, target: str = _calls.DEFAULT_TARGET, *, timeout: Optional[float] = 30.0,
                 token: Optional[str] = None, tls: bool = False, root_certificates=None,
                 client_cert=None, client_key=None,
                 max_message_bytes: int = _calls.DEFAULT_MAX_MESSAGE_BYTES,
                 retries: int = _calls.DEFAULT_RETRIES, metadata: _calls.Metadata = (),
                 options: Sequence[tuple] = ()) -> None:
        self.target = target
        self.timeout = timeout
        self._token = token
        self._metadata = tuple(metadata)
        _calls.call_metadata(token, self._metadata)  # refuse bad metadata now
        self._max_message_bytes = max_message_bytes
        self._channel = _calls.channel(grpc, _calls.resolve_target(target), tls,
                                       root_certificates, client_cert, client_key,
                                       max_message_bytes, retries, options)
        self._stub = pb_grpc.CamserveServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _meta(self, metadata, request_id) -> tuple:
        return _calls.call_metadata(self._token, (*self._metadata, *(metadata or ())),
                                    request_id)

    def _call(self, method, request, timeout, metadata=None, request_id=None):
        _calls.check_size(request, self._max_message_bytes)
        try:
            return method(request, timeout=self.timeout if timeout is _UNSET else timeout,
                          metadata=self._meta(metadata, request_id))
        except grpc.RpcError as error:
            raise CamserveError.from_rpc_error(error, self.target) from None

    def model_info(self, *, model: _calls.Model = None, version: int = 0,
                   timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                   request_id: Optional[str] = None) -> ModelInfo:
        """A served model (``model``: "NAME" or "NAME:VERSION"; None: the default): name,
        state, labels, input size, layers, methods, batching, limits. Answers at once while the
        server loads too (state "loading", little else)."""
        request = pb.GetModelInfoRequest(model=_calls.model_ref(model, version))
        return ModelInfo.from_proto(self._call(self._stub.GetModelInfo, request, timeout,
                                               metadata, request_id))

    def models(self, *, ready: bool = False, timeout: Any = _UNSET,
               metadata: _calls.Metadata = None,
               request_id: Optional[str] = None) -> List[ModelStatus]:
        """Every version of every model the server knows, with its state (``ready``: only
        those ready), by name and version."""
        answer = self._call(self._stub.ListModels, pb.ListModelsRequest(ready=ready), timeout,
                            metadata, request_id)
        return [ModelStatus.from_proto(m) for m in answer.models]

    def load_model(self, name: str, *, wait: bool = True, timeout: Any = _UNSET,
                   metadata: _calls.Metadata = None,
                   request_id: Optional[str] = None) -> List[ModelStatus]:
        """Load (or reload) a model of the server's repository, the versions its policy names;
        returns its versions once loaded (``wait=False``: at once, LOADING). Needs a server
        with ``--model-control explicit`` and this client's token to be its admin token.
        Raises CamserveError: PERMISSION_DENIED without the admin token, NOT_FOUND for a name
        the repository lacks, FAILED_PRECONDITION for a bad config, the load's error."""
        answer = self._call(self._stub.LoadModel, pb.LoadModelRequest(name=name,
                                                                      no_wait=not wait),
                            timeout, metadata, request_id)
        return [ModelStatus.from_proto(m) for m in answer.models]

    def unload_model(self, name: str, *, version: int = 0, timeout: Any = _UNSET,
                     metadata: _calls.Metadata = None,
                     request_id: Optional[str] = None) -> List[ModelStatus]:
        """Unload a model's versions (``version``: just that one): calls already accepted
        finish first. Needs the admin token; the server's last model (and its default model)
        cannot be unloaded (FAILED_PRECONDITION)."""
        answer = self._call(self._stub.UnloadModel,
                            pb.UnloadModelRequest(name=name, version=version), timeout,
                            metadata, request_id)
        return [ModelStatus.from_proto(m) for m in answer.models]

    def compare(self, image: Any, models: Sequence[str], *, target: _calls.Target = None,
                method: Union[str, Sequence[str]] = "gradcam", outputs: Iterable[str] = ("raw",),
                top_k: int = 5, timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                request_id: Optional[str] = None, **options) -> Comparison:
        """Explain one image on two or more models ("NAME" or "NAME:VERSION" each, e.g.
        ``["resnet:1", "resnet:2"]``) for the same class (``target``; None: the first
        model's top class) and how alike their maps are (Spearman's rank correlation). The
        models must share labels. Each model explains at its own default layer."""
        refs = [_calls.model_ref(m) or pb.ModelRef() for m in models]
        request = pb.CompareExplainRequest(
            models=refs, images=[to_proto(image)], options=_calls.explain_options(
                target=target, method=method, outputs=outputs, top_k=top_k, **options))
        answer = self._call(self._stub.CompareExplain, request, timeout, metadata, request_id)
        return _calls.comparison(answer, image)

    def health(self, service: str = "", *, timeout: Any = _UNSET,
               metadata: _calls.Metadata = None, request_id: Optional[str] = None) -> str:
        """The serving status that the server's standard gRPC health service
        (grpc.health.v1.Health/Check) reports for ``service`` ("" is the whole server):
        "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN". The server answers
        NOT_SERVING while it loads its model or drains, as container probes expect. Raises
        CamserveError if the call fails (NOT_FOUND for a service the server does not know).
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        answer = self._call(health_pb2_grpc.HealthStub(self._channel).Check,
                            health_pb2.HealthCheckRequest(service=service), timeout, metadata,
                            request_id)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def wait_until_ready(self, timeout: float = 60.0) -> ModelInfo:
        """Wait until the server has loaded its model (state "serving"); returns its ModelInfo.
        Raises CamserveError (UNAVAILABLE or DEADLINE_EXCEEDED) when it is not ready in time."""
        deadline = time.monotonic() + timeout
        state = "unreachable"
        while True:
            try:
                info = self.model_info(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if info.state == "serving":
                    return info
                state = info.state
            except CamserveError as exc:
                if not _calls.retry_while_starting(exc) or time.monotonic() >= deadline:
                    raise
            if time.monotonic() >= deadline:
                raise _calls.not_ready(self.target, state, timeout)
            time.sleep(0.1)

    def predict(self, image: Any, *, top_k: int = 5, model: _calls.Model = None,
                version: int = 0, priority: int = 0, timeout: Any = _UNSET,
                metadata: _calls.Metadata = None,
                request_id: Optional[str] = None) -> Prediction:
        """Top-k classes for one image (a path, encoded bytes, uint8 array or PIL image), on
        ``model`` ("NAME" or "NAME:VERSION"; None: the server's default)."""
        return self.predict_many([image], top_k=top_k, model=model, version=version,
                                 priority=priority, timeout=timeout, metadata=metadata,
                                 request_id=request_id)[0]

    def predict_many(self, images: Iterable[Any], *, top_k: int = 5, model: _calls.Model = None,
                     version: int = 0, priority: int = 0, timeout: Any = _UNSET,
                     metadata: _calls.Metadata = None,
                     request_id: Optional[str] = None) -> List[Prediction]:
        """One RPC for several images; answers in the same order. ``priority``: the queue
        level of its images, 1 the highest (by default a unary call's) to the server's
        number of priorities (3 by default: ``model_info().priority_levels``); 0: the
        call's default."""
        request = _calls.predict_request(list(images), top_k, _calls.model_ref(model, version),
                                         priority)
        return _calls.predictions(self._call(self._stub.Predict, request, timeout, metadata,
                                             request_id))

    def explain(self, image: Any, *, target: _calls.Target = None,
                method: Union[str, Sequence[str]] = "gradcam",
                layer: Union[None, str, Sequence[str]] = None,
                outputs: Iterable[str] = ("raw",), top_k: int = 5, model: _calls.Model = None,
                version: int = 0, priority: int = 0, timeout: Any = _UNSET,
                metadata: _calls.Metadata = None,
                request_id: Optional[str] = None, **options) -> Explanation:
        """Class activation maps for one image, with its prediction.

        ``target``: a class index or label, or a list of them; None explains the top-1 class
        (``top_targets=k``: the k best). ``method`` and ``layer``: one or a list; the answer
        has a map per (method, target, layer) in ``Explanation.maps``, the first also in
        ``raw``/``heatmap``. ``outputs``: any of "raw" (maps at the layer's grid), "heatmap"
        (8-bit PNGs), "overlay_jpeg", "overlay_png" (rendered by the server at the image's
        size). ``options``: top_targets, counterfactual (negated gradients), signed (no final
        ReLU), score_cam_channels, faithfulness_steps (deletion/insertion scores). ``model``
        and ``version``: as for predict.
        """
        return self.explain_many([image], target=target, method=method, layer=layer,
                                 outputs=outputs, top_k=top_k, model=model, version=version,
                                 priority=priority, timeout=timeout,
                                 metadata=metadata, request_id=request_id, **options)[0]

    def explain_many(self, images: Iterable[Any], *, target: _calls.Target = None,
                     method: Union[str, Sequence[str]] = "gradcam",
                     layer: Union[None, str, Sequence[str]] = None,
                     outputs: Iterable[str] = ("raw",), top_k: int = 5,
                     model: _calls.Model = None, version: int = 0, priority: int = 0,
                     timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                     request_id: Optional[str] = None, **options) -> List[Explanation]:
        """One RPC for several images; answers in the same order."""
        images = list(images)
        request = _calls.explain_request(images, _calls.model_ref(model, version), priority,
                                         target=target, method=method, layer=layer,
                                         outputs=outputs, top_k=top_k, **options)
        return _calls.explanations(self._call(self._stub.Explain, request, timeout, metadata,
                                              request_id), images)

    def check_sanity(self, images: Iterable[Any], *,
                     method: Union[None, str, Sequence[str]] = None, layer: Optional[str] = None,
                     score_cam_channels: int = 0, contrast_rank: int = 0, stages: int = 0,
                     seed: int = 0, threshold: float = 0.0, model: _calls.Model = None,
                     version: int = 0, timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                     request_id: Optional[str] = None) -> SanityReport:
        """How far to trust each method's maps on the served model, measured by the server on
        these images: the parameter-randomisation check (Adebayo et al. 2018: the top of the
        model randomised in up to ``stages`` cascading stages, on a copy) and the
        class-discrimination check (each image's top class against the class at
        ``contrast_rank``, 0: the middle rank). A method passes a check when its correlation
        is below ``threshold`` (0: the server's 0.5).

        ``method``: one name or a list (None: every method the server has, the random
        baseline included). Zero means the server's default for every number. Costly: several
        explanations of every image per method, so give it a generous ``timeout``. Raises
        CamserveError: INVALID_ARGUMENT for a bad option or a check over the server's cost
        limits, RESOURCE_EXHAUSTED while another check runs on that server."""
        methods = [] if method is None else [method] if isinstance(method, str) else list(method)
        try:
            method_enums = [method_value(m) for m in methods]
        except (ValueError, AttributeError) as exc:
            raise invalid(str(exc), reasons.UNKNOWN_METHOD) from None
        numbers = {"score_cam_channels": score_cam_channels, "contrast_rank": contrast_rank,
                   "stages": stages, "seed": seed}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid(f"{name} must be a non-negative integer, got {value!r}",
                              reasons.INVALID_OPTION)
        request = pb.CheckSanityRequest(images=[to_proto(i) for i in images],
                                        methods=method_enums, layer=layer or "",
                                        threshold=float(threshold),
                                        model=_calls.model_ref(model, version), **numbers)
        return SanityReport.from_proto(self._call(self._stub.CheckSanity, request, timeout,
                                                  metadata, request_id))

    def stream_predict(self, frames: Iterable[Any], *, top_k: int = 5, policy: str = "all",
                       model: _calls.Model = None, version: int = 0,
                       timeout: Optional[float] = None, metadata: _calls.Metadata = None,
                       request_id: Optional[str] = None) -> Iterator[StreamResult]:
        """Predictions for a stream of frames (images, or camserve.Frame for ids and per-frame
        options), yielded in frame order as they arrive.

        ``policy="all"`` answers every frame (a too-fast producer is slowed by flow control);
        ``"latest"`` lets the server skip frames that a newer one overtook while they waited;
        each answer's ``skipped`` counts the frames skipped between the previous answer's frame
        and its own.
        ``timeout`` bounds the whole stream (default: none). Raises CamserveError if the stream
        itself fails; a frame that fails comes back as a StreamResult with ``error`` set.
        """
        tracker = Tracker("predict", {"top_k": top_k}, policy,
                          _calls.model_ref(model, version))
        return self._stream(self._stub.StreamPredict, tracker, frames, timeout,
                            self._meta(metadata, request_id))

    def stream_explain(self, frames, *, target: _calls.Target = None,
                       method: Union[str, Sequence[str]] = "gradcam",
                       layer: Union[None, str, Sequence[str]] = None,
                       outputs: Iterable[str] = ("raw",), top_k: int = 5, policy: str = "all",
                       model: _calls.Model = None, version: int = 0,
                       timeout: Optional[float] = None, metadata: _calls.Metadata = None,
                       request_id: Optional[str] = None, **options):
        """Explanations for a stream of frames; as stream_predict, with explain's options."""
        options = dict(options, target=target, method=method, layer=layer,
                       outputs=tuple(outputs), top_k=top_k)
        tracker = Tracker("explain", options, policy, _calls.model_ref(model, version))
        return self._stream(self._stub.StreamExplain, tracker,
                            frames, timeout, self._meta(metadata, request_id))

    def _stream(self, method, tracker: Tracker, frames, timeout,
                metadata) -> Iterator[StreamResult]:
        call = method(tracker.requests(frames), timeout=timeout, metadata=metadata)
        try:
            for answer in call:
                yield tracker.result(answer)
        except grpc.RpcError as error:
            raise CamserveError.from_rpc_error(error, self.target) from None
        finally:
            call.cancel()  # a no-op once the stream ended; frees the server if we stop early
        if tracker.error is not None:
            raise tracker.error
