"""The torch-free types every layer passes along: handler → batcher → engine → response.

Validation (``api``) and scheduling (``batching``) work on these values alone, so neither
imports torch; only ``engine`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Generator, Optional, Tuple, Union

import numpy as np

# --- the model, as the API describes it ------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """A layer that may be explained; its map has the layer's grid (height x width)."""

    name: str
    channels: int
    height: int
    width: int
    # How the layer's output holds that grid: "nchw" (batch, channels, height, width), as a
    # conv layer; "tokens" (batch, prefix_tokens + height*width, channels), as a ViT block,
    # whose first prefix_tokens tokens (class, distillation, register tokens) are no patch;
    # "nhwc" (batch, height, width, channels), as a Swin stage.
    layout: str = "nchw"
    prefix_tokens: int = 0
    # Why the server serves this layer: the default rule's reason, or "named by --layer".
    reason: str = ""


@dataclass(frozen=True)
class ModelCard:
    """What the served model is, without its weights: what validation and answers need."""

    name: str
    labels: Tuple[str, ...]
    input_size: Tuple[int, int]  # (height, width)
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    layers: Tuple[LayerInfo, ...]  # explainable layers; the first is the default
    device: str  # "cpu", "cuda:0"; several devices (one engine each): "cuda:0,cuda:1"
    # The model has ReLU (or ReLU6) modules, whose backward guided backpropagation guides: the
    # guided methods serve it (a GELU-only transformer has none).
    guided: bool = False
    # "softmax" or "sigmoid" (multi-label): how the logits become the answers' probabilities
    output_activation: str = "softmax"

    @property
    def embeds(self) -> bool:
        """Its outputs are an embedding, not classes: Predict answers the vector, Explain the
        similarity to a concept."""
        return self.output_activation == "embedding"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def devices(self) -> Tuple[str, ...]:
        return tuple(self.device.split(","))

    @property
    def default_layer(self) -> Optional[str]:
        return self.layers[0].name if self.layers else None

    def layer(self, name: str) -> Optional[LayerInfo]:
        return next((info for info in self.layers if info.name == name), None)


@dataclass(frozen=True)
class MethodTraits:
    """What a CAM method needs and what its maps can be trusted for."""

    needs_backward: bool  # a partial backward, from the target to the explained layer
    class_discriminative: bool  # a different class gives a different map
    # A backward to the input through guided ReLUs (its own forward and full backward): the
    # map has the input's resolution, not the layer's grid.
    guided: bool = False
    second_order: bool = False  # a Hessian-vector product after its backward
    # One forward per channel of the layer (score_cam_channels of them), run in slices
    channel_forwards: bool = False
    # A backward to the input and every bias layer (its own forward and full backward): the
    # map has the input's resolution
    full_gradient: bool = False
    # The map is a sum over the layer's channels of terms (w_k A_k, or element-wise products):
    # eigen_smooth applies (their first principal component instead)
    channel_sum: bool = False

    @property
    def input_resolution(self) -> bool:
        """Its maps have the model's input size, not the layer's grid."""
        return self.guided or self.full_gradient
    target_kind: Optional[str] = None  # a target of its own (a key of TARGET_KINDS)


# Every method the engine implements (``engine/cams.py`` has one function per name; a test
# checks that the two lists agree and match the proto enum ``CamMethod``). Positional traits:
# (needs_backward, class_discriminative).
METHODS: Dict[str, MethodTraits] = {
    "gradcam": MethodTraits(True, True, channel_sum=True),
    "gradcam_plus_plus": MethodTraits(True, True, channel_sum=True),
    "xgradcam": MethodTraits(True, True, channel_sum=True),
    "layercam": MethodTraits(True, True, channel_sum=True),
    "hirescam": MethodTraits(True, True, channel_sum=True),
    "eigencam": MethodTraits(needs_backward=False, class_discriminative=False),
    "scorecam": MethodTraits(False, True, channel_forwards=True, channel_sum=True),
    "random": MethodTraits(needs_backward=False, class_discriminative=False),
    "eigengradcam": MethodTraits(needs_backward=True, class_discriminative=True),
    "gradcam_elementwise": MethodTraits(True, True, channel_sum=True),
    "fem": MethodTraits(needs_backward=False, class_discriminative=False),
    "kpca_cam": MethodTraits(needs_backward=False, class_discriminative=False),
    "guided_backprop": MethodTraits(needs_backward=False, class_discriminative=True,
                                    guided=True),
    "guided_gradcam": MethodTraits(needs_backward=True, class_discriminative=True, guided=True),
    "finercam": MethodTraits(True, True, target_kind="finer", channel_sum=True),
    "shapleycam": MethodTraits(True, True, second_order=True, channel_sum=True),
    "ablationcam": MethodTraits(False, True, channel_forwards=True, channel_sum=True),
    "fullgrad": MethodTraits(needs_backward=False, class_discriminative=True,
                             full_gradient=True),
}

# The scores of a class that a map can explain (the proto enum TargetKind's values, lower-cased
# without their prefix; ``engine/targets.py`` computes them).
TARGET_KINDS = ("logit", "softmax", "rest", "raw_scores", "finer", "sigmoid", "similarity")
# The target kinds that read the logits as one softmax over the classes: a sigmoid
# (multi-label) model's logits are not that
SOFTMAX_KINDS = ("softmax", "rest", "finer")


# aug_smooth's copies of an image, as pytorch-grad-cam's default test-time augmentation
# (ttach: HorizontalFlip x Multiply([0.9, 1, 1.1]) on the normalised input): (flipped, factor).
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (1.0, 0.9, 1.1))


# --- a request, once validated ---------------------------------------------------------------


@dataclass(frozen=True)
class RawPixels:
    """Raw uint8 pixels as a caller sent them (not checked yet)."""

    pixels: bytes
    height: int
    width: int
    channels: int


Source = Union[bytes, RawPixels]  # an image as it came in: encoded file bytes or raw pixels


@dataclass(frozen=True)
class ExplainSpec:
    """What to explain for one image: every method x target x layer."""

    methods: Tuple[str, ...] = ("gradcam",)  # keys of METHODS
    layers: Tuple[str, ...] = ()  # explainable layers of the model
    targets: Tuple[int, ...] = ()  # class indices; empty: the top_targets best classes
    top_targets: int = 1
    counterfactual: bool = False  # negated gradients
    signed: bool = False  # no final ReLU
    score_cam_channels: int = 0  # Score-/AblationCAM: top channels by mean activation (0: all)
    faithfulness_steps: int = 0  # deletion/insertion scores in this many steps (0: off)
    target_kind: str = "logit"  # the score explained (TARGET_KINDS)
    eigen_smooth: bool = False  # the terms' first principal component instead of their sum
    aug_smooth: bool = False  # the mean heatmap of 6 flipped and scaled copies (AUGMENTATIONS)
    concept: Tuple[float, ...] = ()  # the similarity target's vector (target_kind similarity)
    road_percentiles: Tuple[int, ...] = ()  # ROAD scores at these percentiles (empty: none)

    def kind(self, method: str) -> str:
        """The score ``method``'s maps explain: its own target, or the spec's."""
        return METHODS[method].target_kind or self.target_kind

    @property
    def ranks(self) -> int:
        """Target classes per image: one partial backward each."""
        return len(self.targets) or self.top_targets

    @property
    def extra_cost(self) -> int:
        """Forwards beyond the batch's own forward and backward: one per channel of every
        Score-CAM and AblationCAM map, 2 (steps + 1) per map for faithfulness, 2 per ROAD
        percentile per map. The engine runs
        them in slices between batches (validation resolves score_cam_channels to a count
        first)."""
        ranks, layers = self.ranks, len(self.layers)
        cost = 0
        per_channel = sum(METHODS[m].channel_forwards for m in self.methods)
        cost += per_channel * ranks * layers * self.score_cam_channels
        if self.faithfulness_steps:
            cost += len(self.methods) * ranks * layers * 2 * (self.faithfulness_steps + 1)
        cost += len(self.methods) * ranks * layers * 2 * len(self.road_percentiles)
        return cost

    @property
    def guided(self) -> bool:
        """A method needs the guided backward to the input."""
        return any(METHODS[m].guided for m in self.methods)

    @property
    def cost(self) -> int:
        """What one image's explanation costs the engine, in forwards of one image: the
        forward, a partial backward per target rank (counted as a forward) when a method
        needs it, for the guided methods and for FullGrad a forward of their own and a full
        backward to the input per target rank (counted as two forwards), and the extra
        forwards."""
        backward = self.ranks if any(METHODS[m].needs_backward for m in self.methods) else 0
        full = 1 + 2 * self.ranks  # a pass of their own: a forward, a full backward per rank
        passes = self.guided + any(METHODS[m].full_gradient for m in self.methods)
        one = 1 + backward + passes * full
        # aug_smooth: the copies' explanations too, in the same batch
        return one * (1 + len(AUGMENTATIONS) if self.aug_smooth else 1) + self.extra_cost


@dataclass(frozen=True)
class Outputs:
    """Which renderings an explanation carries besides its raw maps."""

    raw_map: bool = True
    heatmap_png: bool = False
    overlay_format: Optional[str] = None  # "jpeg", "png" or None

    @property
    def needs_heatmap(self) -> bool:
        return self.heatmap_png or self.overlay_format is not None


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header the handler checked (format, pixel limit) and whose pixels the
    engine decodes and resizes on its device, batched (``--jpeg-decode``; on CUDA by default)."""

    data: bytes
    size: Tuple[int, int]  # (height, width), from the header


@dataclass(frozen=True)
class DeferredDecode:
    """An image the batcher's worker decodes itself, just before the item's batch, instead of
    the handler's decode pool: what a lone request on an idle worker sends (two thread
    hand-offs fewer). ``decode()`` returns the pixels (what the pool's decode would have given
    the WorkItem) or raises the error the item answers with."""

    decode: Callable[[], Union[np.ndarray, EncodedJpeg]]


@dataclass(frozen=True)
class WorkItem:
    """One image for the engine: the batcher's unit of work."""

    # uint8 (height, width, 3) RGB at the model's input size, or a JPEG the engine decodes;
    # a DeferredDecode only until the batcher's worker replaces it with one of those
    pixels: Union[np.ndarray, EncodedJpeg, DeferredDecode]
    explain: Optional[ExplainSpec] = None


# --- what the engine answers -----------------------------------------------------------------


@dataclass(frozen=True)
class MapResult:
    method: str
    target: int
    layer: str
    raw: np.ndarray  # float32 (h, w) at the layer's grid
    deletion: Optional[float] = None  # faithfulness scores, when asked for
    insertion: Optional[float] = None
    steps: int = 0
    # ROAD, when asked for: the mean MoRF and LeRF changes and the combined score
    road: Optional[Tuple[float, float, float]] = None
    target_kind: str = "logit"  # the score explained
    # The target's gradient at the layer is zero everywhere (the score does not reach it: a
    # transformer's patch tokens after its last attention block), so the map is too.
    no_gradient: bool = False


@dataclass(frozen=True)
class ItemResult:
    logits: np.ndarray  # float32 (classes,)
    probabilities: np.ndarray  # float32 (classes,)
    maps: Tuple[MapResult, ...] = ()  # methods x targets x layers, in that nesting order


# An explanation that needs extra forwards (Score-CAM channels, faithfulness steps) answers its
# batch with a job: a generator that the batcher advances one slice at a time, between batches.
# Each slice runs up to SLICE_FORWARDS images through the model and yields how many it ran; the
# generator returns the item's ItemResult (or the ServiceError it fails with).
Job = Generator[int, None, "ItemResult"]
SLICE_FORWARDS = 16


# --- sanity checks (engine/sanity.py) ----------------------------------------------------------


@dataclass(frozen=True)
class SanityPlan:
    """A sanity check, validated: which methods at which layer, and how it is judged."""

    methods: Tuple[str, ...]
    layer: str
    score_cam_channels: int = 0  # resolved to a count, as in ExplainSpec
    contrast_rank: int = 1  # class discrimination: the top class against this rank's class
    stages: int = 4  # of the cascading randomisation, from the top (engine/sanity.py)
    seed: int = 0  # the randomised parameters
    threshold: float = 0.5  # a method passes a check when its correlation is below this

    @property
    def cost(self) -> int:
        """What one image costs, in forwards of one image: a forward for its ranking, then
        per model (the trained one and each stage) an explanation of its two classes."""
        one = ExplainSpec(methods=self.methods, layers=(self.layer,), targets=(0, 1),
                          score_cam_channels=self.score_cam_channels).cost
        return 1 + (1 + self.stages) * one


SANITY_STAGES = 4  # the cascade's stages at most: the head, then 2, 4 and 8 modules more


@dataclass(frozen=True)
class SanityStage:
    """A stage of the cascading randomisation: the modules randomised so far."""

    name: str
    modules: Tuple[str, ...]


@dataclass(frozen=True)
class MethodSanity:
    method: str
    randomisation: Tuple[float, ...]  # mean |Spearman| trained vs randomised, per stage
    randomisation_pass: bool  # below the threshold at the verdict stage
    discrimination: float  # mean Spearman, top class vs the contrast class
    discrimination_pass: bool


@dataclass(frozen=True)
class SanityReport:
    layer: str
    stages: Tuple[SanityStage, ...]
    verdict_stage: int  # the stage whose figures decide the randomisation verdict
    threshold: float
    classes: Tuple[Tuple[int, int], ...]  # per image: (top class, contrast class)
    methods: Tuple[MethodSanity, ...]
    seed: int = 0

    def method(self, name: str) -> MethodSanity:
        return next(m for m in self.methods if m.method == name)
