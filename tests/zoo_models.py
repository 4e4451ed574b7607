"""Small seeded classifiers of many families, for tests/test_zoo.py (served as
``python:zoo_models:NAME``; tests/ is on the path). Nothing downloads: torchvision and timm
build them with random weights at small widths and depths, seeded, with their batch norms'
statistics calibrated on noise images so that their maps are not near zero."""

from __future__ import annotations

import torch
from torch import nn


def calibrated(model: nn.Module, size=(224, 224), seed: int = 0) -> nn.Module:
    """``model`` in eval mode, its batch norms' running statistics measured on a few noise
    images (cumulative averages), and its LayerNorms and layer scales given non-trivial values,
    so that activations and gradients are neither zero nor exploding."""
    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            for attr in ("gamma", "layer_scale"):
                gamma = getattr(module, attr, None)  # timm's and torchvision's layer scales
                if isinstance(gamma, nn.Parameter):
                    gamma.uniform_(0.5, 1.5)
        if norms:
            for norm in norms:
                if norm.affine and not norm.weight.any():  # a residual branch's zero-init
                    norm.weight.uniform_(0.1, 0.3)
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the batches
            model.train()
            for _ in range(2):
                model(torch.randn(4, 3, *size))
            for norm in norms:  # a channel nearly constant on noise would amplify rounding
                norm.running_var.clamp_(min=0.05)
    return model.eval()


def _tv(name: str, **kwargs) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def tv_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return calibrated(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10))


def tv_densenet():
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    return calibrated(DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                               bn_size=2, num_classes=10))


def tv_vgg():
    from torchvision.models.vgg import VGG, make_layers

    torch.manual_seed(0)
    cfg = [8, "M", 16, "M", 16, "M", 32, "M", 512, "M"]
    return calibrated(VGG(make_layers(cfg, batch_norm=True), num_classes=10))


def tv_squeezenet():
    return calibrated(_tv("squeezenet1_1"))


def tv_mobilenet_v2():
    return calibrated(_tv("mobilenet_v2", width_mult=0.25))


def tv_mobilenet_v3():
    return calibrated(_tv("mobilenet_v3_small", width_mult=0.25))


def tv_shufflenet():
    return calibrated(_tv("shufflenet_v2_x0_5"))


def tv_mnasnet():
    return calibrated(_tv("mnasnet0_5"))


def tv_regnet():
    from torchvision.models.regnet import BlockParams, RegNet

    torch.manual_seed(0)
    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8)
    return calibrated(RegNet(params, num_classes=10))


def tv_efficientnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    torch.manual_seed(0)
    settings = [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1),
                MBConvConfig(4, 5, 2, 16, 24, 1), MBConvConfig(4, 3, 2, 24, 32, 1),
                MBConvConfig(4, 3, 2, 32, 48, 1)]
    return calibrated(EfficientNet(settings, 0.0, num_classes=10, last_channel=64))


def tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    settings = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 48, 1), CNBlockConfig(48, 64, 1),
                CNBlockConfig(64, None, 1)]
    return calibrated(ConvNeXt(settings, num_classes=10))


def tv_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=224, patch_size=32, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():  # torchvision starts the head at zero: no gradient would flow
        nn.init.normal_(model.heads.head.weight, std=0.2)
    return calibrated(model)


def tv_swin():
    from torchvision.models import SwinTransformer

    torch.manual_seed(0)
    return calibrated(SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1],
                                      num_heads=[1, 1, 1, 1], window_size=[7, 7],
                                      stochastic_depth_prob=0.0, num_classes=10))


def tv_maxvit():
    from torchvision.models import MaxVit

    torch.manual_seed(0)
    return calibrated(MaxVit(input_size=(224, 224), stem_channels=8, partition_size=7,
                             block_channels=[8, 16, 16, 32], block_layers=[1, 1, 1, 1],
                             head_dim=8, stochastic_depth_prob=0.0, num_classes=10))


def timm_resnet():
    return calibrated(_timm("resnet10t"))


def timm_mobilenetv3():
    return calibrated(_timm("mobilenetv3_small_050"))


def timm_convnext():
    return calibrated(_timm("convnext_atto", dims=(16, 24, 32, 48), depths=(1, 1, 1, 1)))


def timm_regnet():
    return calibrated(_timm("regnetx_002"))


def timm_regnetz():
    """timm's RegNetZ-005 layout (SE, linear bottleneck outputs, a 1x1 final_conv to 1024
    channels) at depth 5 with width multiplier 1.5 (so that it keeps 4 stages): at its full
    depth of 21, seeded weights grow the residual stream until float32 rounding alone moves
    the logits by 0.6%."""
    from dataclasses import replace

    from timm.models.regnet import RegNet, model_cfgs

    torch.manual_seed(0)
    return calibrated(RegNet(replace(model_cfgs["regnetz_005"], depth=5, wm=1.5), num_classes=10))


def timm_vit():
    return calibrated(_timm("vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=2))


def timm_deit():
    return calibrated(_timm("deit_tiny_distilled_patch16_224", depth=2, embed_dim=48,
                            num_heads=2))


def timm_swin():
    return calibrated(_timm("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 2),
                            num_heads=(1, 1, 1, 1)))


def timm_coat():
    return calibrated(_timm("coat_tiny", embed_dims=(16, 32, 32, 32), serial_depths=(1, 1, 1, 1),
                            parallel_depth=2, num_heads=8))


def timm_mobilevit():
    return calibrated(_timm("mobilevit_xxs"), size=(256, 256))
