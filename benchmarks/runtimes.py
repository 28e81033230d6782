"""ONNX Runtime (fp32 and int8) against eager PyTorch on the same bundle and the same images, on this CPU.

    python benchmarks/runtimes.py [--work DIR] [--seconds 5] [--json out.json]

The model is `deploy_model.benchmark_run` (imgclf's default small_cnn on a Fashion-MNIST subset, exported by
`imgclf export --int8`). For each backend the script reports:
  - model-only images/s: `Predictor.predict_batch` on the same preprocessed test images, at batch 1 and batch 64,
    repeated for --seconds (eager PyTorch runs as `imgclf predict` runs it: channels_last, inference mode, one
    thread per usable core; ONNX Runtime with its default CPU threads, one per core);
  - end to end images/s: `Predictor.probabilities` over the test PNG files (decode + preprocess + model);
  - test accuracy and file size;
and the ratios ONNX Runtime / eager. Each backend runs alone, one after the other, in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_model import benchmark_run, test_images


def rate(function, images: int, seconds: float) -> float:
    """Images per second of `function()` (which handles `images` images), after one warm-up call."""
    function()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        calls += 1
    return calls * images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgclf-bench-deploy")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per backend and batch size")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from imgclf.deploy.predict import Predictor

    run = benchmark_run(args.work)
    rows = test_images(run)
    paths = [path for path, _ in rows]
    backends = {
        "eager PyTorch": (Predictor.load(run, device="cpu"), run / "model" / "weights.safetensors"),
        "ONNX Runtime fp32": (Predictor.load(run / "model" / "model.onnx"), run / "model" / "model.onnx"),
        "ONNX Runtime int8": (Predictor.load(run / "model" / "model.int8.onnx"), run / "model" / "model.int8.onnx"),
    }
    first = backends["eager PyTorch"][0]
    batch = np.stack([first.prepare(path) for path in paths[:64]])
    truth = np.array([first.classes.index(label) for _, label in rows])
    report = {"images": len(paths), "model": first.bundle.spec.name, "img_size": first.bundle.preprocessing.img_size}
    for name, (predictor, file) in backends.items():
        started = time.perf_counter()
        probs, _ = predictor.probabilities(paths, batch_size=64)
        end_to_end = len(paths) / (time.perf_counter() - started)
        report[name] = {
            "batch1_images_per_s": rate(lambda p=predictor: p.predict_batch(batch[:1]), 1, args.seconds),
            "batch64_images_per_s": rate(lambda p=predictor: p.predict_batch(batch), 64, args.seconds),
            "end_to_end_images_per_s": end_to_end,
            "test_accuracy": float((probs.argmax(1) == truth).mean()),
            "file_mb": file.stat().st_size / 1e6,
        }
    eager = report["eager PyTorch"]
    print(f"\n{report['model']} at {report['img_size']} px, {report['images']} Fashion-MNIST test images, this CPU")
    print(f"{'backend':<20}{'batch 1 img/s':>15}{'batch 64 img/s':>16}{'files img/s':>13}{'test acc.':>11}{'MB':>7}")
    for name in backends:
        r = report[name]
        print(
            f"{name:<20}{r['batch1_images_per_s']:>15,.0f}{r['batch64_images_per_s']:>16,.0f}"
            f"{r['end_to_end_images_per_s']:>13,.0f}{r['test_accuracy']:>11.4f}{r['file_mb']:>7.2f}"
        )
    for name in ("ONNX Runtime fp32", "ONNX Runtime int8"):
        r = report[name]
        ratios = {
            key: r[key] / eager[key]
            for key in ("batch1_images_per_s", "batch64_images_per_s", "end_to_end_images_per_s")
        }
        report[name]["vs_eager"] = ratios
        print(
            f"{name} / eager: batch 1 {ratios['batch1_images_per_s']:.2f}x, batch 64 "
            f"{ratios['batch64_images_per_s']:.2f}x, files {ratios['end_to_end_images_per_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
