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
    Explanation,
    LayerInfo,
    MethodInfo,
    MethodSanity,
    ModelInfo,
    Note,
    Prediction,
    SanityReport,
    SanityStage,
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
    "Explanation",
    "Frame",
    "LayerInfo",
    "MethodInfo",
    "ModelInfo",
    "Note",
    "MethodSanity",
    "Prediction",
    "SanityReport",
    "SanityStage",
    "StreamResult",
    "Timing",
    "method_names",
    "target_kind_names",
]
