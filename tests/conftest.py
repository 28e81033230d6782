"""Shared fixtures: tiny real datasets (scikit-learn's digits) written as image folders, and a fast recipe."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Overfits on purpose (diagnosis, calibration tests): no augmentation, regularisation or LR schedule, no early
# stopping; the caller picks a split that leaves only a handful of training images per class.
MEMORISE = {
    "model": {"width": 32, "dropout": 0.0},
    "augment": {"preset": "none", "hflip": False},
    "train": {
        "epochs": 30,
        "batch_size": 8,
        "lr": 0.01,
        "scheduler": "none",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "early_stopping": {"patience": None},
    },
}

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


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Decoded-image caches of the tests go to a temporary folder, not the user's ~/.cache/imgclf."""
    import os

    folder = tmp_path_factory.mktemp("imgclf-cache")
    previous = os.environ.get("IMGCLF_CACHE_DIR")
    os.environ["IMGCLF_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("IMGCLF_CACHE_DIR", None)
    else:
        os.environ["IMGCLF_CACHE_DIR"] = previous


REPOSITORY = Path(__file__).resolve().parents[1]
_NOT_OUTPUT = {".pytest_cache", ".ruff_cache", "__pycache__", ".coverage", ".import_linter_cache"}  # tools' own caches


def _repository_entries() -> set[str]:
    """The repository root's entries, and what lies inside the output folders a run writes by default."""
    entries = set()
    for entry in REPOSITORY.iterdir():
        if entry.name in _NOT_OUTPUT:
            continue
        entries.add(entry.name)
        if entry.name in ("runs", "demo_data") and entry.is_dir():  # ignored by git, so only this would notice
            entries.update(f"{entry.name}/{child.name}" for child in entry.iterdir())
    return entries


@pytest.fixture(autouse=True)
def nothing_written_into_the_repository():
    """Fail the test that leaves a new file or folder in the repository root (e.g. `runs/`, the default --out):
    tests write into tmp_path (explicit --out, or monkeypatch.chdir)."""
    before = _repository_entries()
    yield
    new = sorted(_repository_entries() - before)
    if new:
        pytest.fail(f"the test wrote into the repository {REPOSITORY}: {', '.join(new)}; write into tmp_path")


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
    return imgclf.train(digits_source, FAST, out=out, name="shared", report=False).run_dir


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, digits_source) -> Path:
    """A run exported to ONNX, served by the tests of test_serve.py and test_serve_ops.py."""
    import imgclf

    settings = {"augment": {"hflip": False}, "train": {"epochs": 6, "batch_size": 16}}
    run = imgclf.train(digits_source, settings, out=tmp_path_factory.mktemp("serve"), name="s", report=False).run_dir
    imgclf.export(run)
    return run


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, to prove user files were not modified."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed."""
    import gzip

    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def require_fashion_mnist() -> None:
    """Skip the calling test when Debian's dataset-fashion-mnist is not installed, or fail it where it must run
    (`IMGCLF_REQUIRE_FASHION_MNIST`, set by .ci/run, which installs the package)."""
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return
    missing = "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); .ci/run installs it"
    if os.environ.get("IMGCLF_REQUIRE_FASHION_MNIST"):
        pytest.fail(f"{missing}, and IMGCLF_REQUIRE_FASHION_MNIST is set")
    pytest.skip(missing)


def write_fashion_mnist(folder: Path, train: int, val: int, test: int) -> Path:
    """A split Fashion-MNIST subset: the first `train` + `val` training images and `test` official test images
    per class. Skips the calling test when Debian's dataset-fashion-mnist is not installed (CI installs it)."""
    require_fashion_mnist()
    train_x, train_y = (
        read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"),
        read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz"),
    )
    test_x, test_y = (
        read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"),
        read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"),
    )
    for label, name in enumerate(FASHION_CLASSES):
        ours = np.flatnonzero(train_y == label)
        theirs = np.flatnonzero(test_y == label)
        for split, indices, images in (
            ("train", ours[:train], train_x),
            ("val", ours[train : train + val], train_x),
            ("test", theirs[:test], test_x),
        ):
            target = folder / split / name
            target.mkdir(parents=True, exist_ok=True)
            for index in indices:
                Image.fromarray(images[index]).save(target / f"{index:05d}.png")
    return folder


def run_cli(*args):
    """`imgclf ARGS...` in this process (typer's runner); exceptions propagate so a failure shows its traceback."""
    from typer.testing import CliRunner

    from imgclf.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "clock", "immunohistochemistry", "retina")


def photo_tiles(count: int, side: int = 128) -> list[Image.Image]:
    """`count` distinct real photographs: non-overlapping side x side tiles of scikit-image's sample photos, skipping
    flat ones (a sky, a black border), in a fixed order."""
    import skimage.data

    tiles: list[Image.Image] = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        width, height = photo.size
        for top in range(0, height - side + 1, side):
            for left in range(0, width - side + 1, side):
                tile = photo.crop((left, top, left + side, top + side))
                if np.asarray(tile.convert("L"), dtype=np.float32).std() > 20:
                    tiles.append(tile)
                if len(tiles) == count:
                    return tiles
    raise AssertionError(f"the sample photos hold only {len(tiles)} tiles of {side} px; asked for {count}")


def copies_of(image: Image.Image) -> dict[str, Image.Image]:
    """The acceptance test's copies of a picture: resized to 90 %, re-encoded as JPEG at quality 70, 4 px cropped
    off every side."""
    import io

    width, height = image.size
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=70)
    return {
        "resized": image.resize((round(width * 0.9), round(height * 0.9)), Image.BICUBIC),
        "jpeg": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "cropped": image.crop((4, 4, width - 4, height - 4)),
    }
