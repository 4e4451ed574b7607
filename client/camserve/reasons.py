"""Every ``CamserveError.reason``: a stable word for the cause of a failure, one list for the
client and the server.

A reason is a constant of this module and a key of :data:`REASONS`, whose value says in one
line what it means and what to change. The server sends its reason in the status details (a
google.rpc.ErrorInfo); the client gives its own to the problems it finds before anything is
sent (a file it cannot read, an unknown method name, a message too large to send) and to a
server it cannot reach. A test keeps this list exact: every reason the code raises is here,
and every reason here is raised somewhere.
"""

from __future__ import annotations

from typing import Dict

AMBIGUOUS_LABEL = "AMBIGUOUS_LABEL"
ANSWER_TOO_LARGE = "ANSWER_TOO_LARGE"
BAD_MODEL_CONFIG = "BAD_MODEL_CONFIG"
BAD_MODEL_NAME = "BAD_MODEL_NAME"
BATCH_FAILED = "BATCH_FAILED"
BUSY_WITH_LARGE = "BUSY_WITH_LARGE"
CALLER_QUEUE_FULL = "CALLER_QUEUE_FULL"
CONCEPT_LENGTH = "CONCEPT_LENGTH"
CANCELLED = "CANCELLED"
DEADLINE_TOO_SHORT = "DEADLINE_TOO_SHORT"
DEFAULT_MODEL = "DEFAULT_MODEL"
DRAINING = "DRAINING"
EXPENSIVE_WORK_FULL = "EXPENSIVE_WORK_FULL"
IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
INTERNAL = "INTERNAL"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
INVALID_DATATYPE = "INVALID_DATATYPE"
INVALID_FOLDER = "INVALID_FOLDER"
INVALID_IMAGE = "INVALID_IMAGE"
INVALID_METADATA = "INVALID_METADATA"
INVALID_OPTION = "INVALID_OPTION"
INVALID_PARAMETER = "INVALID_PARAMETER"
INVALID_PRIORITY = "INVALID_PRIORITY"
INVALID_RANK = "INVALID_RANK"
INVALID_SHAPE = "INVALID_SHAPE"
INVALID_STAGES = "INVALID_STAGES"
INVALID_STEPS = "INVALID_STEPS"
INVALID_TARGET = "INVALID_TARGET"
INVALID_TENSOR = "INVALID_TENSOR"
INVALID_THRESHOLD = "INVALID_THRESHOLD"
INVALID_TLS = "INVALID_TLS"
INVALID_VIDEO = "INVALID_VIDEO"
ITEM_TOO_COSTLY = "ITEM_TOO_COSTLY"
LABELS_DIFFER = "LABELS_DIFFER"
LAST_MODEL = "LAST_MODEL"
LEVEL_QUEUE_FULL = "LEVEL_QUEUE_FULL"
LEVEL_WAIT = "LEVEL_WAIT"
LOADING = "LOADING"
MALFORMED_REQUEST = "MALFORMED_REQUEST"
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
MISSING_INPUT = "MISSING_INPUT"
MODELS_FULL = "MODELS_FULL"
MODEL_CONTROL = "MODEL_CONTROL"
MODEL_FAILED = "MODEL_FAILED"
MODEL_LOADING = "MODEL_LOADING"
MODEL_NOT_LOADED = "MODEL_NOT_LOADED"
MODEL_UNLOADING = "MODEL_UNLOADING"
NOT_ADMIN = "NOT_ADMIN"
NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
NOT_APPLICABLE = "NOT_APPLICABLE"
NOT_EXPLAINABLE = "NOT_EXPLAINABLE"
NOT_FOUND = "NOT_FOUND"
NO_CONCEPT = "NO_CONCEPT"
NO_IMAGES = "NO_IMAGES"
NO_MODEL = "NO_MODEL"
NO_SANITY_CHECKS = "NO_SANITY_CHECKS"
POLICY_CHANGED = "POLICY_CHANGED"
QUEUE_FULL = "QUEUE_FULL"
REQUEST_TOO_COSTLY = "REQUEST_TOO_COSTLY"
SANITY_BUSY = "SANITY_BUSY"
STREAM_IDLE = "STREAM_IDLE"
TOO_FEW_MODELS = "TOO_FEW_MODELS"
TOO_MANY_CHANNELS = "TOO_MANY_CHANNELS"
TOO_MANY_IMAGES = "TOO_MANY_IMAGES"
TOO_MANY_MAPS = "TOO_MANY_MAPS"
TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
UNAUTHENTICATED = "UNAUTHENTICATED"
UNAVAILABLE = "UNAVAILABLE"
UNIMPLEMENTED = "UNIMPLEMENTED"
UNKNOWN_CLASS = "UNKNOWN_CLASS"
UNKNOWN_INPUT = "UNKNOWN_INPUT"
UNKNOWN_LABEL = "UNKNOWN_LABEL"
UNKNOWN_LAYER = "UNKNOWN_LAYER"
UNKNOWN_METHOD = "UNKNOWN_METHOD"
UNKNOWN_MODEL = "UNKNOWN_MODEL"
UNKNOWN_OPTION = "UNKNOWN_OPTION"
UNKNOWN_OUTPUT = "UNKNOWN_OUTPUT"
UNKNOWN_PARAMETER = "UNKNOWN_PARAMETER"
UNKNOWN_PATH = "UNKNOWN_PATH"
UNKNOWN_POLICY = "UNKNOWN_POLICY"
UNKNOWN_VERSION = "UNKNOWN_VERSION"
UNREACHABLE = "UNREACHABLE"
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"

REASONS: Dict[str, str] = {
    AMBIGUOUS_LABEL: "a class label names several classes: pass the class index instead",
    ANSWER_TOO_LARGE: "the answer would exceed the message limit: send fewer images per call, "
                      "ask for fewer maps, or for raw maps or JPEG overlays instead of PNGs",
    BAD_MODEL_CONFIG: "a model's config.toml in the server's repository is wrong (the details say "
                      "where): fix it and load the model again",
    BAD_MODEL_NAME: "a model name is a folder of the server's repository: letters, digits, '.', "
                    "'_' and '-', no paths",
    BATCH_FAILED: "the model failed on the batch this image ran in (other calls are "
                  "unaffected): retry; if it recurs, the details say what the model raised",
    BUSY_WITH_LARGE: "the server holds too many bytes of other large requests: retry after "
                     "retry_after seconds",
    CALLER_QUEUE_FULL: "this caller has as many items waiting as the server allows one caller "
                       "(--max-queue-per-caller): retry after retry_after seconds",
    CONCEPT_LENGTH: "similar_to must be as long as the model's output (GetModelInfo's labels), "
                    "finite and not all zero",
    CANCELLED: "the call was cancelled before its answer was ready",
    DEADLINE_TOO_SHORT: "the call's deadline passes before the server can answer it: allow "
                        "more time (timeout=) or ask for less work",
    DEFAULT_MODEL: "the server's default model cannot be unloaded while it serves",
    DRAINING: "the server is shutting down: send the call to another replica",
    EXPENSIVE_WORK_FULL: "the server is busy with expensive explanations (Score-CAM, "
                         "faithfulness): retry after retry_after seconds",
    IMAGE_NOT_FOUND: "there is no file at the image path given: check the path",
    INTERNAL: "a bug in the server: report it with the call's request id; the server keeps "
              "serving",
    INVALID_ARGUMENT: "the request is invalid in a way the details describe",
    INVALID_DATATYPE: "an Open Inference Protocol input has a datatype other than BYTES "
                      "(encoded files) or UINT8 (pixels)",
    INVALID_FOLDER: "camserve evaluate needs one folder of images, and the path given is not "
                    "one",
    INVALID_IMAGE: "an image cannot be read or decoded: send a JPEG, PNG, WebP, BMP or GIF file, "
                   "a uint8 RGB, gray or RGBA array, or a PIL image",
    INVALID_METADATA: "call metadata needs lower-case string keys",
    INVALID_OPTION: "an option has a value of the wrong type or range (e.g. top_k < 1, a "
                    "negative count): the details name it",
    INVALID_PARAMETER: "an Open Inference Protocol parameter has a wrong type or value",
    INVALID_PRIORITY: "a priority must be 0 (the call's default) or 1 (the highest) to the "
                      "server's --priority-levels (3 by default; camserve info shows them)",
    INVALID_RANK: "the sanity check's contrast_rank is out of the model's class range",
    INVALID_SHAPE: "an Open Inference Protocol input's shape is not [N] / [N, 1] (BYTES) or "
                   "[N, H, W, C] (UINT8)",
    INVALID_STAGES: "the sanity check's stages is out of range (1-4, 0 for all)",
    INVALID_STEPS: "faithfulness_steps must be 0 (off) or between 2 and the server's "
                   "max_faithfulness_steps",
    INVALID_TARGET: "the server address cannot be used: pass host[:port], several "
                    "comma-separated addresses of one IP family, or a gRPC URI",
    INVALID_TENSOR: "an Open Inference Protocol input's contents do not match its shape and "
                    "datatype",
    INVALID_THRESHOLD: "the sanity check's threshold must be in (0, 1] (0: the server's)",
    INVALID_TLS: "a TLS option cannot be used: a PEM file cannot be read, or client_cert and "
                 "client_key were not given together",
    INVALID_VIDEO: "OpenCV cannot open the video file or camera, or cannot write the output "
                   "video",
    ITEM_TOO_COSTLY: "one image's explanation costs more forwards than the server's "
                     "max_item_cost: fewer methods, targets or layers, or lower "
                     "score_cam_channels or faithfulness_steps",
    LABELS_DIFFER: "CompareExplain's models have different labels: their maps of a class do not "
                   "compare",
    LAST_MODEL: "the server's last loaded model cannot be unloaded: load another first",
    LEVEL_QUEUE_FULL: "the server holds as many items of this priority as it allows "
                      "(--level-max-queued): retry after retry_after seconds, or at another "
                      "priority",
    LEVEL_WAIT: "the server answers this priority within a bound (--level-max-wait-ms) and "
                "could not: retry later, or at a higher priority",
    LOADING: "the server is still loading its model: retry shortly, or wait_until_ready()",
    MALFORMED_REQUEST: "the request is not a valid message of the API (build it with the "
                       "generated code), or a stream message sets neither config nor frame",
    MESSAGE_TOO_LARGE: "the request exceeds the message limit: send encoded files instead of "
                       "raw arrays, downscale, or send fewer images per call",
    METHOD_NOT_ALLOWED: "an HTTP method the path does not answer (the Allow header lists those "
                        "it does)",
    MISSING_INPUT: "an Open Inference Protocol request lacks the images input",
    MODELS_FULL: "loading the model would exceed the server's --max-models-bytes: unload another "
                 "first",
    MODEL_CONTROL: "the server does not load or unload models by call (--model-control none or "
                   "poll, or several --workers)",
    MODEL_FAILED: "the model (version) named failed to load; ListModels gives the error",
    MODEL_LOADING: "the model (version) named is still loading: retry after retry_after seconds",
    MODEL_NOT_LOADED: "the model named is in the server's repository but not loaded: load it "
                      "(camserve load NAME)",
    MODEL_UNLOADING: "the model (version) named is being unloaded: name another",
    NOT_ADMIN: "loading and unloading models need the server's admin token (--admin-token)",
    NOT_ACCEPTABLE: "an HTTP call's Accept header asks for a type the answer does not come in "
                    "(JSON; Explain also a PNG or JPEG overlay)",
    NOT_APPLICABLE: "a method, target or option cannot run on this model or with the other "
                    "options (e.g. a guided method on a model without ReLUs): the details say "
                    "what to ask for instead",
    NOT_EXPLAINABLE: "the served model has no layer to explain (e.g. TorchScript): it serves "
                     "Predict only",
    NOT_FOUND: "what the call names is not served here",
    NO_CONCEPT: "a similarity map needs a concept (similar_to, a vector as long as the "
                "model's output, or similar_to_image), and an embedding model explains only "
                "similarities",
    NO_IMAGES: "there are no images to answer: give at least one",
    NO_MODEL: "an Open Inference Protocol call names no model: name the served one",
    NO_SANITY_CHECKS: "this server runs no sanity checks",
    POLICY_CHANGED: "a stream's policy can only be set by its first message",
    QUEUE_FULL: "the server's queue is full: retry after retry_after seconds, or use another "
                "replica",
    REQUEST_TOO_COSTLY: "the request's images together cost more than the server runs at "
                        "once: send fewer images per call, or ask for less work per image",
    SANITY_BUSY: "another sanity check is running on this server: retry in a few seconds",
    STREAM_IDLE: "a stream sent no frame soon after it opened: open streams when frames are "
                 "ready",
    TOO_FEW_MODELS: "CompareExplain needs two or more models",
    TOO_MANY_CHANNELS: "score_cam_channels is over the server's max_score_cam_channels",
    TOO_MANY_IMAGES: "the request has more images than the server's max_images_per_request: "
                     "split it",
    TOO_MANY_MAPS: "methods x targets x layers exceeds the server's max_maps_per_image",
    TOO_MANY_STREAMS: "the server has as many streams open as it allows (max_streams): retry "
                      "later or use another replica",
    UNAUTHENTICATED: "the server needs a bearer token and the call sent none it accepts: pass "
                     "token= (or --token, CAMSERVE_TOKEN)",
    UNAVAILABLE: "the server cannot serve the call now: retry, or use another replica",
    UNIMPLEMENTED: "the server does not implement this call",
    UNKNOWN_CLASS: "a class index is out of the model's range, or a target names no class",
    UNKNOWN_INPUT: "an Open Inference Protocol request has inputs the model does not take",
    UNKNOWN_LABEL: "no class has this label: camserve info (model_info().labels) lists them",
    UNKNOWN_LAYER: "the layer is not one the server explains: model_info().layers lists them",
    UNKNOWN_METHOD: "the CAM method is unknown or not served here: camserve.method_names() "
                    "lists them",
    UNKNOWN_MODEL: "the model named is not served here",
    UNKNOWN_OPTION: "an option name is unknown (a misspelling?): the details list the choices",
    UNKNOWN_OUTPUT: "an output is unknown, or two overlay formats were asked for: choose from "
                    "raw, heatmap, overlay_jpeg, overlay_png",
    UNKNOWN_PARAMETER: "an Open Inference Protocol parameter is not one the model takes",
    UNKNOWN_PATH: "no HTTP path of that name: the API is under /v1 (camserve) and /v2 (Open "
                  "Inference Protocol), described at /openapi.json",
    UNKNOWN_POLICY: "a stream policy must be 'all' or 'latest'",
    UNKNOWN_VERSION: "the model version named is not served here (leave it empty)",
    UNREACHABLE: "no camserve server answers at the target: start one, or pass the right "
                 "--target / Client(target)",
    UNSUPPORTED_MEDIA_TYPE: "an HTTP request body of a type the path does not take: send "
                            "application/json (or multipart/form-data with images)",
}
