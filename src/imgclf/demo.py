"""The embedded demo dataset: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as PNG files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEMO_CONFIG", "write_digits"]

log = logging.getLogger(__name__)

DIGITS_COUNT = 1797


def write_digits(folder: Path) -> Path:
    """Write the digits as `folder/<digit>/<index>.png` (8-bit grayscale) and return `folder`.

    A folder that already holds all 1,797 images is reused as is.

    Example:
        >>> write_digits(Path("demo_data/digits"))
        PosixPath('demo_data/digits')
    """
    from sklearn.datasets import load_digits

    folder = Path(folder)
    if folder.is_dir() and sum(1 for _ in folder.glob("*/*.png")) == DIGITS_COUNT:
        log.info("using the digits already written to %s", folder)
        return folder
    digits = load_digits()
    # The scans hold 17 gray levels (0..16); stretch them to 0..255.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        class_folder = folder / str(int(target))
        class_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(class_folder / f"{index:04d}.png")
    log.info("wrote %d digit images in 10 class folders to %s", len(pixels), folder)
    return folder


DEMO_CONFIG = {
    "augment": {"preset": "standard", "hflip": False},  # a mirrored 2 or 7 is not a digit
    "train": {"epochs": 10},  # ~0.98-0.99 test accuracy in about a minute on 2 CPU cores
}
