"""The model the deployment benchmarks serve: imgclf's default small_cnn trained on a Fashion-MNIST subset.

    from deploy_model import benchmark_run
    run = benchmark_run(work)          # trained once per work folder, exported to ONNX (fp32 and int8)

The run uses every imgclf default (28 px grayscale, the light preset, batch 64) for 3 epochs on 1,000 training
images per class and 300 official test images per class; the benchmarks predict its test images.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist import DEFAULT_DATA, prepare, subset

PER_CLASS = 1000  # training images per class; the test split keeps per_class // 6 = 166 per class
EPOCHS = 3


def benchmark_run(work: Path, data: Path = DEFAULT_DATA) -> Path:
    """The run folder (trained and exported on first use; reused afterwards)."""
    import imgclf

    run = work / "runs" / "fmnist-small_cnn"
    if (run / "model" / "model.int8.onnx").is_file():
        return run
    folder = subset(prepare(data), PER_CLASS, work)
    print(f"training the benchmark model on {folder} ...", flush=True)
    imgclf.train(folder, {"train": {"epochs": EPOCHS}}, out=run.parent, name=run.name, report=False)
    imgclf.export(run, int8=True, max_accuracy_drop=0.02)
    return run


def test_images(run: Path) -> list[tuple[Path, str]]:
    """(path, label) of the run's test split."""
    from imgclf.files import read_csv

    return [(Path(r["path"]), r["label"]) for r in read_csv(run / "manifest.csv") if r["split"] == "test"]
