"""Near-duplicates on real images: how long the search takes, how many pairs it finds where copies are rare, and how
many planted copies it finds.

    python benchmarks/near_duplicates.py [--sizes 10000 35000 70000] [--tile 128] [--json out.json]

1. Fashion-MNIST (Debian's dataset-fashion-mnist), the official training and test sets written as PNG folders
   `train/<class>` and `test/<class>`: for each size (a seeded draw in the official 6:1 proportion; 70,000 is all of
   it) the seconds `find_near_duplicates` takes on a fresh cache (features + pairs, all cores), the pairs found,
   those across train and test, and the test images they touch. The official split has few true copies, so the
   cross-split count bounds the false positives (a montage of them is written with `--montage FILE` to look at).
2. Photos: non-overlapping `--tile` px tiles of scikit-image's sample photographs, each with four copies (resized to
   90 %, JPEG quality 70, 4 px cropped off every side, brightness x1.2): the share of each kind of copy found
   beside its original, and the pairs found between two different tiles (false positives).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IDX = Path(os.environ.get("IMGCLF_FASHION_IDX", "/usr/share/datasets/fashion-mnist"))
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "clock", "immunohistochemistry", "retina")
COPIES = ("resized", "jpeg", "cropped", "bright")


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def search(paths: list[Path], cache: Path) -> tuple[list[tuple[Path, Path, float, str]], float]:
    from imgclf.data.duplicates import find_near_duplicates
    from imgclf.data.scan import scan_folder  # noqa: F401  (the package loads before timing)

    hashes = [str(i) for i in range(len(paths))]  # distinct: identical files are not this benchmark's business
    sides = []
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            sides.append(min(image.size))
    start = time.perf_counter()
    found = find_near_duplicates(paths, hashes, sides, max_pixels=10**8, cache_dir=cache)
    return list(found.pairs), time.perf_counter() - start


def fashion(root: Path, sizes: list[int], montage: Path | None) -> list[dict]:
    from PIL import Image

    split_images = {
        "train": (read_idx(IDX / "train-images-idx3-ubyte.gz"), read_idx(IDX / "train-labels-idx1-ubyte.gz")),
        "test": (read_idx(IDX / "t10k-images-idx3-ubyte.gz"), read_idx(IDX / "t10k-labels-idx1-ubyte.gz")),
    }
    files: dict[str, list[Path]] = {}
    for split, (images, labels) in split_images.items():
        files[split] = []
        for index, (image, label) in enumerate(zip(images, labels)):
            path = root / split / str(label) / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            files[split].append(path)
    rows = []
    rng = np.random.default_rng(0)
    for size in sizes:
        test_count = round(size / 7)
        train = [files["train"][i] for i in sorted(rng.permutation(60_000)[: size - test_count])]
        test = [files["test"][i] for i in sorted(rng.permutation(10_000)[:test_count])]
        pairs, seconds = search(train + test, root / f"cache-{size}")
        cross = [(a, b, s, m) for a, b, s, m in pairs if a.parts[-3] != b.parts[-3]]
        touched = {path for pair in cross for path in pair[:2] if path.parts[-3] == "test"}
        rows.append(
            {
                "images": size,
                "seconds": round(seconds, 1),
                "pairs": len(pairs),
                "cross_pairs": len(cross),
                "test_images_with_a_copy_in_train": len(touched),
                "share_of_test": round(len(touched) / test_count, 4),
            }
        )
        print(
            f"fashion-mnist {size:>6} images: {seconds:6.1f} s, {len(pairs)} pairs, {len(cross)} across train/test "
            f"({len(touched)} test images, {len(touched) / test_count:.2%})",
            flush=True,
        )
        if montage is not None and size == max(sizes) and cross:
            strips = [np.hstack([np.asarray(Image.open(a)), np.asarray(Image.open(b))]) for a, b, _, _ in cross[:60]]
            Image.fromarray(np.vstack(strips)).save(montage)
    return rows


def photo_tiles(side: int, min_std: float | None = 20.0) -> list:
    """Non-overlapping `side` px RGB tiles of scikit-image's sample photos; with `min_std`, only those whose gray
    levels vary at least that much (not a sky, not a border)."""
    import skimage.data
    from PIL import Image

    tiles = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        width, height = photo.size
        for top in range(0, height - side + 1, side):
            for left in range(0, width - side + 1, side):
                tile = photo.crop((left, top, left + side, top + side))
                if min_std is None or np.asarray(tile.convert("L"), dtype=np.float32).std() > min_std:
                    tiles.append(tile)
    return tiles


def copies(image) -> dict:
    from PIL import Image, ImageEnhance

    width, height = image.size
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=70)
    return {
        "resized": image.resize((round(width * 0.9), round(height * 0.9)), Image.BICUBIC),
        "jpeg": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "cropped": image.crop((4, 4, width - 4, height - 4)),
        "bright": ImageEnhance.Brightness(image).enhance(1.2),
    }


def photos(root: Path, side: int) -> dict:
    tiles = photo_tiles(side)
    paths, owner = [], {}
    for index, tile in enumerate(tiles):
        path = root / "photos" / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tile.save(path)
        paths.append(path)
        owner[path] = (index, "original")
        for kind, copy in copies(tile).items():
            copy_path = root / "photos" / f"{index:03d}-{kind}.png"
            copy.save(copy_path)
            paths.append(copy_path)
            owner[copy_path] = (index, kind)
    pairs, seconds = search(paths, root / "cache-photos")
    found = {kind: 0 for kind in COPIES}
    false = 0
    for a, b, _, _ in pairs:
        (tile_a, kind_a), (tile_b, kind_b) = owner[a], owner[b]
        if tile_a != tile_b:
            false += 1
        elif "original" in (kind_a, kind_b):
            found[kind_b if kind_a == "original" else kind_a] += 1
    recall = {kind: round(count / len(tiles), 4) for kind, count in found.items()}
    print(
        f"photos: {len(tiles)} tiles of {side} px x 5 versions in {seconds:.1f} s; found beside the original: "
        + ", ".join(f"{kind} {share:.1%}" for kind, share in recall.items())
        + f"; {false} pair(s) between different tiles",
        flush=True,
    )
    return {"tiles": len(tiles), "side": side, "seconds": round(seconds, 1), "recall": recall, "false_pairs": false}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 35_000, 70_000])
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--montage", type=Path, help="a PNG of the cross-split pairs at the largest size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (IDX / "train-images-idx3-ubyte.gz").is_file():
        print(f"Fashion-MNIST not found in {IDX}: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="imgclf-near-") as folder:
        root = Path(folder)
        results = {"photos": photos(root, args.tile), "fashion_mnist": fashion(root, args.sizes, args.montage)}
    print(f"cores: {os.cpu_count()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
