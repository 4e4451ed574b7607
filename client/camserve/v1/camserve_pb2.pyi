from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

CAM_METHOD_ABLATIONCAM: CamMethod
CAM_METHOD_EIGENCAM: CamMethod
CAM_METHOD_EIGENGRADCAM: CamMethod
CAM_METHOD_FEM: CamMethod
CAM_METHOD_FINERCAM: CamMethod
CAM_METHOD_FULLGRAD: CamMethod
CAM_METHOD_GRADCAM: CamMethod
CAM_METHOD_GRADCAM_ELEMENTWISE: CamMethod
CAM_METHOD_GRADCAM_PLUS_PLUS: CamMethod
CAM_METHOD_GUIDED_BACKPROP: CamMethod
CAM_METHOD_GUIDED_GRADCAM: CamMethod
CAM_METHOD_HIRESCAM: CamMethod
CAM_METHOD_KPCA_CAM: CamMethod
CAM_METHOD_LAYERCAM: CamMethod
CAM_METHOD_RANDOM: CamMethod
CAM_METHOD_SCORECAM: CamMethod
CAM_METHOD_SHAPLEYCAM: CamMethod
CAM_METHOD_UNSPECIFIED: CamMethod
CAM_METHOD_XGRADCAM: CamMethod
DESCRIPTOR: _descriptor.FileDescriptor
EXPLAIN_OUTPUT_HEATMAP_PNG: ExplainOutput
EXPLAIN_OUTPUT_OVERLAY_JPEG: ExplainOutput
EXPLAIN_OUTPUT_OVERLAY_PNG: ExplainOutput
EXPLAIN_OUTPUT_RAW_MAP: ExplainOutput
EXPLAIN_OUTPUT_UNSPECIFIED: ExplainOutput
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
LAYER_LAYOUT_NCHW: LayerLayout
LAYER_LAYOUT_NHWC: LayerLayout
LAYER_LAYOUT_TOKENS: LayerLayout
LAYER_LAYOUT_UNSPECIFIED: LayerLayout
MODEL_STATE_FAILED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNLOADED: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_UNSPECIFIED: ModelState
NOTE_KIND_ALL_ZERO: NoteKind
NOTE_KIND_RENDER_DOWNSCALED: NoteKind
NOTE_KIND_UNLIKELY_CLASS: NoteKind
NOTE_KIND_UNSPECIFIED: NoteKind
SERVER_STATE_DRAINING: ServerState
SERVER_STATE_LOADING: ServerState
SERVER_STATE_RECOVERING: ServerState
SERVER_STATE_SERVING: ServerState
SERVER_STATE_UNSPECIFIED: ServerState
STREAM_POLICY_ALL: StreamPolicy
STREAM_POLICY_LATEST: StreamPolicy
STREAM_POLICY_UNSPECIFIED: StreamPolicy
TARGET_KIND_FINER: TargetKind
TARGET_KIND_LOGIT: TargetKind
TARGET_KIND_RAW_SCORES: TargetKind
TARGET_KIND_REST: TargetKind
TARGET_KIND_SIGMOID: TargetKind
TARGET_KIND_SIMILARITY: TargetKind
TARGET_KIND_SOFTMAX: TargetKind
TARGET_KIND_UNSPECIFIED: TargetKind

class BatchingInfo(_message.Message):
    __slots__ = ["expensive_priority", "highest_priority", "level_policies", "level_share", "max_batch_size", "max_delay_ms", "max_queue", "max_queue_per_caller", "priority_levels", "stream_priority", "tenant_header", "unary_priority", "workers"]
    EXPENSIVE_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    HIGHEST_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LEVEL_POLICIES_FIELD_NUMBER: _ClassVar[int]
    LEVEL_SHARE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    STREAM_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_HEADER_FIELD_NUMBER: _ClassVar[int]
    UNARY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    expensive_priority: int
    highest_priority: int
    level_policies: _containers.RepeatedCompositeFieldContainer[LevelPolicy]
    level_share: int
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    max_queue_per_caller: int
    priority_levels: int
    stream_priority: int
    tenant_header: bool
    unary_priority: int
    workers: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_queue: _Optional[int] = ..., workers: _Optional[int] = ..., priority_levels: _Optional[int] = ..., level_share: _Optional[int] = ..., max_queue_per_caller: _Optional[int] = ..., tenant_header: bool = ..., unary_priority: _Optional[int] = ..., stream_priority: _Optional[int] = ..., expensive_priority: _Optional[int] = ..., highest_priority: _Optional[int] = ..., level_policies: _Optional[_Iterable[_Union[LevelPolicy, _Mapping]]] = ...) -> None: ...

class CheckSanityRequest(_message.Message):
    __slots__ = ["contrast_rank", "images", "layer", "methods", "model", "score_cam_channels", "seed", "stages", "threshold"]
    CONTRAST_RANK_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_CAM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    contrast_rank: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    layer: str
    methods: _containers.RepeatedScalarFieldContainer[CamMethod]
    model: ModelRef
    score_cam_channels: int
    seed: int
    stages: int
    threshold: float
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[CamMethod, str]]] = ..., layer: _Optional[str] = ..., score_cam_channels: _Optional[int] = ..., contrast_rank: _Optional[int] = ..., stages: _Optional[int] = ..., seed: _Optional[int] = ..., threshold: _Optional[float] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class CheckSanityResponse(_message.Message):
    __slots__ = ["classes", "layer", "methods", "seed", "stages", "threshold", "verdict_stage"]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VERDICT_STAGE_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[SanityClasses]
    layer: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodSanity]
    seed: int
    stages: _containers.RepeatedCompositeFieldContainer[SanityStage]
    threshold: float
    verdict_stage: int
    def __init__(self, layer: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[SanityStage, _Mapping]]] = ..., verdict_stage: _Optional[int] = ..., threshold: _Optional[float] = ..., classes: _Optional[_Iterable[_Union[SanityClasses, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[MethodSanity, _Mapping]]] = ..., seed: _Optional[int] = ...) -> None: ...

class ClassMap(_message.Message):
    __slots__ = ["faithfulness", "heatmap_png", "layer", "method", "notes", "overlay", "raw_map", "similarity", "target", "target_kind"]
    FAITHFULNESS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    RAW_MAP_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_KIND_FIELD_NUMBER: _ClassVar[int]
    faithfulness: Faithfulness
    heatmap_png: bytes
    layer: str
    method: CamMethod
    notes: _containers.RepeatedCompositeFieldContainer[Note]
    overlay: bytes
    raw_map: RawMap
    similarity: float
    target: ClassScore
    target_kind: TargetKind
    def __init__(self, target: _Optional[_Union[ClassScore, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layer: _Optional[str] = ..., raw_map: _Optional[_Union[RawMap, _Mapping]] = ..., heatmap_png: _Optional[bytes] = ..., overlay: _Optional[bytes] = ..., faithfulness: _Optional[_Union[Faithfulness, _Mapping]] = ..., notes: _Optional[_Iterable[_Union[Note, _Mapping]]] = ..., target_kind: _Optional[_Union[TargetKind, str]] = ..., similarity: _Optional[float] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ["index", "label", "logit", "probability"]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    logit: float
    probability: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class CombinedMap(_message.Message):
    __slots__ = ["heatmap_png", "layers", "method", "overlay", "target"]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    heatmap_png: bytes
    layers: _containers.RepeatedScalarFieldContainer[str]
    method: CamMethod
    overlay: bytes
    target: ClassScore
    def __init__(self, target: _Optional[_Union[ClassScore, _Mapping]] = ..., method: _Optional[_Union[CamMethod, str]] = ..., layers: _Optional[_Iterable[str]] = ..., heatmap_png: _Optional[bytes] = ..., overlay: _Optional[bytes] = ...) -> None: ...

class CompareExplainRequest(_message.Message):
    __slots__ = ["images", "models", "options", "priority"]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    options: ExplainOptions
    priority: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class CompareExplainResponse(_message.Message):
    __slots__ = ["explanations", "similarities"]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    explanations: _containers.RepeatedCompositeFieldContainer[ExplainResponse]
    similarities: _containers.RepeatedCompositeFieldContainer[ImageSimilarities]
    def __init__(self, explanations: _Optional[_Iterable[_Union[ExplainResponse, _Mapping]]] = ..., similarities: _Optional[_Iterable[_Union[ImageSimilarities, _Mapping]]] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ["aug_smooth", "counterfactual", "eigen_smooth", "faithfulness_steps", "keep_sign", "layers", "methods", "outputs", "road_percentiles", "score_cam_channels", "similar_to", "similar_to_image", "target_kind", "targets", "top_k", "top_targets"]
    AUG_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    EIGEN_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_STEPS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SIGN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ROAD_PERCENTILES_FIELD_NUMBER: _ClassVar[int]
    SCORE_CAM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SIMILAR_TO_FIELD_NUMBER: _ClassVar[int]
    SIMILAR_TO_IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TARGET_KIND_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_TARGETS_FIELD_NUMBER: _ClassVar[int]
    aug_smooth: bool
    counterfactual: bool
    eigen_smooth: bool
    faithfulness_steps: int
    keep_sign: bool
    layers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[CamMethod]
    outputs: _containers.RepeatedScalarFieldContainer[ExplainOutput]
    road_percentiles: _containers.RepeatedScalarFieldContainer[int]
    score_cam_channels: int
    similar_to: _containers.RepeatedScalarFieldContainer[float]
    similar_to_image: int
    target_kind: TargetKind
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    top_k: int
    top_targets: int
    def __init__(self, methods: _Optional[_Iterable[_Union[CamMethod, str]]] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., top_targets: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[_Union[ExplainOutput, str]]] = ..., top_k: _Optional[int] = ..., counterfactual: bool = ..., keep_sign: bool = ..., score_cam_channels: _Optional[int] = ..., faithfulness_steps: _Optional[int] = ..., target_kind: _Optional[_Union[TargetKind, str]] = ..., eigen_smooth: bool = ..., aug_smooth: bool = ..., similar_to: _Optional[_Iterable[float]] = ..., similar_to_image: _Optional[int] = ..., road_percentiles: _Optional[_Iterable[int]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ["images", "model", "options", "priority"]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model: ModelRef
    options: ExplainOptions
    priority: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ["results"]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExplainResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ExplainResult, _Mapping]]] = ...) -> None: ...

class ExplainResult(_message.Message):
    __slots__ = ["combined", "image_size", "maps", "notes", "overlay_format", "prediction", "rendered_size", "timing"]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    RENDERED_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    combined: _containers.RepeatedCompositeFieldContainer[CombinedMap]
    image_size: ImageSize
    maps: _containers.RepeatedCompositeFieldContainer[ClassMap]
    notes: _containers.RepeatedCompositeFieldContainer[Note]
    overlay_format: ImageFormat
    prediction: Prediction
    rendered_size: ImageSize
    timing: Timing
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., maps: _Optional[_Iterable[_Union[ClassMap, _Mapping]]] = ..., combined: _Optional[_Iterable[_Union[CombinedMap, _Mapping]]] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ..., rendered_size: _Optional[_Union[ImageSize, _Mapping]] = ..., overlay_format: _Optional[_Union[ImageFormat, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., notes: _Optional[_Iterable[_Union[Note, _Mapping]]] = ...) -> None: ...

class Faithfulness(_message.Message):
    __slots__ = ["deletion", "insertion", "road_combined", "road_lerf", "road_morf", "road_percentiles", "steps"]
    DELETION_FIELD_NUMBER: _ClassVar[int]
    INSERTION_FIELD_NUMBER: _ClassVar[int]
    ROAD_COMBINED_FIELD_NUMBER: _ClassVar[int]
    ROAD_LERF_FIELD_NUMBER: _ClassVar[int]
    ROAD_MORF_FIELD_NUMBER: _ClassVar[int]
    ROAD_PERCENTILES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    deletion: float
    insertion: float
    road_combined: float
    road_lerf: float
    road_morf: float
    road_percentiles: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    def __init__(self, deletion: _Optional[float] = ..., insertion: _Optional[float] = ..., steps: _Optional[int] = ..., road_morf: _Optional[float] = ..., road_lerf: _Optional[float] = ..., road_combined: _Optional[float] = ..., road_percentiles: _Optional[_Iterable[int]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ["model"]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ["batching", "default_layer", "devices", "input_size", "labels", "layers", "limits", "mean", "methods", "model", "name", "output_activation", "state", "std"]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LAYER_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    batching: BatchingInfo
    default_layer: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    input_size: ImageSize
    labels: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    limits: Limits
    mean: _containers.RepeatedScalarFieldContainer[float]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    model: ModelRef
    name: str
    output_activation: str
    state: ServerState
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ServerState, str]] = ..., labels: _Optional[_Iterable[str]] = ..., input_size: _Optional[_Union[ImageSize, _Mapping]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., default_layer: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., devices: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., output_activation: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ["encoded", "raw"]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class ImageSimilarities(_message.Message):
    __slots__ = ["pairs"]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[MapSimilarity]
    def __init__(self, pairs: _Optional[_Iterable[_Union[MapSimilarity, _Mapping]]] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ["height", "width"]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ["channels", "height", "layout", "name", "prefix_tokens", "reason", "width"]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    layout: LayerLayout
    name: str
    prefix_tokens: int
    reason: str
    width: int
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., layout: _Optional[_Union[LayerLayout, str]] = ..., prefix_tokens: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class LevelPolicy(_message.Message):
    __slots__ = ["delay", "max_batch", "max_queued", "max_wait_ms", "priority"]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    delay: bool
    max_batch: int
    max_queued: int
    max_wait_ms: float
    priority: int
    def __init__(self, priority: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., delay: bool = ..., max_queued: _Optional[int] = ..., max_batch: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ["max_faithfulness_steps", "max_image_bytes", "max_image_pixels", "max_images_per_request", "max_maps_per_image", "max_message_bytes", "max_score_cam_channels", "max_stream_frames_in_flight"]
    MAX_FAITHFULNESS_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MAPS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_CAM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_FRAMES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    max_faithfulness_steps: int
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_request: int
    max_maps_per_image: int
    max_message_bytes: int
    max_score_cam_channels: int
    max_stream_frames_in_flight: int
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_stream_frames_in_flight: _Optional[int] = ..., max_score_cam_channels: _Optional[int] = ..., max_maps_per_image: _Optional[int] = ..., max_faithfulness_steps: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ["ready"]
    READY_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    def __init__(self, ready: bool = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ["models"]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ["name", "no_wait"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    no_wait: bool
    def __init__(self, name: _Optional[str] = ..., no_wait: bool = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ["models"]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class MapSimilarity(_message.Message):
    __slots__ = ["first", "method", "second", "spearman", "target"]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    first: int
    method: CamMethod
    second: int
    spearman: float
    target: int
    def __init__(self, first: _Optional[int] = ..., second: _Optional[int] = ..., method: _Optional[_Union[CamMethod, str]] = ..., target: _Optional[int] = ..., spearman: _Optional[float] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ["class_discriminative", "method", "needs_backward"]
    CLASS_DISCRIMINATIVE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NEEDS_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    class_discriminative: bool
    method: CamMethod
    needs_backward: bool
    def __init__(self, method: _Optional[_Union[CamMethod, str]] = ..., needs_backward: bool = ..., class_discriminative: bool = ...) -> None: ...

class MethodSanity(_message.Message):
    __slots__ = ["discrimination", "discrimination_passed", "method", "randomisation", "randomisation_passed"]
    DISCRIMINATION_FIELD_NUMBER: _ClassVar[int]
    DISCRIMINATION_PASSED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RANDOMISATION_FIELD_NUMBER: _ClassVar[int]
    RANDOMISATION_PASSED_FIELD_NUMBER: _ClassVar[int]
    discrimination: float
    discrimination_passed: bool
    method: CamMethod
    randomisation: _containers.RepeatedScalarFieldContainer[float]
    randomisation_passed: bool
    def __init__(self, method: _Optional[_Union[CamMethod, str]] = ..., randomisation: _Optional[_Iterable[float]] = ..., randomisation_passed: bool = ..., discrimination: _Optional[float] = ..., discrimination_passed: bool = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ["name", "version"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ["bytes", "error", "is_default", "name", "source", "state", "version"]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    error: str
    is_default: bool
    name: str
    source: str
    state: ModelState
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., error: _Optional[str] = ..., is_default: bool = ..., bytes: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Note(_message.Message):
    __slots__ = ["kind", "message"]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: NoteKind
    message: str
    def __init__(self, kind: _Optional[_Union[NoteKind, str]] = ..., message: _Optional[str] = ...) -> None: ...

class PredictOptions(_message.Message):
    __slots__ = ["top_k"]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    def __init__(self, top_k: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ["images", "model", "options", "priority"]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model: ModelRef
    options: PredictOptions
    priority: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[PredictOptions, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ["results"]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResult, _Mapping]]] = ...) -> None: ...

class PredictResult(_message.Message):
    __slots__ = ["embedding", "image_size", "prediction", "timing"]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    image_size: ImageSize
    prediction: Prediction
    timing: Timing
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ["top"]
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ["channels", "height", "pixels", "width"]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    pixels: bytes
    width: int
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class RawMap(_message.Message):
    __slots__ = ["height", "values", "width"]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    values: _containers.RepeatedScalarFieldContainer[float]
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class SanityClasses(_message.Message):
    __slots__ = ["contrast", "top"]
    CONTRAST_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    contrast: int
    top: int
    def __init__(self, top: _Optional[int] = ..., contrast: _Optional[int] = ...) -> None: ...

class SanityStage(_message.Message):
    __slots__ = ["modules", "name"]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.RepeatedScalarFieldContainer[str]
    name: str
    def __init__(self, name: _Optional[str] = ..., modules: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamExplainConfig(_message.Message):
    __slots__ = ["model", "options", "policy", "priority"]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    options: ExplainOptions
    policy: StreamPolicy
    priority: int
    def __init__(self, policy: _Optional[_Union[StreamPolicy, str]] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class StreamExplainRequest(_message.Message):
    __slots__ = ["config", "frame"]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    config: StreamExplainConfig
    frame: StreamFrame
    def __init__(self, config: _Optional[_Union[StreamExplainConfig, _Mapping]] = ..., frame: _Optional[_Union[StreamFrame, _Mapping]] = ...) -> None: ...

class StreamExplainResponse(_message.Message):
    __slots__ = ["error", "frame_id", "result", "skipped"]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    error: _status_pb2.Status
    frame_id: int
    result: ExplainResult
    skipped: int
    def __init__(self, frame_id: _Optional[int] = ..., skipped: _Optional[int] = ..., result: _Optional[_Union[ExplainResult, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class StreamFrame(_message.Message):
    __slots__ = ["frame_id", "image"]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    image: Image
    def __init__(self, frame_id: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class StreamPredictConfig(_message.Message):
    __slots__ = ["model", "options", "policy", "priority"]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    options: PredictOptions
    policy: StreamPolicy
    priority: int
    def __init__(self, policy: _Optional[_Union[StreamPolicy, str]] = ..., options: _Optional[_Union[PredictOptions, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class StreamPredictRequest(_message.Message):
    __slots__ = ["config", "frame"]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    config: StreamPredictConfig
    frame: StreamFrame
    def __init__(self, config: _Optional[_Union[StreamPredictConfig, _Mapping]] = ..., frame: _Optional[_Union[StreamFrame, _Mapping]] = ...) -> None: ...

class StreamPredictResponse(_message.Message):
    __slots__ = ["error", "frame_id", "result", "skipped"]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    error: _status_pb2.Status
    frame_id: int
    result: PredictResult
    skipped: int
    def __init__(self, frame_id: _Optional[int] = ..., skipped: _Optional[int] = ..., result: _Optional[_Union[PredictResult, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ["class_index", "label"]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ["batch_size", "compute_ms", "decode_ms", "device", "queue_ms", "respond_ms", "worker"]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    RESPOND_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    compute_ms: float
    decode_ms: float
    device: str
    queue_ms: float
    respond_ms: float
    worker: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., decode_ms: _Optional[float] = ..., respond_ms: _Optional[float] = ..., worker: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ["name", "version"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ["models"]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class CamMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class TargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class ExplainOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class NoteKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class ServerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class LayerLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class StreamPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
