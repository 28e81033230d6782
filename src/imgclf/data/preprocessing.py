"""Preprocessing that travels with the model, and the evaluation preprocessing itself, in NumPy and Pillow only.

Evaluation, prediction, the decoded cache, export checks and the ONNX Runtime path all turn a decoded image into
the model's input here: resize the shorter side to `img_size / crop_pct` with Pillow's antialiased filter (what
timm's and torchvision's eval transforms do to a PIL image), center-crop `img_size`, scale to 0..1, normalize.
No torch: a deployed ONNX model predicts with exactly these pixels without PyTorch installed.
`data.transforms.eval_transform` is the torchvision reference the tests compare this with, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "center_crop",
    "chw_array",
    "eval_array",
    "eval_pixels",
    "normalize",
    "resize_shorter",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded image into the model's input; stored in the model bundle."""

    img_size: int
    color: Literal["rgb", "gray"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    @property
    def in_chans(self) -> int:
        return 3 if self.color == "rgb" else 1

    @property
    def resize_to(self) -> int:
        """The shorter side before the center crop."""
        return math.floor(self.img_size / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            img_size=int(data["img_size"]),
            color=data["color"],
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            crop_pct=float(data.get("crop_pct", 1.0)),
            interpolation=data.get("interpolation", "bilinear"),
        )

    @classmethod
    def default_for(cls, img_size: int, color: Literal["rgb", "gray"], **overrides: Any) -> Preprocessing:
        """ImageNet statistics for RGB, their channel average for grayscale."""
        mean = IMAGENET_MEAN if color == "rgb" else (round(sum(IMAGENET_MEAN) / 3, 4),)
        std = IMAGENET_STD if color == "rgb" else (round(sum(IMAGENET_STD) / 3, 4),)
        return cls(img_size=img_size, color=color, mean=mean, std=std, **overrides)


def resize_shorter(image: Image.Image, side: int, interpolation: str) -> Image.Image:
    """The shorter side to `side`, the longer one in proportion (rounded down, as torchvision's `Resize(side)`),
    with Pillow's antialiased filter; the image itself when it already has that size."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    size = (side, new_long) if width <= height else (new_long, side)
    if size == (width, height):
        return image
    return image.resize(size, resample=PIL_FILTERS[interpolation])


def center_crop(image: Image.Image, side: int) -> Image.Image:
    """The centered `side` x `side` square (torchvision's `CenterCrop` anchor: rounded half to even)."""
    width, height = image.size
    if (width, height) == (side, side):
        return image
    top, left = round((height - side) / 2.0), round((width - side) / 2.0)
    return image.crop((left, top, left + side, top + side))


def eval_pixels(image: Image.Image, pre: Preprocessing) -> Image.Image:
    """What the model sees, before scaling: resize the shorter side to `pre.resize_to`, center-crop `img_size`."""
    return center_crop(resize_shorter(image, pre.resize_to, pre.interpolation), pre.img_size)


def chw_array(image: Image.Image) -> np.ndarray:
    """A decoded L or RGB image as a uint8 [C, H, W] array."""
    pixels = np.asarray(image)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def normalize(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 [..., C, H, W] -> float32 `(x / 255 - mean) / std`, in the order and precision torchvision uses."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return (scaled - mean) / std


def eval_array(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """The model's input for one decoded image: float32 [C, img_size, img_size].

    Example:
        >>> eval_array(Image.new("L", (40, 30)), Preprocessing.default_for(28, "gray")).shape
        (1, 28, 28)
    """
    return normalize(chw_array(eval_pixels(image, pre)), pre)
