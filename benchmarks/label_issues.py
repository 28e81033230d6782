"""Label issues on real images with labels flipped on purpose: precision and recall of what imgclf flags.

    python benchmarks/label_issues.py [--per-class 200] [--flip 0.05] [--seeds 0 1 2] [--json out.json]

For each seed: draws `--per-class` images of each Fashion-MNIST class from the official training set (Debian's
dataset-fashion-mnist), flips `--flip` of the labels, uniformly to another class (the image goes into the other
class's folder), and runs `imgclf inspect DATA --labels` on the folder (a fresh cache folder each seed, so the
feature pass is timed). It prints, per seed and on average, the number flagged, precision and recall against the
flipped images, the seconds `inspect --labels` took, and the same figures for confident learning's off-diagonal set
alone (what cleanlab's `find_label_issues(filter_by='confident_learning')` returns), to show what the second
condition buys.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IDX = Path(os.environ.get("IMGCLF_FASHION_IDX", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def make_folder(root: Path, per_class: int, flip: float, seed: int) -> set[str]:
    """A flat folder of `per_class` images per class with `flip` of the labels flipped; returns the flipped paths."""
    from PIL import Image

    images = read_idx(IDX / "train-images-idx3-ubyte.gz")
    labels = read_idx(IDX / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in range(10)])
    given = labels[chosen].astype(int)
    flipped = rng.choice(len(chosen), round(flip * len(chosen)), replace=False)
    for i in flipped:
        given[i] = rng.choice([k for k in range(10) if k != labels[chosen[i]]])
    wrong = set()
    for i, (index, label) in enumerate(zip(chosen, given)):
        path = root / CLASSES[label] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(path)
        if i in set(flipped.tolist()):
            wrong.add(str(path.resolve()))
    return wrong


def one_seed(per_class: int, flip: float, seed: int) -> dict:
    from imgclf.data.split import SplitManifest  # noqa: F401  (imported before timing: the package loads once)
    from imgclf.evaluation import label_issues as li
    from imgclf.explore import inspect_data
    from imgclf.files import read_csv

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        wrong = make_folder(root, per_class, flip, seed)
        os.environ["IMGCLF_CACHE_DIR"] = str(Path(tmp) / "cache")
        started = time.perf_counter()
        result = inspect_data(root, out=Path(tmp) / "inspect", labels=True, near_duplicates=False)
        seconds = time.perf_counter() - started
        flagged = {row["path"] for row in read_csv(Path(tmp) / "inspect" / "label_issues.csv")}
        # confident learning's own set, from the same out-of-fold probabilities
        from imgclf.data.split import scan_and_split

        rows = scan_and_split(root, ratios=(0.8, 0.1, 0.1), seed=0, max_pixels=10**8, near_duplicates=False)
        rows = rows.manifest.rows
        features, _ = li.pretrained_features([Path(r.path) for r in rows], [r.sha256 for r in rows], max_pixels=10**8)
        classes = sorted({r.label for r in rows})
        y = np.array([classes.index(r.label) for r in rows])
        probs = li.out_of_fold_probabilities(features, y, folds=li.FOLDS)
        off, _ = li.confident_joint(probs, y)
        cl = {str(Path(rows[i].path).resolve()) for i in np.flatnonzero(off)}

    def rates(found: set[str]) -> tuple[float, float]:
        hits = len(found & wrong)
        return hits / max(len(found), 1), hits / max(len(wrong), 1)

    precision, recall = rates(flagged)
    cl_precision, cl_recall = rates(cl)
    return {
        "seed": seed,
        "images": per_class * 10,
        "flipped": len(wrong),
        "flagged": len(flagged),
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "seconds": round(seconds, 1),
        "out_of_fold_accuracy": result.summary["label_issues"]["out_of_fold_accuracy"],
        "confident_learning_flagged": len(cl),
        "confident_learning_precision": round(cl_precision, 3),
        "confident_learning_recall": round(cl_recall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (IDX / "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"Fashion-MNIST not found in {IDX}: apt-get install dataset-fashion-mnist")
    import platform

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    results = []
    print(
        f"{'seed':>4} {'images':>6} {'flipped':>7} {'flagged':>7} {'precision':>9} {'recall':>6} {'s':>6} "
        f"{'oof acc':>7} | {'CL flagged':>10} {'CL prec':>7} {'CL rec':>6}"
    )
    for seed in args.seeds:
        r = one_seed(args.per_class, args.flip, seed)
        results.append(r)
        print(
            f"{r['seed']:>4} {r['images']:>6} {r['flipped']:>7} {r['flagged']:>7} {r['precision']:>9.3f} "
            f"{r['recall']:>6.3f} {r['seconds']:>6.1f} {r['out_of_fold_accuracy']:>7.3f} | "
            f"{r['confident_learning_flagged']:>10} {r['confident_learning_precision']:>7.3f} "
            f"{r['confident_learning_recall']:>6.3f}",
            flush=True,
        )
    mean = {key: round(float(np.mean([r[key] for r in results])), 3) for key in results[0] if key != "seed"}
    print(
        f"mean: precision {mean['precision']:.3f}, recall {mean['recall']:.3f}, {mean['seconds']:.1f} s; "
        f"confident learning alone: precision {mean['confident_learning_precision']:.3f}, recall "
        f"{mean['confident_learning_recall']:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
