"""CAM methods: each is one small function from the explained layer's activations (and, for
gradient methods, the gradient of the target score with respect to them) to a signed map.

Every function takes a :class:`CamInputs` for n images and returns (n, h, w) BEFORE the final
ReLU, or, for the methods whose map is a sum over channels (``CamMethod.terms``), the terms
(n, K, h, w) that ``finish_map`` sums (or projects, for eigen_smooth). The engine applies the
ReLU (or not, for signed maps), and negates the gradients for counterfactual maps. The
registry is keyed by the method's name: the proto enum value's name without its
``CAM_METHOD_`` prefix, lower-cased (``camserve.methods`` derives the same names for the client
and the CLI; a test checks that every enum value has a function here and back).

Definitions follow pytorch-grad-cam, the reference the tests compare against; where that
differs from the paper it is said below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Generator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..domain import METHODS as TRAITS


@dataclass(frozen=True)
class CamInputs:
    activations: torch.Tensor  # (n, K, h, w)
    gradients: Optional[torch.Tensor]  # (n, K, h, w), None for methods without gradients
    inputs: torch.Tensor  # (n, 3, H, W), normalised, as the model saw them
    targets: torch.Tensor  # (n,) class indices
    forward: Callable[[torch.Tensor], torch.Tensor]  # logits of a batch; no hooks, no grad
    # The guided methods: d(target)/d(inputs) through guided ReLUs, (n, 3, H, W)
    guided: Optional[torch.Tensor] = None
    # ShapleyCAM: the Hessian-vector product d(gradients . A)/dA, like the gradients
    hvp: Optional[torch.Tensor] = None
    # FullGrad: d(target)/d(inputs) (n, 3, H, W), and per bias layer (its bias (C,), the
    # target's gradient at its output (n, C, h, w))
    input_gradient: Optional[torch.Tensor] = None
    bias_gradients: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None


@dataclass(frozen=True)
class CamMethod:
    """A method computes the maps of a group of items at once (``compute``), or, when it runs
    extra forwards per map, one image's map as a generator of forward chunks (``slices``), which
    the engine hands to the batcher as a job."""

    name: str
    compute: Optional[Callable[[CamInputs], torch.Tensor]]
    slices: Optional[Callable[..., Generator[int, None, torch.Tensor]]] = None

    @property
    def needs_gradient(self) -> bool:
        return TRAITS[self.name].needs_backward

    @property
    def guided(self) -> bool:
        return TRAITS[self.name].guided

    @property
    def terms(self) -> bool:
        """compute (slices) returns the terms (n, K, h, w) ((K, h, w)) whose channel sum is the
        map (domain's channel_sum): eigen_smooth projects them on their first principal
        component instead, as pytorch-grad-cam's eigen_smooth."""
        return TRAITS[self.name].channel_sum

    @property
    def second_order(self) -> bool:
        return TRAITS[self.name].second_order

    @property
    def full_gradient(self) -> bool:
        return TRAITS[self.name].full_gradient


def _weighted(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_k w_k A_k for per-channel weights (n, K)."""
    return _terms(weights, activations).sum(dim=1)


def _terms(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """w_k A_k for per-channel weights (n, K): (n, K, h, w), the terms whose channel sum is
    the map (what eigen_smooth projects instead of summing)."""
    return weights[:, :, None, None] * activations


def gradcam(c: CamInputs) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017), eq. 1-2: alpha_k = mean_ij dy/dA_k,ij;
    L = ReLU(sum_k alpha_k A_k)."""
    return _terms(c.gradients.mean(dim=(2, 3)), c.activations)


def gradcam_plus_plus(c: CamInputs) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018), the closed form of eq. 19 with the
    exponential output's derivatives written as powers of the gradient:
    a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3), zero where g = 0;
    w_k = sum_ij a_ij ReLU(g_ij); L = ReLU(sum_k w_k A_k)."""
    g = c.gradients
    g2 = g * g
    total = c.activations.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + total * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return _terms((alpha * torch.relu(g)).sum(dim=(2, 3)), c.activations)


def xgradcam(c: CamInputs) -> torch.Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020), eq. 9: w_k = sum_ij (A_k,ij / sum_ab A_k,ab) dy/dA_k,ij."""
    total = c.activations.sum(dim=(2, 3), keepdim=True)
    return _terms((c.gradients * c.activations / (total + 1e-7)).sum(dim=(2, 3)),
                  c.activations)


def layercam(c: CamInputs) -> torch.Tensor:
    """LayerCAM (Jiang et al., IEEE TIP 2021), eq. 5-6: L = ReLU(sum_k ReLU(g_k) * A_k),
    element-wise."""
    return torch.relu(c.gradients) * c.activations


def hirescam(c: CamInputs) -> torch.Tensor:
    """HiResCAM (Draelos & Carin, 2020), eq. 3: L = ReLU(sum_k g_k * A_k), element-wise."""
    return c.gradients * c.activations


def shapleycam(c: CamInputs) -> torch.Tensor:
    """ShapleyCAM (Cai et al., 2025, eq. 9, as pytorch-grad-cam's ShapleyCAM): a second-order
    Taylor view of each channel's Shapley value, w_k = mean_ij (g - 1/2 H A)_k,ij with H A the
    Hessian of the target with respect to the activations times the activations;
    L = ReLU(sum_k w_k A_k)."""
    return _terms((c.gradients - 0.5 * c.hvp).mean(dim=(2, 3)), c.activations)


def bias_layers(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """FullGrad's layers, as pytorch-grad-cam's: every Conv2d and BatchNorm2d with a bias, and
    the bias each adds (a batch norm's: beta - mean * gamma / sqrt(var + eps); after the
    engine folds a batch norm into its convolution, the convolution's bias is that)."""
    found = []
    for name, m in module.named_modules():
        if type(m) not in (nn.Conv2d, nn.BatchNorm2d) or m.bias is None:
            continue
        bias = m.bias.detach()
        if isinstance(m, nn.BatchNorm2d):
            bias = bias - m.running_mean * m.weight.detach() / torch.sqrt(m.running_var + m.eps)
        found.append((name, bias.float()))
    return found


def _scaled(values: torch.Tensor, size) -> torch.Tensor:
    """pytorch-grad-cam's scale_accross_batch_and_channels, summed over the channels: each
    (image, channel) map min-max scaled (x - min) / (max + 1e-7), then resized bilinearly to
    ``size`` (as cv2.resize; resizing is linear, so the sum is resized once): (n, H, W)."""
    flat = values.flatten(2)
    shifted = values - flat.min(dim=2).values[:, :, None, None]
    scaled = shifted / (1e-7 + shifted.flatten(2).max(dim=2).values[:, :, None, None])
    total = scaled.sum(dim=1, keepdim=True)
    if tuple(total.shape[-2:]) != tuple(size):
        total = F.interpolate(total, size=size, mode="bilinear", align_corners=False)
    return total[:, 0]


def fullgrad(c: CamInputs) -> torch.Tensor:
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019), eq. 5, as pytorch-grad-cam's FullGrad: the
    input-gradient term |dy/dx * x| plus, for every bias layer, |b * dy/dz| (z its output),
    each channel's map min-max scaled and upsampled to the input, summed: a map at the
    input's resolution. Needs the full backward to the input (its own pass). The layer asked
    for does not matter: every bias layer counts."""
    size = c.inputs.shape[-2:]
    cam = _scaled((c.input_gradient * c.inputs).abs(), size)
    for bias, grads in c.bias_gradients:
        cam = cam + _scaled((bias[None, :, None, None] * grads).abs(), size)
    return cam


def principal_component(values: torch.Tensor, orient: torch.Tensor) -> torch.Tensor:
    """The first principal component of ``values`` (n, K, h, w): positions x channels, centred
    per channel, projected on the component, (n, h, w); pytorch-grad-cam's get_2d_projection.

    A principal component's sign is arbitrary (SVD can return v or -v), and pytorch-grad-cam
    keeps whatever LAPACK returns; here the sign is fixed so that the projection correlates
    positively with ``orient`` (n, h, w), so that strong evidence reads as salient, whatever
    the linear-algebra library."""
    n, k, h, w = values.shape
    a = torch.nan_to_num(values).reshape(n, k, h * w).transpose(1, 2).double()  # (n, hw, K)
    a = a - a.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    projection = (a @ vh[:, 0, :, None])[:, :, 0]  # (n, hw)
    strength = orient.reshape(n, h * w).double()
    strength = strength - strength.mean(dim=1, keepdim=True)
    sign = torch.sign((projection * strength).sum(dim=1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (projection * sign[:, None]).reshape(n, h, w).to(values.dtype)


def eigencam(c: CamInputs) -> torch.Tensor:
    """EigenCAM (Muhammad & Yeasin, IJCNN 2020): the activations (positions x channels,
    centred per channel) projected on their first principal component. No gradient. Oriented
    to correlate positively with the activations' channel sum (``principal_component``)."""
    return principal_component(c.activations, c.activations.sum(dim=1))


def eigengradcam(c: CamInputs) -> torch.Tensor:
    """EigenGradCAM (pytorch-grad-cam's class-discriminative EigenCAM, after Muhammad & Yeasin
    2020): the first principal component of gradient x activation, element-wise. Oriented to
    correlate positively with HiResCAM's map, their channel sum."""
    product = c.gradients * c.activations
    return principal_component(product, product.sum(dim=1))


def gradcam_elementwise(c: CamInputs) -> torch.Tensor:
    """GradCAMElementWise (pytorch-grad-cam's variant of HiResCAM, Draelos & Carin 2020):
    L = ReLU(sum_k ReLU(g_k * A_k)), the ReLU element-wise before the channel sum."""
    return torch.relu(c.gradients * c.activations)


def fem(c: CamInputs, k: float = 2.0) -> torch.Tensor:
    """FEM, the Feature Explanation Method (Fuad et al., IPTA 2020): a channel's weight is the
    fraction of its positions above its mean + k standard deviations (k = 2, the k-sigma
    rule); L = ReLU(sum_k w_k A_k). No gradient, no class."""
    a = c.activations
    mean = a.mean(dim=(2, 3), keepdim=True)
    std = a.std(dim=(2, 3), keepdim=True, unbiased=False)
    return _weighted((a > mean + k * std).to(a.dtype).mean(dim=(2, 3)), a)


def kpca_cam(c: CamInputs) -> torch.Tensor:
    """KPCA-CAM (Karmani et al., 2024): EigenCAM with kernel PCA, as pytorch-grad-cam's KPCA_CAM
    with its defaults (scikit-learn's KernelPCA, sigmoid kernel tanh(<x, y> / K + 1) between
    the positions' centred channel vectors, the kernel matrix centred, the first component
    scaled by the square root of its eigenvalue). Its sign as scikit-learn fixes it: the
    eigenvector's largest entry in absolute value is positive. No gradient, no class."""
    n, k, h, w = c.activations.shape
    a = torch.nan_to_num(c.activations).reshape(n, k, h * w).transpose(1, 2).double()
    a = a - a.mean(dim=1, keepdim=True)
    kernel = torch.tanh(a @ a.transpose(1, 2) / k + 1.0)  # (n, hw, hw)
    kernel = (kernel - kernel.mean(dim=1, keepdim=True) - kernel.mean(dim=2, keepdim=True)
              + kernel.mean(dim=(1, 2), keepdim=True))
    values, vectors = torch.linalg.eigh(kernel)
    top, value = vectors[:, :, -1], values[:, -1].clamp(min=0)  # (n, hw), (n,)
    biggest = top.gather(1, top.abs().argmax(dim=1, keepdim=True))
    top = top * torch.sign(biggest)
    return (top * value.sqrt()[:, None]).reshape(n, h, w).to(c.activations.dtype)


# --- guided backpropagation (Springenberg et al., ICLR-W 2015) ---------------------------------

GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)  # the modules whose backward is guided


def guidable(module: nn.Module) -> bool:
    """The model has activations guided backpropagation guides."""
    return any(isinstance(m, GUIDED_ACTIVATIONS) for m in module.modules())


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the gradient. After a ReLU,
    whose own backward masks where its input was <= 0, the gradient below the pair is
    grad * (input > 0) * (grad > 0): pytorch-grad-cam's GuidedBackpropReLU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


def guided_output(output: torch.Tensor) -> torch.Tensor:
    """A ReLU's output whose backward is guided (the engine's forward hook on each
    GUIDED_ACTIVATIONS module returns it during its guided pass)."""
    return _PositiveGradient.apply(output)


def guided_backprop(c: CamInputs) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015), as pytorch-grad-cam's
    GuidedBackpropReLUModel: the gradient of the target with respect to the (normalised)
    input, through ReLUs whose backward passes only positive gradients; summed over the colour
    channels, at the input's resolution."""
    return c.guided.sum(dim=1)


def guided_gradcam(c: CamInputs) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017, section 3.1): guided backpropagation times the
    Grad-CAM map (after its ReLU) upsampled bilinearly to the input's resolution, element-wise;
    summed over the colour channels. Captum's GuidedGradCam(interpolate_mode="bilinear");
    pytorch-grad-cam's recipe (its example multiplies by the min-max scaled map) up to that
    scale."""
    cam = torch.relu(gradcam(c).sum(dim=1))
    up = F.interpolate(cam[:, None], size=c.guided.shape[-2:], mode="bilinear",
                       align_corners=False)[:, 0]
    return up * c.guided.sum(dim=1)


@dataclass(frozen=True)
class SliceInputs:
    """What a method that runs forwards per channel gets, for one image and one map."""

    activations: torch.Tensor  # (K, h, w)
    inputs: torch.Tensor  # (3, H, W), normalised
    score: Callable[[torch.Tensor], torch.Tensor]  # logits (m, classes) -> target scores (m,)
    forward: Callable[[torch.Tensor], torch.Tensor]  # logits of a batch of inputs; no grad
    # logits of the image with the layer's output replaced by each of a batch of (m, K, h, w)
    replaced: Callable[[torch.Tensor], torch.Tensor]
    original: torch.Tensor  # (1, classes) the image's own logits
    max_channels: int  # 0: every channel
    chunk: int  # images per forward


def _top_channels(acts: torch.Tensor, max_channels: int) -> torch.Tensor:
    """The channels a per-channel method runs: all, or the ``max_channels`` with the highest
    mean activation (camserve's cap, since each costs a forward)."""
    k = acts.shape[0]
    if not max_channels or max_channels >= k:
        return torch.arange(k, device=acts.device)
    return torch.topk(acts.mean(dim=(1, 2)), max_channels).indices


def scorecam_slices(c: SliceInputs) -> Generator[int, None, torch.Tensor]:
    """Score-CAM (Wang et al., CVPR-W 2020) of one image: each channel, upsampled to the input
    and min-max scaled, masks the input; the masked image's target score (by default the
    target's logit) is that channel's score; the weights are the softmax of the scores over
    the channels; L = ReLU(sum_k w_k A_k).

    As pytorch-grad-cam: logits and a softmax over channels (the paper scores with the class
    probability, relative to a baseline). ``max_channels`` keeps the channels with the highest
    mean activation (the others get no weight), since each channel costs one forward.

    A chunk of masked forwards at a time: yields the number of images each chunk forwarded;
    returns the (K, h, w) terms w_k A_k of the map (before the final ReLU)."""
    acts, inputs = c.activations, c.inputs
    channels = _top_channels(acts, c.max_channels)
    keep = len(channels)
    masks = F.interpolate(acts[channels][None], size=inputs.shape[-2:], mode="bilinear",
                          align_corners=True)[0]  # (keep, H, W)
    flat = masks.reshape(keep, -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    masks = (masks - low[:, None, None]) / (high - low + 1e-8)[:, None, None]
    scores = []
    for start in range(0, keep, c.chunk):
        masked = inputs[None] * masks[start:start + c.chunk, None]
        scores.append(c.score(c.forward(masked)))
        yield masked.shape[0]
    weights = torch.zeros(acts.shape[0], device=acts.device, dtype=acts.dtype)
    weights[channels] = torch.softmax(torch.cat(scores).to(acts.dtype), dim=0)
    return _terms(weights[None], acts[None])[0]


def ablationcam_slices(c: SliceInputs) -> Generator[int, None, torch.Tensor]:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020), eq. 3: each channel of the layer's output
    is set to zero (ablated) and the rest of the model run on it; a channel's weight is the
    target score's relative drop, w_k = (y - y_k) / y; L = ReLU(sum_k w_k A_k). As
    pytorch-grad-cam's AblationCAM on a layer whose smallest activation is 0 (after a ReLU:
    where it is not, pytorch-grad-cam sets the channel to ever lower values, min - 1e7 and
    below, and camserve keeps the paper's zero). Channels not ablated (``max_channels``: the
    most active ones are) get no weight, as pytorch-grad-cam's skipped channels. A chunk of
    ablated forwards at a time, as Score-CAM's."""
    acts = c.activations
    channels = _top_channels(acts, c.max_channels)
    original = c.score(c.original)[0]
    drops = []
    for start in range(0, len(channels), c.chunk):
        chunk = channels[start:start + c.chunk]
        ablated = acts[None].repeat(len(chunk), 1, 1, 1)
        ablated[torch.arange(len(chunk), device=acts.device), chunk] = 0
        drops.append(c.score(c.replaced(ablated)))
        yield len(chunk)
    weights = torch.zeros(acts.shape[0], device=acts.device, dtype=acts.dtype)
    weights[channels] = ((original - torch.cat(drops)) / original).to(acts.dtype)
    return _terms(weights[None], acts[None])[0]


def random_map(c: CamInputs) -> torch.Tensor:
    """Not a CAM: uniform noise at the layer's grid, seeded by the image itself, so the same
    image always gets the same map. A baseline for the faithfulness scores."""
    n, _, h, w = c.activations.shape
    maps = []
    for i in range(n):
        seed = int(torch.sum(c.inputs[i].double() * 1000).item()) % (2**31)
        generator = torch.Generator().manual_seed(seed)
        maps.append(torch.rand(h, w, generator=generator))
    return torch.stack(maps).to(c.activations.device, c.activations.dtype)


CAM_METHODS: Dict[str, CamMethod] = {
    method.name: method for method in (
        CamMethod("gradcam", gradcam),
        CamMethod("gradcam_plus_plus", gradcam_plus_plus),
        CamMethod("xgradcam", xgradcam),
        CamMethod("layercam", layercam),
        CamMethod("hirescam", hirescam),
        CamMethod("eigencam", eigencam),
        CamMethod("eigengradcam", eigengradcam),
        CamMethod("gradcam_elementwise", gradcam_elementwise),
        CamMethod("fem", fem),
        CamMethod("kpca_cam", kpca_cam),
        CamMethod("guided_backprop", guided_backprop),
        CamMethod("guided_gradcam", guided_gradcam),
        # Grad-CAM of its own target (domain.METHODS)
        CamMethod("finercam", gradcam),
        CamMethod("shapleycam", shapleycam),
        CamMethod("ablationcam", None, slices=ablationcam_slices),
        CamMethod("fullgrad", fullgrad),
        CamMethod("scorecam", None, slices=scorecam_slices),
        CamMethod("random", random_map),
    )
}


def finish_map(method: CamMethod, out: torch.Tensor, eigen_smooth: bool) -> torch.Tensor:
    """A method's map from what it computed for n images: the terms summed over the channels,
    or with ``eigen_smooth`` their first principal component (oriented to correlate with that
    sum); a map as it is."""
    if not method.terms:
        return out
    return principal_component(out, out.sum(dim=1)) if eigen_smooth else out.sum(dim=1)
