"""Preprocessing and augmentation presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from imgclf.data.transforms import Preprocessing, auto_img_size, eval_tensor, eval_transform, train_transform
from imgclf.errors import ConfigError


def photo(color: str, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if color == "rgb" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def kinds(pipeline: v2.Compose) -> set[type]:
    return {type(t) for t in pipeline.transforms}


@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_eval_transform_is_deterministic_resize_crop_normalize(color):
    pre = Preprocessing.default_for(24, color, crop_pct=0.875)
    first = eval_transform(pre)(photo(color))
    second = eval_transform(pre)(photo(color))
    assert first.shape == (pre.in_chans, 24, 24)
    assert first.dtype == torch.float32
    assert torch.equal(first, second)
    assert kinds(eval_transform(pre)) == {v2.ToImage, v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize}


@pytest.mark.parametrize(
    ("color", "size", "crop_pct", "shape"),
    [
        ("gray", 28, 1.0, (28, 28)),
        ("gray", 28, 1.0, (100, 80)),
        ("rgb", 32, 0.875, (50, 37, 3)),
        ("rgb", 24, 0.9, (17, 61, 3)),
        ("rgb", 16, 1.0, (16, 16, 3)),
    ],
)
def test_eval_tensor_is_eval_transform_bit_for_bit(color, size, crop_pct, shape):
    pixels = np.random.default_rng(size).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(pixels)
    pre = Preprocessing.default_for(size, color, crop_pct=crop_pct)
    expected = eval_transform(pre)(image)
    assert expected.shape == (pre.in_chans, size, size)
    assert torch.equal(eval_tensor(image, pre), expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_numpy_eval_array_is_torchvision_eval_transform_bit_for_bit(interpolation):
    """The torch-free path (ONNX Runtime prediction, the cache) sees exactly the tensor of the DataLoader path."""
    from imgclf.data.preprocessing import eval_array

    for color, shape in (("rgb", (375, 500, 3)), ("gray", (61, 17)), ("rgb", (224, 224, 3))):
        image = Image.fromarray(np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8))
        pre = Preprocessing.default_for(224 if shape[0] > 100 else 28, color, crop_pct=0.875)
        pre = Preprocessing(**{**pre.to_dict(), "interpolation": interpolation})
        array = eval_array(image, pre)
        assert array.dtype == np.float32
        assert torch.equal(torch.from_numpy(array), eval_transform(pre)(image))


def test_normalization_uses_the_stored_statistics():
    pre = Preprocessing(img_size=8, color="gray", mean=(0.5,), std=(0.25,))
    white = eval_transform(pre)(Image.new("L", (8, 8), 255))
    assert torch.allclose(white, torch.full((1, 8, 8), 2.0))


@pytest.mark.parametrize("color", ["rgb", "gray"])
@pytest.mark.parametrize("preset", ["none", "light", "standard", "strong"])
def test_every_preset_gives_the_training_shape(color, preset):
    torch.manual_seed(0)
    pre = Preprocessing.default_for(16, color)
    out = train_transform(pre, preset, hflip=True, vflip=True)(photo(color))
    assert out.shape == (pre.in_chans, 16, 16)
    assert torch.isfinite(out).all()


def test_presets_add_what_they_promise():
    pre = Preprocessing.default_for(16, "rgb")
    assert kinds(train_transform(pre, "none", hflip=True, vflip=False)) == kinds(eval_transform(pre))
    light = kinds(train_transform(pre, "light", hflip=True, vflip=False))
    assert {v2.RandomResizedCrop, v2.RandomHorizontalFlip} <= light
    assert v2.ColorJitter not in light
    standard = kinds(train_transform(pre, "standard", hflip=True, vflip=False))
    assert {v2.RandomRotation, v2.ColorJitter} <= standard
    strong = kinds(train_transform(pre, "strong", hflip=True, vflip=False))
    assert {v2.TrivialAugmentWide, v2.RandomErasing} <= strong


def test_flips_can_be_switched_off():
    pre = Preprocessing.default_for(16, "gray")
    pipeline = kinds(train_transform(pre, "strong", hflip=False, vflip=False))
    assert v2.RandomHorizontalFlip not in pipeline and v2.RandomVerticalFlip not in pipeline
    assert v2.RandomVerticalFlip in kinds(train_transform(pre, "light", hflip=False, vflip=True))


def test_augmentation_varies_between_calls():
    pre = Preprocessing.default_for(16, "rgb")
    pipeline = train_transform(pre, "standard", hflip=True, vflip=False)
    torch.manual_seed(0)
    outputs = [pipeline(photo("rgb")) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="none, light, standard, strong"):
        train_transform(Preprocessing.default_for(16, "rgb"), "extreme", hflip=True, vflip=False)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([(8, 8)] * 5, 28),
        ([(28, 28)] * 5, 28),
        ([(32, 32)] * 5, 32),
        ([(50, 41)] * 3, 44),
        ([(640, 480)] * 3, 224),
        ([], 224),
    ],
)
def test_auto_image_size_follows_the_data(sizes, expected):
    assert auto_img_size(sizes) == expected


def test_preprocessing_round_trips_through_json_types():
    pre = Preprocessing.default_for(32, "gray", crop_pct=0.9, interpolation="bicubic")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert pre.in_chans == 1
