"""CAM methods: each is one small function from (activations, gradients) to a raw map.

``activations`` and ``gradients`` are (n, K, h, w): the explained layer's output for n images and
the gradient of each image's target logit with respect to it. A method returns (n, h, w).
The registry is keyed by the method's name, which is the proto enum value's name without its
``CAM_METHOD_`` prefix, lower-cased (``camserve.methods`` derives the same names for the client
and the CLI; a test checks that every enum value has a function here and vice versa).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

CamFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CamMethod:
    name: str
    compute: CamFunction
    needs_gradient: bool = True


def gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017), eq. 1 and 2.

    alpha_k = mean_ij dy_c/dA_k,ij (global-average-pooled gradient per channel);
    L = ReLU(sum_k alpha_k A_k).
    """
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1))


METHODS: Dict[str, CamMethod] = {
    method.name: method for method in (
        CamMethod("gradcam", gradcam),
    )
}
