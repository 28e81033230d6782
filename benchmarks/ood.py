"""'I don't know', measured: how well the out-of-distribution score of a model trained on Fashion-MNIST tells its
test images from images it never saw (scikit-learn's digits, scikit-image's photographs).

    python benchmarks/ood.py [--time 3m] [--data ~/.cache/imgclf-bench/fashion-mnist] [--json out.json]

Trains imgclf's default recipe with a time budget on the full Fashion-MNIST training set (the PNG folder that
`benchmarks/fashion_mnist.py` writes, made here when missing), then scores the official test set (in-distribution),
scikit-learn's 1,797 digits (8x8, upscaled to 28 px) and 28 px grayscale tiles of scikit-image's sample photos
(out-of-distribution). Prints test accuracy and, for each OOD set, the AUROC of four scores: energy (what imgclf
stores and serves), max-logit, max-softmax probability, and the distance to the nearest training image in the
model's penultimate features (kNN, Sun et al. 2022; computed here only, from 10,000 training images), plus what
the stored threshold does: the share of each set answered `unknown` with `--abstain`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DEFAULT_DATA, prepare
from near_duplicates import photo_tiles


def digits_images() -> list:
    from PIL import Image
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    return [Image.fromarray(image).resize((28, 28), Image.BILINEAR) for image in images]


def photo_images(side: int = 64) -> list:
    """Every `side` px tile of the sample photos (flat ones too), 28 px grayscale."""
    from PIL import Image

    return [tile.convert("L").resize((28, 28), Image.BILINEAR) for tile in photo_tiles(side, min_std=None)]


def outputs(predictor, model, images: list) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K], penultimate features [N, D]) of the eager model on the bundle's preprocessing (images: paths
    or PIL images)."""
    import torch

    features: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda module, args, out: features.append(args[0].detach()))
    logits = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), 256):
                batch = np.stack([predictor.prepare(image) for image in images[start : start + 256]])
                logits.append(model(torch.from_numpy(batch)).float().numpy())
    finally:
        hook.remove()
    return np.concatenate(logits), torch.cat(features).float().numpy()


def knn_distance(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return 1.0 - np.concatenate([(queries[i : i + 2048] @ bank.T).max(axis=1) for i in range(0, len(queries), 2048)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="3m", help="the training budget (train --time)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import imgclf
    from imgclf.deploy.predict import Predictor
    from imgclf.evaluation.ood import auroc, energy
    from imgclf.files import read_csv

    data = prepare(args.data)
    with tempfile.TemporaryDirectory(prefix="imgclf-ood-") as work:
        run = imgclf.train(
            data,
            {"train": {"time_budget": args.time}, "data": {"label_issues": False, "cache_dir": Path(work) / "c"}},
            out=Path(work),
            name="fashion",
            report=False,
        ).run_dir
        predictor = Predictor.load(run, device="cpu")
        model = predictor.runtime.model.eval()
        stored = predictor.ood_threshold
        threshold = stored.threshold
        test = sorted((data / "test").rglob("*.png"))
        truth = [path.parent.name for path in test]
        sets = {
            "fashion-mnist test": test,
            "digits": digits_images(),
            "photos": photo_images(),
        }
        train_files = sorted((data / "train").rglob("*.png"))[::6]
        _, bank = outputs(predictor, model, train_files)
        scores = {}
        for name, images in sets.items():
            logits, features = outputs(predictor, model, images)
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores[name] = {
                "energy": energy(logits),
                "max-logit": -logits.max(axis=1),
                "max-softmax": -(shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1),
                "knn": knn_distance(bank, features),
            }
            if name == "fashion-mnist test":
                predicted = np.array(predictor.classes)[logits.argmax(axis=1)]
                accuracy = float(np.mean(predicted == np.array(truth)))
        epochs = len(read_csv(run / "history.csv"))
    inside = scores["fashion-mnist test"]
    result = {"time": args.time, "epochs": epochs, "test_accuracy": round(accuracy, 4), "threshold": threshold}
    print(f"small_cnn, --time {args.time} ({epochs} epochs) on Fashion-MNIST: test accuracy {accuracy:.4f}")
    print(f"{'OOD set':<12} {'images':>6} " + " ".join(f"{s:>11}" for s in inside) + "  unknown (--abstain)")
    result["unknown_share"] = {"fashion-mnist test": float(np.mean(inside["energy"] > threshold))}
    for name in ("digits", "photos"):
        aurocs = {score: auroc(inside[score], values) for score, values in scores[name].items()}
        unknown = float(np.mean(scores[name]["energy"] > threshold))
        result[name] = {"images": len(sets[name]), "auroc": {k: round(v, 4) for k, v in aurocs.items()}}
        result["unknown_share"][name] = round(unknown, 4)
        print(
            f"{name:<12} {len(sets[name]):>6} " + " ".join(f"{v:>11.4f}" for v in aurocs.values()) + f"  {unknown:.1%}"
        )
    share = result["unknown_share"]["fashion-mnist test"]
    print(
        f"fashion-mnist test images answered unknown: {share:.1%} (threshold {threshold:.3f}, chosen on "
        f"{stored.images} validation images for coverage {stored.coverage}); cores: {os.cpu_count()}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
