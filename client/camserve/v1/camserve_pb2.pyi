from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CamMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAM_METHOD_UNSPECIFIED: _ClassVar[CamMethod]
    CAM_METHOD_GRADCAM: _ClassVar[CamMethod]
    CAM_METHOD_GRADCAM_PLUS_PLUS: _ClassVar[CamMethod]
    CAM_METHOD_XGRADCAM: _ClassVar[CamMethod]
    CAM_METHOD_LAYERCAM: _ClassVar[CamMethod]
    CAM_METHOD_HIRESCAM: _ClassVar[CamMethod]
    CAM_METHOD_EIGENCAM: _ClassVar[CamMethod]
    CAM_METHOD_SCORECAM: _ClassVar[CamMethod]
    CAM_METHOD_RANDOM: _ClassVar[CamMethod]

class ExplainOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLAIN_OUTPUT_UNSPECIFIED: _ClassVar[ExplainOutput]
    EXPLAIN_OUTPUT_RAW_MAP: _ClassVar[ExplainOutput]
    EXPLAIN_OUTPUT_HEATMAP_PNG: _ClassVar[ExplainOutput]
    EXPLAIN_OUTPUT_OVERLAY_JPEG: _ClassVar[ExplainOutput]
    EXPLAIN_OUTPUT_OVERLAY_PNG: _ClassVar[ExplainOutput]

class ServerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_STATE_UNSPECIFIED: _ClassVar[ServerState]
    SERVER_STATE_LOADING: _ClassVar[ServerState]
    SERVER_STATE_SERVING: _ClassVar[ServerState]
    SERVER_STATE_DRAINING: _ClassVar[ServerState]

class StreamPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_POLICY_UNSPECIFIED: _ClassVar[StreamPolicy]
    STREAM_POLICY_ALL: _ClassVar[StreamPolicy]
    STREAM_POLICY_LATEST: _ClassVar[StreamPolicy]
CAM_METHOD_UNSPECIFIED: CamMethod
CAM_METHOD_GRADCAM: CamMethod
CAM_METHOD_GRADCAM_PLUS_PLUS: CamMethod
CAM_METHOD_XGRADCAM: CamMethod
CAM_METHOD_LAYERCAM: CamMethod
CAM_METHOD_HIRESCAM: CamMethod
CAM_METHOD_EIGENCAM: CamMethod
CAM_METHOD_SCORECAM: CamMethod
CAM_METHOD_RANDOM: CamMethod
EXPLAIN_OUTPUT_UNSPECIFIED: ExplainOutput
EXPLAIN_OUTPUT_RAW_MAP: ExplainOutput
EXPLAIN_OUTPUT_HEATMAP_PNG: ExplainOutput
EXPLAIN_OUTPUT_OVERLAY_JPEG: ExplainOutput
EXPLAIN_OUTPUT_OVERLAY_PNG: ExplainOutput
SERVER_STATE_UNSPECIFIED: ServerState
SERVER_STATE_LOADING: ServerState
SERVER_STATE_SERVING: ServerState
SERVER_STATE_DRAINING: ServerState
STREAM_POLICY_UNSPECIFIED: StreamPolicy
STREAM_POLICY_ALL: StreamPolicy
STREAM_POLICY_LATEST: StreamPolicy

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("pixels", "height", "width", "channels")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height: int
    width: int
    channels: int
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "top_k")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResult, _Mapping]]] = ...) -> None: ...

class PredictResult(_message.Message):
    __slots__ = ("prediction", "timing", "image_size")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    prediction: Prediction
    timing: Timing
    image_size: ImageSize
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_size", "decode_ms", "respond_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    RESPOND_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_size: int
    decode_ms: float
    respond_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., decode_ms: _Optional[float] = ..., respond_ms: _Optional[float] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("class_index", "label")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("images", "target", "method", "layer", "outputs", "top_k", "targets", "top_targets", "layers", "methods", "counterfactual", "signed", "score_cam_channels", "faithfulness_steps")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOP_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    SCORE_CAM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_STEPS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    target: Target
    method: CamMethod
    layer: str
    outputs: _containers.RepeatedScalarFieldContainer[ExplainOutput]
    top_k: int
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    top_targets: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[CamMethod]
    counterfactual: bool
    signed: bool
    score_cam_channels: int
    faithfulness_steps: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layer: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[ExplainOutput, str]]] = ..., top_k: _Optional[int] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., top_targets: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[CamMethod, str]]] = ..., counterfactual: _Optional[bool] = ..., signed: _Optional[bool] = ..., score_cam_channels: _Optional[int] = ..., faithfulness_steps: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExplainResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ExplainResult, _Mapping]]] = ...) -> None: ...

class ExplainResult(_message.Message):
    __slots__ = ("prediction", "target", "method", "layer", "raw_map", "heatmap_png", "overlay", "overlay_format", "image_size", "timing", "maps", "combined")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RAW_MAP_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    prediction: Prediction
    target: ClassScore
    method: CamMethod
    layer: str
    raw_map: RawMap
    heatmap_png: bytes
    overlay: bytes
    overlay_format: str
    image_size: ImageSize
    timing: Timing
    maps: _containers.RepeatedCompositeFieldContainer[ClassMap]
    combined: _containers.RepeatedCompositeFieldContainer[CombinedMap]
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., target: _Optional[_Union[ClassScore, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layer: _Optional[str] = ..., raw_map: _Optional[_Union[RawMap, _Mapping]] = ..., heatmap_png: _Optional[bytes] = ..., overlay: _Optional[bytes] = ..., overlay_format: _Optional[str] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., maps: _Optional[_Iterable[_Union[ClassMap, _Mapping]]] = ..., combined: _Optional[_Iterable[_Union[CombinedMap, _Mapping]]] = ...) -> None: ...

class ClassMap(_message.Message):
    __slots__ = ("target", "method", "layer", "raw_map", "heatmap_png", "overlay", "faithfulness")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RAW_MAP_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_FIELD_NUMBER: _ClassVar[int]
    target: ClassScore
    method: CamMethod
    layer: str
    raw_map: RawMap
    heatmap_png: bytes
    overlay: bytes
    faithfulness: Faithfulness
    def __init__(self, target: _Optional[_Union[ClassScore, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layer: _Optional[str] = ..., raw_map: _Optional[_Union[RawMap, _Mapping]] = ..., heatmap_png: _Optional[bytes] = ..., overlay: _Optional[bytes] = ..., faithfulness: _Optional[_Union[Faithfulness, _Mapping]] = ...) -> None: ...

class CombinedMap(_message.Message):
    __slots__ = ("target", "method", "layers", "heatmap_png", "overlay")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    target: ClassScore
    method: CamMethod
    layers: _containers.RepeatedScalarFieldContainer[str]
    heatmap_png: bytes
    overlay: bytes
    def __init__(self, target: _Optional[_Union[ClassScore, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layers: _Optional[_Iterable[str]] = ..., heatmap_png: _Optional[bytes] = ..., overlay: _Optional[bytes] = ...) -> None: ...

class Faithfulness(_message.Message):
    __slots__ = ("deletion", "insertion", "steps")
    DELETION_FIELD_NUMBER: _ClassVar[int]
    INSERTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    deletion: float
    insertion: float
    steps: int
    def __init__(self, deletion: _Optional[float] = ..., insertion: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class RawMap(_message.Message):
    __slots__ = ("height", "width", "values")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "labels", "input_size", "mean", "std", "layers", "default_layer", "methods", "batching", "device", "limits", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LAYER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_size: ImageSize
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    default_layer: str
    methods: _containers.RepeatedScalarFieldContainer[CamMethod]
    batching: BatchingInfo
    device: str
    limits: Limits
    state: ServerState
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input_size: _Optional[_Union[ImageSize, _Mapping]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., default_layer: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[CamMethod, str]]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., device: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., state: _Optional[_Union[ServerState, str]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "channels", "height", "width")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    channels: int
    height: int
    width: int
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "max_delay_ms", "max_queue")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_queue: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_stream_frames_in_flight", "max_image_bytes", "max_image_pixels", "max_images_per_request", "max_message_bytes", "max_score_cam_channels")
    MAX_STREAM_FRAMES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_CAM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    max_stream_frames_in_flight: int
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_request: int
    max_message_bytes: int
    max_score_cam_channels: int
    def __init__(self, max_stream_frames_in_flight: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_score_cam_channels: _Optional[int] = ...) -> None: ...

class StreamPredictRequest(_message.Message):
    __slots__ = ("frame_id", "image", "top_k", "policy")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    image: Image
    top_k: int
    policy: StreamPolicy
    def __init__(self, frame_id: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ..., policy: _Optional[_Union[StreamPolicy, str]] = ...) -> None: ...

class StreamPredictResponse(_message.Message):
    __slots__ = ("frame_id", "skipped", "result", "error")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    skipped: int
    result: PredictResult
    error: FrameError
    def __init__(self, frame_id: _Optional[int] = ..., skipped: _Optional[int] = ..., result: _Optional[_Union[PredictResult, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ...) -> None: ...

class StreamExplainRequest(_message.Message):
    __slots__ = ("frame_id", "image", "target", "method", "layer", "outputs", "top_k", "policy", "targets", "top_targets", "layers", "methods", "counterfactual", "signed", "score_cam_channels", "faithfulness_steps")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOP_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    SCORE_CAM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_STEPS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    image: Image
    target: Target
    method: CamMethod
    layer: str
    outputs: _containers.RepeatedScalarFieldContainer[ExplainOutput]
    top_k: int
    policy: StreamPolicy
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    top_targets: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[CamMethod]
    counterfactual: bool
    signed: bool
    score_cam_channels: int
    faithfulness_steps: int
    def __init__(self, frame_id: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layer: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[ExplainOutput, str]]] = ..., top_k: _Optional[int] = ..., policy: _Optional[_Union[StreamPolicy, str]] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., top_targets: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[CamMethod, str]]] = ..., counterfactual: _Optional[bool] = ..., signed: _Optional[bool] = ..., score_cam_channels: _Optional[int] = ..., faithfulness_steps: _Optional[int] = ...) -> None: ...

class StreamExplainResponse(_message.Message):
    __slots__ = ("frame_id", "skipped", "result", "error")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    skipped: int
    result: ExplainResult
    error: FrameError
    def __init__(self, frame_id: _Optional[int] = ..., skipped: _Optional[int] = ..., result: _Optional[_Union[ExplainResult, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
