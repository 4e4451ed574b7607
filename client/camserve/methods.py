"""CAM method names, derived from the proto enum ``CamMethod`` (the one list of methods).

A method's name is its enum value's name without the ``CAM_METHOD_`` prefix, lower-cased:
``CAM_METHOD_GRADCAM`` is ``"gradcam"``. The server's registry, the client and the CLI all
use these names.
"""

from __future__ import annotations

from typing import Tuple

from .v1 import camserve_pb2 as pb

_PREFIX = "CAM_METHOD_"


def method_names() -> Tuple[str, ...]:
    """Every method the API defines, in enum order."""
    return tuple(name[len(_PREFIX):].lower() for name, value in pb.CamMethod.items() if value)


def method_name(value: int) -> str:
    """The name of an enum value; UNSPECIFIED means Grad-CAM. Raises ValueError if unknown."""
    if value == pb.CAM_METHOD_UNSPECIFIED:
        value = pb.CAM_METHOD_GRADCAM
    return pb.CamMethod.Name(value)[len(_PREFIX):].lower()


def method_value(name: str) -> int:
    """The enum value of a method name (case-insensitive). Raises ValueError if unknown."""
    key = name.strip().lower().replace("++", "_plus_plus").replace("-", "_")
    if key not in method_names():
        raise ValueError(f"unknown CAM method {name!r}; choose from {', '.join(method_names())}")
    return pb.CamMethod.Value(_PREFIX + key.upper())


_KIND_PREFIX = "TARGET_KIND_"


def target_kind_names() -> Tuple[str, ...]:
    """Every target kind the API defines (the proto enum ``TargetKind``), in enum order:
    ``TARGET_KIND_SOFTMAX`` is ``"softmax"``."""
    return tuple(name[len(_KIND_PREFIX):].lower() for name, value in pb.TargetKind.items()
                 if value)


def target_kind_name(value: int) -> str:
    """The name of a TargetKind value; UNSPECIFIED means logit. Raises ValueError if unknown."""
    return pb.TargetKind.Name(value or pb.TARGET_KIND_LOGIT)[len(_KIND_PREFIX):].lower()


def target_kind_value(name: str) -> int:
    """The enum value of a target kind (case-insensitive). Raises ValueError if unknown."""
    key = name.strip().lower().replace("-", "_")
    if key not in target_kind_names():
        raise ValueError(f"unknown target kind {name!r}; choose from "
                         f"{', '.join(target_kind_names())}")
    return pb.TargetKind.Value(_KIND_PREFIX + key.upper())
