"""The from-scratch CNN: a few conv blocks, average pooling and a linear head. Small enough to train on a CPU."""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchWhitening", "SmallCNN", "conv_block"]

WHITEN_PATCH = 2  # airbench's 2x2 patches: 4 values per channel
WHITEN_EPS = 5e-4  # added to the eigenvalues, so near-constant directions are not blown up


class PatchWhitening(nn.Module):
    """A frozen first layer whose filters whiten the image's 2x2 patches (airbench's first layer for CIFAR-10).

    `fit(images)` sets the filters from the training images: the eigenvectors of the patches' covariance, each
    scaled by 1/sqrt(its eigenvalue), and their negatives (so a ReLU-like activation after it loses nothing).
    The filters are a buffer (saved with the weights, never trained); the bias trains. The output has the input's
    size (the image's last row and column are repeated for the 2x2 windows). Until fitted, the filters pass each
    pixel of the patch through, and its negative, so a layer built without `fit` still gives a working network.
    """

    def __init__(self, in_chans: int, patch: int = WHITEN_PATCH) -> None:
        super().__init__()
        dims = in_chans * patch * patch
        pixels = torch.eye(dims).reshape(dims, in_chans, patch, patch)
        self.register_buffer("weight", torch.cat((pixels, -pixels)))
        self.bias = nn.Parameter(torch.zeros(2 * dims))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the filters from normalized training images [N, C, H, W] (a few thousand are plenty)."""
        channels, patch = self.weight.shape[1], self.weight.shape[-1]
        patches = images.float().unfold(2, patch, 1).unfold(3, patch, 1)  # N, C, H', W', p, p
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * patch * patch)
        covariance = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        scaled = eigenvectors.T.reshape(-1, channels, patch, patch) / torch.sqrt(eigenvalues.view(-1, 1, 1, 1) + eps)
        self.weight.copy_(torch.cat((scaled, -scaled)).to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the last row and column repeated, so the map keeps the image's size (every block's pooling then halves it
        # as without this layer, down to depth 5 at 32 px)
        x = F.pad(x, (0, 1, 0, 1), mode="replicate")
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


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
        whiten: start with `PatchWhitening` (+ GELU), fitted to the training images before training
            (`PatchWhitening.fit`, from `builders.whitening_sample`).
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
        whiten: bool = False,
    ):
        super().__init__()
        if not 3 <= depth <= 5:
            raise ValueError(f"small_cnn depth must be 3 to 5; received {depth}")
        self.whiten = PatchWhitening(in_chans) if whiten else None
        first = self.whiten.out_channels if self.whiten is not None else in_chans
        channels = [first] + [width * 2**i for i in range(depth)]
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
        self.in_chans = in_chans  # the image's channels (the first conv reads more where the whitening layer is)

    # The parts of timm's model interface that fine-tuning uses: where the head and the stem are, and layer groups.
    pretrained_cfg: ClassVar[dict[str, str]] = {"classifier": "head", "first_conv": "features.0.0"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups in timm's format: one per conv block; the head, unmatched, comes last."""
        return {"blocks": r"^features\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (timm's name for it), from the image."""
        if self.whiten is not None:
            x = F.gelu(self.whiten(x))
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.head(self.dropout(x))
