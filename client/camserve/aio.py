"""The asyncio client (grpc.aio): the same calls as :class:`camserve.Client`, awaitable."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterable, List, Optional, Sequence, Union

import grpc
from grpc import aio

from . import _calls
from .errors import CamserveError
from .results import Explanation, ModelInfo, ModelStatus, Prediction
from .streams import StreamResult, Tracker
from .v1 import camserve_pb2 as pb
from .v1 import camserve_pb2_grpc as pb_grpc

_UNSET = object()


class AsyncClient:
    """An asyncio connection to a camserve server (or several replicas); use ``async with``
    or ``await close()``. Takes the same arguments as :class:`camserve.Client` (targets,
    balancing and retries, token, metadata, TLS).

    Safe to use from many tasks of one event loop. Every call takes ``timeout``,
    ``metadata`` and ``request_id`` and raises :class:`CamserveError` on failure.
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
        self._channel = _calls.channel(aio, _calls.resolve_target(target), tls,
                                       root_certificates, client_cert, client_key,
                                       max_message_bytes, retries, options)
        self._stub = pb_grpc.CamserveServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _meta(self, metadata, request_id) -> tuple:
        return _calls.call_metadata(self._token, (*self._metadata, *(metadata or ())),
                                    request_id)

    async def _call(self, method, request, timeout, metadata=None, request_id=None):
        _calls.check_size(request, self._max_message_bytes)
        try:
            return await method(request, timeout=self.timeout if timeout is _UNSET else timeout,
                                metadata=self._meta(metadata, request_id))
        except grpc.RpcError as error:
            raise CamserveError.from_rpc_error(error, self.target) from None

    async def model_info(self, *, model: _calls.Model = None, version: int = 0,
                         timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                         request_id: Optional[str] = None) -> ModelInfo:
        """As Client.model_info."""
        request = pb.GetModelInfoRequest(model=_calls.model_ref(model, version))
        return ModelInfo.from_proto(await self._call(
            self._stub.GetModelInfo, request, timeout, metadata, request_id))

    async def models(self, *, ready: bool = False, timeout: Any = _UNSET,
                     metadata: _calls.Metadata = None,
                     request_id: Optional[str] = None) -> List[ModelStatus]:
        """As Client.models."""
        answer = await self._call(self._stub.ListModels, pb.ListModelsRequest(ready=ready),
                                  timeout, metadata, request_id)
        return [ModelStatus.from_proto(m) for m in answer.models]

    async def load_model(self, name: str, *, wait: bool = True, timeout: Any = _UNSET,
                         metadata: _calls.Metadata = None,
                         request_id: Optional[str] = None) -> List[ModelStatus]:
        """As Client.load_model."""
        answer = await self._call(self._stub.LoadModel,
                                  pb.LoadModelRequest(name=name, no_wait=not wait), timeout,
                                  metadata, request_id)
        return [ModelStatus.from_proto(m) for m in answer.models]

    async def unload_model(self, name: str, *, version: int = 0, timeout: Any = _UNSET,
                           metadata: _calls.Metadata = None,
                           request_id: Optional[str] = None) -> List[ModelStatus]:
        """As Client.unload_model."""
        answer = await self._call(self._stub.UnloadModel,
                                  pb.UnloadModelRequest(name=name, version=version), timeout,
                                  metadata, request_id)
        return [ModelStatus.from_proto(m) for m in answer.models]

    async def health(self, service: str = "", *, timeout: Any = _UNSET,
                     metadata: _calls.Metadata = None, request_id: Optional[str] = None) -> str:
        """As Client.health."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        answer = await self._call(health_pb2_grpc.HealthStub(self._channel).Check,
                                  health_pb2.HealthCheckRequest(service=service), timeout,
                                  metadata, request_id)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    async def wait_until_ready(self, timeout: float = 60.0) -> ModelInfo:
        """As Client.wait_until_ready."""
        deadline = time.monotonic() + timeout
        state = "unreachable"
        while True:
            try:
                info = await self.model_info(
                    timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if info.state == "serving":
                    return info
                state = info.state
            except CamserveError as exc:
                if not _calls.retry_while_starting(exc) or time.monotonic() >= deadline:
                    raise
            if time.monotonic() >= deadline:
                raise _calls.not_ready(self.target, state, timeout)
            await asyncio.sleep(0.1)

    async def predict(self, image: Any, *, top_k: int = 5, model: _calls.Model = None,
                      version: int = 0, timeout: Any = _UNSET,
                      metadata: _calls.Metadata = None,
                      request_id: Optional[str] = None) -> Prediction:
        """As Client.predict."""
        return (await self.predict_many([image], top_k=top_k, model=model, version=version,
                                        timeout=timeout, metadata=metadata,
                                        request_id=request_id))[0]

    async def predict_many(self, images: Iterable[Any], *, top_k: int = 5,
                           model: _calls.Model = None, version: int = 0, priority: int = 0,
                           timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                           request_id: Optional[str] = None) -> List[Prediction]:
        """As Client.predict_many."""
        request = _calls.predict_request(list(images), top_k, _calls.model_ref(model, version),
                                         priority)
        return _calls.predictions(await self._call(self._stub.Predict, request, timeout,
                                                   metadata, request_id))

    async def explain(self, image: Any, *, target: _calls.Target = None,
                      method: Union[str, Sequence[str]] = "gradcam",
                      layer: Union[None, str, Sequence[str]] = None,
                      outputs: Iterable[str] = ("raw",), top_k: int = 5,
                      model: _calls.Model = None, version: int = 0,
                      timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                      request_id: Optional[str] = None, **options) -> Explanation:
        """As Client.explain."""
        return (await self.explain_many([image], target=target, method=method, layer=layer,
                                        outputs=outputs, top_k=top_k, model=model,
                                        version=version, timeout=timeout,
                                        metadata=metadata, request_id=request_id,
                                        **options))[0]

    async def explain_many(self, images: Iterable[Any], *, target: _calls.Target = None,
                           method: Union[str, Sequence[str]] = "gradcam",
                           layer: Union[None, str, Sequence[str]] = None,
                           outputs: Iterable[str] = ("raw",), top_k: int = 5,
                           model: _calls.Model = None, version: int = 0, priority: int = 0,
                           timeout: Any = _UNSET, metadata: _calls.Metadata = None,
                           request_id: Optional[str] = None, **options) -> List[Explanation]:
        """As Client.explain_many."""
        images = list(images)
        request = _calls.explain_request(images, _calls.model_ref(model, version), priority,
                                         target=target, method=method, layer=layer,
                                         outputs=outputs, top_k=top_k, **options)
        return _calls.explanations(await self._call(self._stub.Explain, request, timeout,
                                                    metadata, request_id), images)

    def stream_predict(self, frames, *, top_k: int = 5, policy: str = "all",
                       model: _calls.Model = None, version: int = 0,
                       timeout: Optional[float] = None, metadata: _calls.Metadata = None,
                       request_id: Optional[str] = None) -> AsyncIterator[StreamResult]:
        """As Client.stream_predict; ``frames`` may be an iterable or an async iterable."""
        tracker = Tracker("predict", {"top_k": top_k}, policy, _calls.model_ref(model, version))
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

    async def _stream(self, method, tracker: Tracker, frames, timeout, metadata):
        call = method(tracker.arequests(frames), timeout=timeout, metadata=metadata)
        try:
            async for answer in call:
                yield tracker.result(answer)
        except grpc.RpcError as error:
            raise CamserveError.from_rpc_error(error, self.target) from None
        finally:
            call.cancel()
        if tracker.error is not None:
            raise tracker.error
