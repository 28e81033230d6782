"""Shared fixtures: tiny real datasets (scikit-learn's digits) written as image folders, and a fast recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Small enough to train in about a second on 2 CPU cores, big enough to learn 3 digit classes.
FAST = {
    "data": {"img_size": 16},
    "model": {"width": 8},
    "augment": {"preset": "light", "hflip": False},
    "train": {"epochs": 2, "batch_size": 8},
}


def write_digits(folder: Path, classes=(0, 1, 2), per_class: int = 30, layout: str = "flat") -> Path:
    """Real 8x8 digit scans as PNGs in `folder/<class>/` (flat) or `folder/{train,val,test}/<class>/` (70/15/15)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for label in classes:
        indices = np.flatnonzero(digits.target == label)[:per_class]
        for rank, index in enumerate(indices):
            if layout == "flat":
                split = ""
            else:
                split = "train" if rank < 0.7 * per_class else "val" if rank < 0.85 * per_class else "test"
            target = folder / split / f"digit{label}" / f"{index:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[index]).save(target)
    return folder


@pytest.fixture(scope="session")
def digits_source(tmp_path_factory) -> Path:
    """A flat 3-class digits folder; copy it (see `digits_flat`) before changing anything in it."""
    return write_digits(tmp_path_factory.mktemp("digits") / "flat")


@pytest.fixture
def digits_flat(tmp_path, digits_source) -> Path:
    """A private copy of the flat 3-class digits folder."""
    return Path(shutil.copytree(digits_source, tmp_path / "digits"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_source) -> Path:
    """One short training run shared by the read-only tests (evaluate, predict, bundle)."""
    import imgclf

    out = tmp_path_factory.mktemp("runs")
    return imgclf.train(digits_source, FAST, out=out, name="shared").run_dir


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, to prove user files were not modified."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
