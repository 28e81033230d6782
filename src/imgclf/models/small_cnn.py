"""The from-scratch CNN: a few conv blocks, average pooling and a linear head. Small enough to train on a CPU."""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
from torch import nn

__all__ = ["SmallCNN", "conv_block"]


def conv_block(in_channels: int, out_channels: int, convs: int = 2, *, early_pool: bool = False) -> nn.Sequential:
    """`convs` 3x3 conv + BatchNorm + ReLU layers and one 2x2 max pooling that halves the resolution.

    The pooling comes after the last layer, or with `early_pool` right after the first conv (before its
    BatchNorm), so that the block's other convs run at half the resolution: a quarter of their FLOPs.
    """

    def conv_bn_relu(channels_in: int) -> list[nn.Module]:
        conv = nn.Conv2d(channels_in, out_channels, 3, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]

    layers = [layer for i in range(convs) for layer in conv_bn_relu(in_channels if i == 0 else out_channels)]
    layers.insert(1 if early_pool else len(layers), nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """`depth` conv blocks of width `width`, 2*width, 4*width, ... then average pooling and a linear head.

    The first block, at full resolution, has one conv; the others two. A second full-resolution conv would cost
    40 % of the network's FLOPs for little accuracy (on Fashion-MNIST: 1.3x the speed for the same accuracy).
    With `early_pool` each block pools right after its first conv (airbench's layout for CIFAR-10): half the
    FLOPs of pooling at the end (Fashion-MNIST, 12 epochs: ~1.8x the speed, ~0.3 points less accuracy).
    Widths that are multiples of 16 keep oneDNN and cuDNN on their fast kernels (24/48/96 ran slower than
    32/64/128 on this project's 2-core CPU).

    Args:
        num_classes: outputs of the head.
        in_chans: 1 for grayscale, 3 for RGB.
        depth: number of conv blocks, 3 to 5.
        width: channels of the first block; doubled per block.
        dropout: dropout before the head.
        pool: the last feature map is average-pooled to pool x pool cells, flattened into the head: 1 is global
            average pooling (any position); 2 keeps where things are, which centred, aligned images (Fashion-MNIST)
            use.
        early_pool: pool after each block's first conv instead of after its last (see `conv_block`).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        depth: int = 3,
        width: int = 32,
        dropout: float = 0.1,
        pool: int = 1,
        early_pool: bool = False,
    ):
        super().__init__()
        if not 3 <= depth <= 5:
            raise ValueError(f"small_cnn depth must be 3 to 5; received {depth}")
        channels = [in_chans] + [width * 2**i for i in range(depth)]
        self.features = nn.Sequential(
            *(
                conv_block(a, b, convs=1 if i == 0 else 2, early_pool=early_pool)
                for i, (a, b) in enumerate(itertools.pairwise(channels))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels[-1] * pool * pool, num_classes)
        self.num_classes = num_classes

    # The parts of timm's model interface that fine-tuning uses: where the head and the stem are, and layer groups.
    pretrained_cfg: ClassVar[dict[str, str]] = {"classifier": "head", "first_conv": "features.0.0"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups in timm's format: one per conv block; the head, unmatched, comes last."""
        return {"blocks": r"^features\.(\d+)"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))
