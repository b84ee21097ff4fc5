"""VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", 2014).

torchvision layout: ``features`` (convs, optional batch norms, ReLUs and max pools in one
nn.Sequential, numbered in order), ``avgpool`` (adaptive, to 7x7) and ``classifier`` (fc6, fc7, fc8 at
indices 0, 3 and 6). Its state dicts load unchanged.

Shapes: N images; an input [N, 3, H, W] gives [N, 512, H/32, W/32] after ``features``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["VGG", "VGG_LAYERS", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
           "vgg19_bn"]

# Architecture table (the paper's configurations A, B, D, E): output channels of each 3x3 conv,
# one tuple per block; every block ends with a 2x2 max pool. Parameter counts with 1000 classes:
# vgg11 132,863,336 (_bn 132,868,840); vgg13 133,047,848 (_bn 133,053,736);
# vgg16 138,357,544 (_bn 138,365,992); vgg19 143,667,240 (_bn 143,678,248).
VGG_LAYERS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
    """Stacks of 3x3 convs and max pools, then fc6 (4096), fc7 (4096) and fc8 (num_classes).

    Args:
        blocks: output channels of each conv, one tuple per block (a ``VGG_LAYERS`` entry).
        batch_norm: put a BatchNorm2d after every conv (the ``_bn`` variants).
        num_classes: size of fc8.
        dropout: dropout probability after fc6 and fc7.

    Attributes:
        block_channels: output channels of each block.
        block_relu_index: index in ``features`` of the last ReLU of each block ("conv1".."conv5").
        block_pool_index: index in ``features`` of each block's max pool ("pool1".."pool5").
    """

    def __init__(self, blocks: Sequence[Sequence[int]], batch_norm: bool = False, num_classes: int = 1000, *,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        relu_index, pool_index = [], []
        in_ch = 3
        for block in blocks:
            for out_ch in block:
                layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_ch))
                layers.append(nn.ReLU(inplace=True))
                in_ch = out_ch
            relu_index.append(len(layers) - 1)
            pool_index.append(len(layers))
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.block_channels: tuple[int, ...] = tuple(block[-1] for block in blocks)
        self.block_relu_index: tuple[int, ...] = tuple(relu_index)
        self.block_pool_index: tuple[int, ...] = tuple(pool_index)
        # Fixed 7x7 grid so fc6 keeps its 25088 inputs at any image size (224 gives 7x7 already).
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        # _init_weights overwrites the fc layers' default init; skipping it saves about 0.7 s on fc6's
        # 103M weights every time a VGG is built.
        self.classifier = nn.Sequential(
            nn.utils.skip_init(nn.Linear, in_ch * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.utils.skip_init(nn.Linear, 4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.utils.skip_init(nn.Linear, 4096, num_classes),
        )  # fc6, fc7, fc8
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] normalised images -> [N, num_classes] logits."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(arch: str, batch_norm: bool, num_classes: int, dropout: float) -> VGG:
    net = VGG(VGG_LAYERS[arch], batch_norm, num_classes, dropout=dropout)
    net.arch = f"{arch}_bn" if batch_norm else arch  # lets weight loading find the named sources
    return net


def vgg11(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-11 (configuration A): 8 convs + 3 fc."""
    return _vgg("vgg11", False, num_classes, dropout)


def vgg11_bn(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-11 with batch norm after every conv."""
    return _vgg("vgg11", True, num_classes, dropout)


def vgg13(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-13 (configuration B): 10 convs + 3 fc."""
    return _vgg("vgg13", False, num_classes, dropout)


def vgg13_bn(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-13 with batch norm after every conv."""
    return _vgg("vgg13", True, num_classes, dropout)


def vgg16(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-16 (configuration D): 13 convs + 3 fc."""
    return _vgg("vgg16", False, num_classes, dropout)


def vgg16_bn(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-16 with batch norm after every conv."""
    return _vgg("vgg16", True, num_classes, dropout)


def vgg19(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-19 (configuration E): 16 convs + 3 fc."""
    return _vgg("vgg19", False, num_classes, dropout)


def vgg19_bn(num_classes: int = 1000, *, dropout: float = 0.5) -> VGG:
    """VGG-19 with batch norm after every conv."""
    return _vgg("vgg19", True, num_classes, dropout)
