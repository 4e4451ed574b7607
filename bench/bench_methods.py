"""Every CAM method camserve serves, in process at batch 8: camserve's engine beside
pytorch-grad-cam's own class for the same method (and Captum's GuidedGradCam for Guided
Grad-CAM) and a plain forward of the same model, with the ratios the targets are set on.

For each method of camserve's registry (``camserve_server.domain.METHODS``, in its order;
``--methods`` picks some), in this process (no server), on ``torchvision:resnet18`` with seeded
random weights (``--model``) at its default layer (layer4; ``--layer``), on the benchmarks' photo
(tests/data/chelsea.jpg) decoded and resized once and repeated 8 times, top-1 target, on one
thread with the server's torch thread count, it measures images/s at batch 8 of:

* camserve's engine explaining the batch with that method alone (its raw maps, as Explain
  answers them: the layer's grid; the input's for the guided methods and FullGrad);
* pytorch-grad-cam 1.5.7's class for the method (``PGC`` below) called on the same images,
  targets and layer, returning what its call returns (maps min-max scaled at the input's size),
  on the model as its users build it: as built, without the server's rewrites at load (folded
  batch norms), in eval mode, parameters requiring grad; for Guided Grad-CAM also Captum's
  ``GuidedGradCam`` (bilinear upsampling) on its own copy of that model;
* a plain inference-mode forward of that model (and camserve's Predict), and each method's
  cost over the forward (forward images/s / method images/s), camserve's and
  pytorch-grad-cam's.

Score-CAM and AblationCAM run a forward per channel: both sides run ``--score-cam-channels``
of them per image (camserve's score_cam_channels; pytorch-grad-cam's ScoreCAM is given the same
channels by a subclass that passes it only those, its AblationCAM the same count through its
ratio_channels_to_ablate), ``SLICE_FORWARDS`` (16) images per forward. What cannot be made
equal is said in the row's note.

Every measurement is split into ``--rounds`` slices that take turns (the forward, then each
method's camserve, pytorch-grad-cam and Captum slices), so that a machine whose speed drifts
skews the ratios less: images/s is the median over the rounds, each ratio the median of the
per-round ratios. The targets: camserve >= 2 x pytorch-grad-cam for every method that
pytorch-grad-cam has, Guided Grad-CAM >= 1.5 x Captum. It reports and never fails on a time.
Nothing is downloaded.

    .venv/bin/python bench/bench_methods.py                         # every method, 10-15 minutes
    .venv/bin/python bench/bench_methods.py --quick                 # a short smoke run, 3 methods
    .venv/bin/python bench/bench_methods.py --methods scorecam,ablationcam --score-cam-channels 64
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

# pytorch-grad-cam's ScoreCAM and AblationCAM draw a tqdm progress bar per image (read when
# tqdm is first imported); the bars' cost stays, their output goes.
os.environ.setdefault("TQDM_DISABLE", "1")

import harness  # noqa: E402

DEFAULT_MODEL = "torchvision:resnet18"
QUICK_METHODS = ("gradcam", "guided_gradcam", "random")
PGC_GOAL, CAPTUM_GOAL = 2.0, 1.5

# camserve's method -> pytorch-grad-cam's class (as the table names it), and what the row says
# about how the two sides compare.
PGC: Dict[str, Tuple[str, str]] = {
    "gradcam": ("GradCAM", ""),
    "gradcam_plus_plus": ("GradCAMPlusPlus", ""),
    "xgradcam": ("XGradCAM", ""),
    "layercam": ("LayerCAM", ""),
    "hirescam": ("HiResCAM", ""),
    "eigencam": ("EigenCAM", ""),
    "scorecam": ("ScoreCAM", "both: {n} channels per image, those of highest mean activation"),
    "random": ("RandomCAM", "not the same map (no goal): pytorch-grad-cam's weighs the channels "
                            "at random after a backward, camserve's draws a seeded grid without "
                            "one"),
    "eigengradcam": ("EigenGradCAM", ""),
    "gradcam_elementwise": ("GradCAMElementWise", ""),
    "fem": ("FEM", ""),
    "kpca_cam": ("KPCA_CAM", ""),
    "guided_backprop": ("GuidedBackpropReLUModel", "pytorch-grad-cam's takes one image per "
                                                   "call: 8 calls"),
    "guided_gradcam": ("GradCAM x GuidedBackpropReLUModel",
                       "pytorch-grad-cam: its tutorial's recipe (GradCAM on the batch, "
                       "GuidedBackpropReLUModel per image, their product; no deprocess_image); "
                       "Captum: GuidedGradCam, bilinear"),
    "finercam": ("FinerCAM", "pytorch-grad-cam's FinerCAM(GradCAM) picks its own targets"),
    "shapleycam": ("ShapleyCAM", ""),
    "ablationcam": ("AblationCAM", "both: {n} channels per image, chosen otherwise: camserve "
                                   "the most active, pytorch-grad-cam by its SVD heuristic "
                                   "(ratio_channels_to_ablate, half top, half bottom); its "
                                   "ablated forwards skip layer4 itself"),
    "fullgrad": ("FullGrad", "every bias layer on both sides (the layer does not count)"),
}


def parse_args(argv=None):
    from camserve_server.domain import METHODS

    p = harness.parser(__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model source (default %(default)s, seeded random weights)")
    p.add_argument("--layer", help="the layer explained (default: the model's default layer)")
    p.add_argument("--methods", help="comma list of camserve's methods (default: all of "
                   f"{', '.join(METHODS)}; --quick: {', '.join(QUICK_METHODS)})")
    p.add_argument("--seconds", type=float,
                   help="per side and method, over all rounds (default 3; --quick: 0.5)")
    p.add_argument("--warmup", type=float, default=0.3,
                   help="warm-up seconds before each slice, after its first batch "
                   "(default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--score-cam-channels", type=int, default=32,
                   help="Score-CAM and AblationCAM channels per image, both sides (0: all; "
                   "even: pytorch-grad-cam's AblationCAM ablates as many of its worst channels "
                   "as of its best; default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a short smoke run: "
                   f"{', '.join(QUICK_METHODS)} unless --methods, 1 round, 0.5 s, no warm-up")
    args = p.parse_args(argv)
    names = args.methods.split(",") if args.methods else (
        QUICK_METHODS if args.quick else tuple(METHODS))
    args.methods = [m.strip() for m in names if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: {', '.join(unknown) or 'none'}: choose from {', '.join(METHODS)}")
    if args.rounds < 1 or args.score_cam_channels < 0 or args.score_cam_channels % 2:
        p.error("--rounds must be at least 1, --score-cam-channels even and not negative")
    if args.quick:
        args.warmup, args.rounds = 0.0, 1
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else 3.0
    return args


class References:
    """The model as its users build it, the batch as camserve's engine sees it, and for each
    method a fresh pytorch-grad-cam (or Captum) caller. Built and run on the engine's thread."""

    def __init__(self, inproc: harness.InProcess, layer: str, channels: int) -> None:
        import numpy as np
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self.inproc, self.layer, self.channels = inproc, layer, channels
        device = inproc.served.device
        pixels = torch.from_numpy(np.stack([inproc.pixels] * harness.BATCH)).to(device)
        self.x = inproc.engine.normalise(pixels).contiguous()  # (8, 3, H, W), normalised
        self.model = self.user_model()  # every method's but the guided ones'
        with torch.inference_mode():
            self.classes = self.model(self.x).argmax(dim=1).tolist()  # top-1, as Explain
        self.targets = [ClassifierOutputTarget(c) for c in self.classes]
        self._guided_model = self._captum_model = None

    def user_model(self):
        """The same architecture and weights as built (no rewrites at load), in eval mode,
        with parameters that require grad."""
        module = harness.load_model(self.inproc.model, self.inproc.weights,
                                    self.inproc.served.device, fold_batchnorm=False,
                                    static_padding=False).module
        for param in module.parameters():
            param.requires_grad_(True)
        return module

    def _layer_of(self, module):
        return dict(module.named_modules())[self.layer]

    def forward(self) -> Callable[[], Any]:
        import torch

        def forward():
            with torch.inference_mode():
                return self.model(self.x)
        return forward

    def pgc(self, method: str) -> Tuple[Callable[[], Any], Callable[[], None]]:
        """pytorch-grad-cam's batch of 8 for ``method``, and what removes its hooks."""
        import pytorch_grad_cam as pgc

        from camserve_server.domain import METHODS, SLICE_FORWARDS

        if METHODS[method].guided:
            # GuidedBackpropReLUModel swaps the model's ReLUs in and out: a model of its own
            if self._guided_model is None:
                self._guided_model = self.user_model()
            model = self._guided_model
            backprop = pgc.GuidedBackpropReLUModel(model)

            def guided(i: int):  # (H, W, 3); a copy of the image, whose grad it sets
                return backprop(self.x[i:i + 1].clone(), self.classes[i])

            if method == "guided_backprop":
                return lambda: [guided(i) for i in range(len(self.classes))], lambda: None
            cam = pgc.GradCAM(model, [self._layer_of(model)])

            def guided_gradcam():
                heat = cam(input_tensor=self.x, targets=self.targets)
                return [heat[i][:, :, None] * guided(i) for i in range(len(self.classes))]
            return guided_gradcam, lambda: _release(cam)
        layers = [self._layer_of(self.model)]
        targets = self.targets
        if method == "scorecam":
            cam = _capped_score_cam(pgc.ScoreCAM)(self.model, layers, self.channels)
            cam.batch_size = SLICE_FORWARDS
        elif method == "ablationcam":
            kept = self.inproc.served.card.layer(self.layer).channels
            # It ablates the int(K x ratio) best and as many worst channels by its score.
            ratio = 1.0 if not self.channels or self.channels >= kept else \
                (self.channels // 2 + 0.5) / kept
            cam = pgc.AblationCAM(self.model, layers, batch_size=SLICE_FORWARDS,
                                  ratio_channels_to_ablate=ratio)
        elif method == "fullgrad":
            cam = pgc.FullGrad(self.model, [])  # every bias layer
        elif method == "finercam":
            cam, targets = pgc.FinerCAM(self.model, layers), None  # its own targets
        else:
            cam = getattr(pgc, PGC[method][0])(self.model, layers)
        return lambda: cam(input_tensor=self.x, targets=targets), lambda: _release(cam)

    def captum(self) -> Callable[[], Any]:
        """Captum's GuidedGradCam of the batch (bilinear), on a model of its own."""
        from captum.attr import GuidedGradCam

        if self._captum_model is None:
            self._captum_model = self.user_model()
        model = self._captum_model
        attribution = GuidedGradCam(model, self._layer_of(model))
        return lambda: attribution.attribute(self.x, target=self.classes,
                                             interpolate_mode="bilinear")


def _release(cam) -> None:
    """Removes a pytorch-grad-cam object's hooks (FinerCAM's are its base CAM's)."""
    hooks = getattr(cam, "base_cam", cam).activations_and_grads
    hooks.activations, hooks.gradients = [], []  # ShapleyCAM's are not detached
    hooks.release()


def _capped_score_cam(score_cam):
    """pytorch-grad-cam's ScoreCAM given only each image's ``channels`` channels of highest
    mean activation (camserve's score_cam_channels): its own masked forwards and softmax over
    those; the other channels weigh 0, as camserve's."""
    import numpy as np

    class CappedScoreCAM(score_cam):
        def __init__(self, model, target_layers, channels: int) -> None:
            super().__init__(model, target_layers)
            self.channels = channels

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            if not self.channels or self.channels >= activations.shape[1]:
                return super().get_cam_weights(input_tensor, target_layer, targets,
                                               activations, grads)
            top = np.argsort(-activations.mean(axis=(2, 3)), axis=1)[:, :self.channels]
            kept = np.take_along_axis(activations, top[:, :, None, None], axis=1)
            weights = super().get_cam_weights(input_tensor, target_layer, targets, kept, grads)
            full = np.zeros(activations.shape[:2], dtype=weights.dtype)
            np.put_along_axis(full, top, weights, axis=1)
            return full
    return CappedScoreCAM


def measure(args, results: harness.Results) -> None:
    from camserve_server.domain import METHODS, SLICE_FORWARDS, ExplainSpec, WorkItem

    inproc = harness.InProcess(args.model)
    layer = args.layer or inproc.layer
    card = inproc.served.card
    if card.layer(layer) is None:
        inproc.close()
        raise SystemExit(f"--layer {layer}: not one of {', '.join(i.name for i in card.layers)}")
    methods = [m for m in args.methods if card.guided or not METHODS[m].guided]
    skipped = [m for m in args.methods if m not in methods]
    refs: References = inproc.run_here(References, inproc, layer, args.score_cam_channels)
    engine, batch = inproc.engine, harness.BATCH
    seconds = args.seconds / args.rounds

    def timed(fn: Callable[[], Any]) -> float:
        return inproc.run_here(harness.time_batches, fn, batch, seconds,
                               args.warmup)["images_per_s"]

    def camserve(method: str) -> Callable[[], Any]:
        item = WorkItem(inproc.pixels, ExplainSpec(methods=(method,), layers=(layer,),
                                                   score_cam_channels=args.score_cam_channels))
        return lambda: engine.run([item] * batch)

    def reference(method: str) -> Optional[float]:
        if method not in PGC:
            return None
        fn, release = inproc.run_here(refs.pgc, method)
        try:
            return timed(fn)
        finally:
            inproc.run_here(release)

    baselines: Dict[str, List[float]] = {"forward b8 (as built)": [],
                                         "camserve Predict b8": []}
    rates: Dict[str, Dict[str, List[Optional[float]]]] = {
        m: {"camserve": [], "pgc": [], "captum": []} for m in methods}
    predict = inproc.items["Predict"]
    try:
        for _ in range(args.rounds):
            baselines["forward b8 (as built)"].append(timed(refs.forward()))
            baselines["camserve Predict b8"].append(timed(lambda: engine.run([predict] * batch)))
            for method in methods:
                rates[method]["camserve"].append(timed(camserve(method)))
                rates[method]["pgc"].append(reference(method))
                if method == "guided_gradcam":
                    rates[method]["captum"].append(timed(inproc.run_here(refs.captum)))
    finally:
        inproc.close()

    for label, runs in baselines.items():
        results.row(f"{args.model}: baselines at batch {batch}", case=label,
                    images_per_s=harness.median(runs), rounds=runs)
    forward = harness.median(baselines["forward b8 (as built)"])
    table = f"{args.model} at {layer}, batch {batch} (device {card.device})"
    missed = []
    channels = card.layer(layer).channels
    cap = args.score_cam_channels if 0 < args.score_cam_channels < channels else "all"
    for method in methods:
        ours = harness.median(rates[method]["camserve"])
        name, note = PGC.get(method, ("", "pytorch-grad-cam has no such method"))
        theirs = harness.median([r for r in rates[method]["pgc"] if r is not None])
        per_round = [c / p for c, p in zip(rates[method]["camserve"], rates[method]["pgc"])
                     if p]
        ratio = harness.median(per_round)
        captum = harness.median(rates[method]["captum"])
        vs_captum = harness.median([c / k for c, k in zip(rates[method]["camserve"],
                                                          rates[method]["captum"])])
        goals, passed = [], True
        if ratio is not None and method != "random":
            goals.append(f">= {PGC_GOAL:g} x pgc")
            passed = ratio >= PGC_GOAL
        if vs_captum is not None:
            goals.append(f">= {CAPTUM_GOAL:g} x Captum")
            passed = passed and vs_captum >= CAPTUM_GOAL
        if goals and not passed:
            missed.append(method)
        results.row(table, method=method, camserve_images_per_s=ours,
                    pytorch_grad_cam=name or None, pgc_images_per_s=theirs, ratio=ratio,
                    ratio_rounds=per_round or None,
                    camserve_cost=forward / ours if ours else None,
                    pgc_cost=forward / theirs if theirs else None,
                    captum_images_per_s=captum, ratio_captum=vs_captum,
                    goal=", ".join(goals) or None,
                    result=("PASS" if passed else "MISS") if goals else None,
                    note=note.format(n=cap) or None)
    results.note(f"{args.seconds:g} s per side and method over {args.rounds} round(s), "
                 f"{args.warmup:g} s warm-ups after each slice's first batch; ratio: camserve "
                 "images/s over pytorch-grad-cam's (ratio rounds: each round's), cost: the "
                 "plain forward's images/s over the method's; Score-CAM and AblationCAM: "
                 f"{args.score_cam_channels or 'all'} channels, {SLICE_FORWARDS} images per "
                 "forward.")
    if skipped:
        results.note(f"Not served for this model (no ReLU to guide): {', '.join(skipped)}.")
    results.note("Below the goal: " + (", ".join(missed) if missed else "none") + ".")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Captum says, each call, that it sets the input's requires_grad and hooks the ReLUs;
    # pytorch-grad-cam's AblationCAM divides an all-zero channel by its maximum.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"pytorch_grad_cam\.")
    results = harness.Results(__file__, argv, args)
    measure(args, results)
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
