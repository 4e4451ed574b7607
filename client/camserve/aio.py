"""The asyncio client (grpc.aio): the same calls as :class:`camserve.Client`, awaitable."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterable, List, Optional, Sequence, Union

import grpc
from grpc import aio

from . import _calls
from .errors import CamserveError
from .results import Explanation, ModelInfo, Prediction
from .streams import StreamResult, Tracker
from .v1 import camserve_pb2 as pb
from .v1 import camserve_pb2_grpc as pb_grpc

_UNSET = object()


class AsyncClient:
    """An asyncio connection to a camserve server; use ``async with`` or ``await close()``.

    Safe to use from many tasks of one event loop. Every call takes ``timeout`` and raises
    :class:`CamserveError` on failure.
    """

    def __init__(self, target: str = _calls.DEFAULT_TARGET, *, timeout: Optional[float] = 30.0,
                 token: Optional[str] = None, tls: bool = False, root_certificates=None,
                 client_cert=None, client_key=None,
                 max_message_bytes: int = _calls.DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple] = ()) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _calls.call_metadata(token)
        self._channel = _calls.channel(aio, target, tls, root_certificates, client_cert,
                                      client_key, max_message_bytes, options)
        self._stub = pb_grpc.CamserveStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=self.timeout if timeout is _UNSET else timeout,
                                metadata=self._metadata)
        except grpc.RpcError as error:
            raise CamserveError.from_rpc_error(error) from None

    async def model_info(self, *, timeout: Any = _UNSET) -> ModelInfo:
        return ModelInfo.from_proto(
            await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    async def wait_until_ready(self, timeout: float = 60.0) -> ModelInfo:
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
                raise CamserveError(grpc.StatusCode.UNAVAILABLE,
                                    f"the server is still {state} after {timeout:g} s")
            await asyncio.sleep(0.1)

    async def predict(self, image: Any, *, top_k: int = 5, timeout: Any = _UNSET) -> Prediction:
        return (await self.predict_many([image], top_k=top_k, timeout=timeout))[0]

    async def predict_many(self, images: Iterable[Any], *, top_k: int = 5,
                           timeout: Any = _UNSET) -> List[Prediction]:
        request = _calls.predict_request(list(images), top_k)
        return _calls.predictions(await self._call(self._stub.Predict, request, timeout))

    async def explain(self, image: Any, *, target: _calls.Target = None,
                      method: Union[str, Sequence[str]] = "gradcam",
                      layer: Union[None, str, Sequence[str]] = None,
                      outputs: Iterable[str] = ("raw",), top_k: int = 5,
                      timeout: Any = _UNSET, **options) -> Explanation:
        """As Client.explain."""
        return (await self.explain_many([image], target=target, method=method, layer=layer,
                                        outputs=outputs, top_k=top_k, timeout=timeout,
                                        **options))[0]

    async def explain_many(self, images: Iterable[Any], *, target: _calls.Target = None,
                           method: Union[str, Sequence[str]] = "gradcam",
                           layer: Union[None, str, Sequence[str]] = None,
                           outputs: Iterable[str] = ("raw",), top_k: int = 5,
                           timeout: Any = _UNSET, **options) -> List[Explanation]:
        """As Client.explain_many."""
        images = list(images)
        request = _calls.explain_request(images, target=target, method=method, layer=layer,
                                         outputs=outputs, top_k=top_k, **options)
        return _calls.explanations(await self._call(self._stub.Explain, request, timeout),
                                   images)

    def stream_predict(self, frames, *, top_k: int = 5, policy: str = "all",
                       timeout: Optional[float] = None) -> AsyncIterator[StreamResult]:
        """As Client.stream_predict; ``frames`` may be an iterable or an async iterable."""
        return self._stream(self._stub.StreamPredict, Tracker("predict", {"top_k": top_k},
                                                              policy), frames, timeout)

    def stream_explain(self, frames, *, target: _calls.Target = None,
                       method: Union[str, Sequence[str]] = "gradcam",
                       layer: Union[None, str, Sequence[str]] = None,
                       outputs: Iterable[str] = ("raw",), top_k: int = 5, policy: str = "all",
                       timeout: Optional[float] = None, **options):
        """Explanations for a stream of frames; as stream_predict, with explain's options."""
        options = dict(options, target=target, method=method, layer=layer,
                       outputs=tuple(outputs), top_k=top_k)
        return self._stream(self._stub.StreamExplain, Tracker("explain", options, policy),
                            frames, timeout)

    async def _stream(self, method, tracker: Tracker, frames, timeout):
        call = method(tracker.arequests(frames), timeout=timeout, metadata=self._metadata)
        try:
            async for answer in call:
                yield tracker.result(answer)
        except grpc.RpcError as error:
            raise CamserveError.from_rpc_error(error) from None
        finally:
            call.cancel()
        if tracker.error is not None:
            raise tracker.error
