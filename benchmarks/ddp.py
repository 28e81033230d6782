"""One process against several (torchrun, DistributedDataParallel) on the same machine and the same global batch.

    python benchmarks/ddp.py [--processes 2] [--per-class 1000] [--epochs 3] [--batch 128] [--json out.json]

Trains imgclf's default small_cnn on a Fashion-MNIST subset (written once from Debian's dataset-fashion-mnist, as
benchmarks/fashion_mnist.py does) twice, each time as a fresh `imgclf train` command: once as one process with
every core, once as `--devices N` (torchrun: N processes, each with its share of the cores and a batch of
batch / N, so the global batch is the same). Prints the training images/s of every epoch after the first (the
first builds caches and warms up), the epoch seconds, the final validation accuracy of each, and the ratio.

On a CPU the processes share the same cores, so the ratio says what DDP's gradient all-reduce (Gloo) and the
smaller per-process batches cost; on a machine with one GPU per process it says what the extra GPUs bring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
from fashion_mnist import DEFAULT_DATA, prepare, subset


def train(data: Path, out: Path, name: str, *, processes: int, batch: int, epochs: int) -> dict:
    command = [sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--name", name]
    command += ["--epochs", str(epochs), "--batch-size", str(batch), "--no-report", "--patience", "1000"]
    command += ["--set", "data.split_ratios=[0.9, 0.1, 0.0]"]
    if processes > 1:
        command += ["--devices", str(processes)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "IMGCLF_PROGRESS_SECONDS": "600"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    from imgclf.files import read_csv

    history = read_csv(out / name / "history.csv")
    later = history[1:] or history
    return {
        "processes": processes,
        "batch_per_process": batch,
        "images_per_s": float(np.mean([float(row["images_per_s"]) for row in later])),
        "epoch_seconds": float(np.mean([float(row["seconds"]) for row in later])),
        "val_acc": float(history[-1]["val_acc"]),
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class (of 6,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="global batch (each process gets batch / N)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.batch % args.processes:
        sys.exit(f"--batch {args.batch} must divide into {args.processes} processes")
    with tempfile.TemporaryDirectory(prefix="imgclf-ddp-") as folder:
        work = Path(folder)
        data = subset(prepare(args.data), args.per_class, work)
        os.environ["IMGCLF_CACHE_DIR"] = str(work / "cache")
        one = train(data, work / "runs", "one", processes=1, batch=args.batch, epochs=args.epochs)
        many = train(
            data,
            work / "runs",
            "many",
            processes=args.processes,
            batch=args.batch // args.processes,
            epochs=args.epochs,
        )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}; {args.per_class} images per class, {args.epochs} epochs, global batch {args.batch}")
    for run in (one, many):
        print(
            f"  {run['processes']} process(es) x batch {run['batch_per_process']}: {run['images_per_s']:.0f} img/s, "
            f"{run['epoch_seconds']:.1f} s/epoch, val acc {run['val_acc']:.4f}, {run['wall_seconds']:.0f} s wall"
        )
    ratio = many["images_per_s"] / one["images_per_s"]
    print(f"  {args.processes} processes / 1: {ratio:.2f}x the training images/s")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "one": one, "many": many, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
