"""camserve client: predictions and Grad-CAM explanations from a camserve server.

    from camserve import Client
    with Client("localhost:50051") as client:
        pred = client.predict("cat.jpg")
        exp = client.explain("cat.jpg")
        exp.heatmap, exp.overlay()

Needs grpcio, protobuf, numpy and Pillow; never torch, OpenCV or a GPU.
"""

from .aio import AsyncClient
from .client import Client
from .errors import CamserveError
from .methods import method_names, target_kind_names
from .reasons import REASONS
from .results import (
    ClassMap,
    ClassScore,
    Comparison,
    Explanation,
    LayerInfo,
    LevelPolicy,
    MethodInfo,
    MethodSanity,
    ModelInfo,
    ModelStatus,
    Note,
    Prediction,
    SanityReport,
    SanityStage,
    Similarity,
    Timing,
)
from .streams import Frame, StreamResult

__version__ = "0.1.0"

__all__ = [
    "REASONS",
    "AsyncClient",
    "CamserveError",
    "ClassMap",
    "ClassScore",
    "Client",
    "Comparison",
    "Explanation",
    "Frame",
    "LayerInfo",
    "LevelPolicy",
    "MethodInfo",
    "ModelInfo",
    "ModelStatus",
    "Note",
    "MethodSanity",
    "Prediction",
    "SanityReport",
    "SanityStage",
    "Similarity",
    "StreamResult",
    "Timing",
    "method_names",
    "target_kind_names",
]
