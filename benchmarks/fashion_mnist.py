"""Fashion-MNIST benchmarks: imgclf's data paths against the PyTorch tutorial pipeline, and the default recipe.

    python benchmarks/fashion_mnist.py throughput [--epochs 2] [--per-class N] [--json out.json]
    python benchmarks/fashion_mnist.py recipe [--set model.early_pool=true] [--json out.json]
    python benchmarks/fashion_mnist.py front [--budgets 1 2 5 10 20] [--scale 0.1] [--png docs/front.png]
    python benchmarks/fashion_mnist.py all

`throughput` trains the same model (imgclf's default small_cnn), for the same epochs, with the same seed and
batch size, four ways, each in its own process (so peak RSS is its own):
  (a) tutorial: torchvision ImageFolder of PNGs + per-sample transforms + DataLoader(num_workers=2), fp32, NCHW;
  (b) imgclf streaming (data.cache=off): per-sample decoding and augmentation, imgclf's compute settings;
  (c) imgclf cached (the default): decoded once, whole batches augmented on the device;
  (d) the model alone: forward+backward+step on synthetic tensors, at (c)'s precision and memory format;
and prints images/s, epoch seconds, peak RSS, test accuracy, and the ratios (c)/(a), (c)/(b), (c)/(d), plus the
model's FLOPs per training image, the GFLOP/s it reaches and the fp32/bf16 matmul GFLOP/s of the device the model
runs on (the one imgclf picks: CUDA, then MPS, then CPU; (a) trains there too, in fp32 and NCHW as the tutorial does).

Peak RSS is reported twice per configuration: the process's own peak (RUSAGE_SELF) and the largest peak of any of
its finished child processes (RUSAGE_CHILDREN: DataLoader workers, imgclf's forked decoders, a `git rev-parse`).
Forked children share the parent's pages copy-on-write and count those they map in their own RSS (Linux keeps that
high-water mark even through an exec), so a child's figure starts at about the parent's RSS at the fork: the two
figures overlap and do not add up to a total.

`recipe` runs `imgclf.train` with every default on the full set (54,000 train / 6,000 val from the official
training set, the official 10,000 test images as test), in its own cache folder (emptied first, so the cache build
is always part of it), and reports wall time (scan and cache build included), training seconds (the sum of the
per-epoch seconds, training and validation, which is what a "in N s of training" target reads) and test accuracy;
`--set KEY=VALUE` (as in `imgclf train`) changes settings of that recipe.

`front` trains the default recipe with a time budget (`train.time_budget`, the schedule fitted to it) at each budget
and the tutorial pipeline (a) given the same budgets (the whole epochs that fit, from a pilot of its speed), each in
its own process, and prints test accuracy against training time with the machine's CPU model and cores, and draws
it (`--png`); beside each imgclf run, the test accuracy with flip TTA and the seconds the mirrored pass adds to
the test evaluation. `--scale 0.1` multiplies the budgets and the training images by 0.1, for a quick run.

The PNG dataset is written once from Debian's dataset-fashion-mnist IDX files into --data (default
~/.cache/imgclf-bench/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IDX = Path(os.environ.get("IMGCLF_FASHION_IDX", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
DEFAULT_DATA = Path.home() / ".cache" / "imgclf-bench" / "fashion-mnist"
BATCH = 128
SEED = 0


# --- data -------------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def prepare(dest: Path) -> Path:
    """`dest/train/<class>/*.png` (60,000) and `dest/test/<class>/*.png` (10,000), written once."""
    from PIL import Image

    marker = dest / ".complete"
    if marker.exists():
        return dest
    if not (IDX / "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"Fashion-MNIST not found in {IDX}: apt-get install dataset-fashion-mnist")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(IDX / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(IDX / f"{prefix}-labels-idx1-ubyte.gz")
        for name in CLASSES:
            (dest / split / name).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(dest / split / CLASSES[label] / f"{index:05d}.png")
    marker.write_text("ok")
    return dest


def subset(data: Path, per_class: int | None, work: Path) -> Path:
    """Hard links (copies across filesystems) to the first `per_class` training and test images of each class
    (all when None)."""
    if per_class is None:
        return data
    target = work / f"fashion-{per_class}"
    for split in ("train", "test"):
        for name in CLASSES:
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            files = sorted((data / split / name).glob("*.png"))
            for path in files[: per_class if split == "train" else max(1, per_class // 6)]:
                if not (folder / path.name).exists():
                    try:
                        os.link(path, folder / path.name)
                    except OSError:  # another filesystem (a tmpfs /tmp), or links not allowed
                        shutil.copyfile(path, folder / path.name)
    return target


# --- one configuration per process ------------------------------------------------------------------------------


def run_imgclf(data: Path, cache: str, epochs: int, out: Path) -> dict:
    import imgclf

    config = {
        "data": {"split_ratios": [0.9, 0.1, 0.0], "cache": cache},
        "augment": {"min_res": None},  # every epoch at 28 px, as (a) trains: the same work per image
        "train": {"epochs": epochs, "batch_size": BATCH, "seed": SEED, "early_stopping": {"patience": None}},
    }
    start = time.perf_counter()
    result = imgclf.train(data, config, out=out)
    wall = time.perf_counter() - start
    history = result.history
    return {
        "images_per_s": float(np.mean([row["images_per_s"] for row in history])),
        "epoch_seconds": float(np.mean([row["seconds"] for row in history])),
        "test_accuracy": result.metrics["accuracy"],
        "wall_seconds": wall,
        "precision": _precision(result.run_dir),
    }


def run_tutorial(data: Path, epochs: int, budget: float | None = None) -> dict:
    """The PyTorch tutorial way: ImageFolder + per-sample transforms + DataLoader(num_workers=2), fp32, NCHW.

    With `budget` (seconds), the tutorial's best effort at a time limit: a pilot of PILOT_STEPS steps (not counted)
    measures its speed, and it trains the whole epochs that fit (at least one), OneCycle over them."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from imgclf.data.transforms import Preprocessing, eval_transform, train_transform
    from imgclf.device import select_device

    torch.manual_seed(SEED)
    device = select_device("auto")  # the device imgclf trains on; fp32 and NCHW there, as the tutorial
    pin = device.type == "cuda"  # the tutorial pins host memory for CUDA

    # The same per-image augmentation imgclf's default picks for 28 px images ("light"), built with torchvision.
    pre = Preprocessing.default_for(28, "gray")
    train_tf = transforms.Compose([transforms.Grayscale(1), train_transform(pre, "light", hflip=True, vflip=False)])
    test_tf = transforms.Compose([transforms.Grayscale(1), eval_transform(pre)])
    full = datasets.ImageFolder(data / "train", transform=train_tf)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SEED))
    train = Subset(full, order[: int(0.9 * len(full))].tolist())
    test = datasets.ImageFolder(data / "test", transform=test_tf)
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True, pin_memory=pin)
    if budget is not None:
        epochs = max(1, int(budget // _tutorial_epoch_seconds(loader, device, pin)))
    torch.manual_seed(SEED)
    model = default_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)  # the tutorial's
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    rates, seconds = [], []
    for _ in range(epochs):
        model.train()
        _sync(device)
        start, seen = time.perf_counter(), 0
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(targets)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        rates.append(seen / seconds[-1])
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, targets in DataLoader(test, batch_size=512, num_workers=2, pin_memory=pin):
            images, targets = images.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)
            correct += (model(images).argmax(1) == targets).sum().item()
    return {
        "images_per_s": float(np.mean(rates)),
        "epoch_seconds": float(np.mean(seconds)),
        "train_seconds": float(np.sum(seconds)),
        "epochs": epochs,
        "test_accuracy": correct / len(test),
        "precision": "fp32",
        "device": device.type,
    }


PILOT_STEPS = 30


def _tutorial_epoch_seconds(loader, device, pin: bool) -> float:
    """Seconds per epoch of the tutorial loop, from PILOT_STEPS timed steps of a throwaway model."""
    import torch
    from torch import nn

    model = default_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    batches = iter(loader)
    start = None
    for step in range(PILOT_STEPS + 3):
        if step == 3:  # the loader's workers and the first steps' one-off costs are behind
            _sync(device)
            start = time.perf_counter()
        images, targets = next(batches)
        images, targets = images.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / PILOT_STEPS * len(loader)


def run_model_only(seconds: float = 20.0) -> dict:
    """(d): forward+backward+step of the same model on synthetic tensors, at imgclf's compute settings."""
    from imgclf.device import select_device

    result = {"default": model_rate("auto", seconds / 2), "fp32": model_rate("fp32", seconds / 2)}
    result["matmul_gflop_per_s"] = matmul_rates(select_device("auto"))
    return result


def model_rate(precision: str, seconds: float) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imgclf.device import resolve_compute

    compute = resolve_compute("auto", precision, True)
    model = default_model().to(compute.device, memory_format=compute.memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(BATCH, 1, 28, 28, device=compute.device).contiguous(memory_format=compute.memory_format)
    targets = torch.randint(0, 10, (BATCH,), device=compute.device)

    step = training_step(model, optimizer, images, targets, compute)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / BATCH
    for _ in range(5):
        step()
    _sync(compute.device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    _sync(compute.device)
    rate = count * BATCH / (time.perf_counter() - start)
    return {
        "precision": compute.precision,
        "device": compute.device.type,
        "images_per_s": rate,
        "mflop_per_image": flops / 1e6,
        "gflop_per_s": flops * rate / 1e9,
    }


def training_step(model, optimizer, images, targets, compute):
    """One forward + backward + optimizer step of `model` on fixed tensors at `compute`'s precision, as a callable."""
    import torch

    def step() -> None:
        with compute.autocast():
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def default_model():
    """imgclf's default small_cnn for 10 grayscale classes, as `imgclf train` builds it on this machine (early
    pooling is `auto`: on where training computes in fp32 on a CPU)."""
    from imgclf.config import ModelConfig
    from imgclf.device import auto_early_pool, resolve_compute
    from imgclf.models.registry import build_model, model_spec

    early_pool = auto_early_pool(resolve_compute("auto", "auto", True))
    return build_model(
        model_spec(ModelConfig(width=32, early_pool=early_pool, whiten=True), num_classes=10, in_chans=1)
    )


def matmul_rates(device=None, n: int | None = None) -> dict:
    """GFLOP/s of n x n matmuls on `device` (the CPU by default): fp32 and bf16, plus TF32 on CUDA; a dtype whose
    single matmul would take over ~0.5 s (emulated bf16) is measured at a smaller n, recorded in `n`.

    On CUDA fp32 matmuls are strict fp32 (PyTorch's default), while cuDNN runs fp32 convolutions as TF32 by
    default (`torch.backends.cudnn.allow_tf32`), so `basis` names the rate an fp32 conv net is compared with.
    """
    import torch

    device = torch.device("cpu") if device is None else torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    kinds = [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False)]
    if cuda:
        kinds.append(("tf32", torch.float32, True))
    rates = {"device": device.type, "n": {}}
    for name, dtype, tf32 in kinds:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32 if cuda else previous
        try:
            small = torch.ones(64, 64, dtype=dtype, device=device)
            small @ small  # library and kernel start-up (cuBLAS handles) outside the timed probe
            size = min(256, n)
            while True:  # up to n, but no matmul over ~0.5 s: an emulated bf16 one takes a minute at 2048
                a = torch.randn(size, size, dtype=dtype, device=device)
                b = torch.randn(size, size, dtype=dtype, device=device)
                _sync(device)
                start = time.perf_counter()
                a @ b
                _sync(device)
                if size >= n or 8 * (time.perf_counter() - start) > 0.5:  # twice the size: 8 times the time
                    break
                size *= 2
            rates["n"][name] = size
            for _ in range(3):
                a @ b
            _sync(device)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < 3:
                a @ b
                _sync(device)  # one finished matmul per count: the host clock reads the device's work
                count += 1
            rates[name] = 2 * size**3 * count / (time.perf_counter() - start) / 1e9
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    rates["basis"] = "tf32" if cuda and torch.backends.cudnn.allow_tf32 else "fp32"
    return rates


def _gflops(rate: float) -> str:
    """GFLOP/s for the table: whole numbers, one decimal below 10 (an emulated bf16 matmul is ~0.3)."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"


def _peak_rss() -> dict:
    """This process's peak RSS and the largest peak among its finished children (workers), in MB."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_largest_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _precision(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"]


def child(which: str, data: Path, epochs: int, work: Path) -> None:
    """Run one configuration and print its JSON (with this process's and its largest child's peak RSS) as the
    last line."""
    if which == "a":
        result = run_tutorial(data, epochs)
    elif which == "b":
        result = run_imgclf(data, "off", epochs, work / "runs")
    elif which == "c":
        result = run_imgclf(data, "auto", epochs, work / "runs")
        # (d) in the same process right after, so that both see the same machine (shared CPUs are noisy)
        result["model_only"] = model_rate("auto", 10.0)
    elif which == "d":
        result = run_model_only()
    else:
        result = run_imgclf(data, "auto", epochs, work / "runs") if epochs else {}
    result.update(_peak_rss())
    print(json.dumps(result))


def in_child(
    which: str, data: Path, epochs: int, work: Path, assignments: tuple[str, ...] = (), cache: Path | None = None
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--work",
        str(work),
        *(f"--set={item}" for item in assignments),
    ]
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(cache or work / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"configuration {which} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- reports ------------------------------------------------------------------------------------------------------


def throughput(data: Path, epochs: int, per_class: int | None, work: Path) -> dict:
    data = subset(data, per_class, work)
    results = {key: in_child(key, data, epochs, work) for key in ("a", "b", "c", "d")}
    a, b, c, d = (results[k] for k in "abcd")
    model, matmul = c["model_only"], d["matmul_gflop_per_s"]
    report = {
        "epochs": epochs,
        "batch_size": BATCH,
        "train_images": int(0.9 * (6000 if per_class is None else per_class) * 10),
        "a_tutorial": a,
        "b_imgclf_streaming": b,
        "c_imgclf_cached": c,
        "d_model_only": d,
        "ratio_c_over_a": c["images_per_s"] / a["images_per_s"],
        "ratio_c_over_b": c["images_per_s"] / b["images_per_s"],
        "ratio_c_over_d": c["images_per_s"] / model["images_per_s"],
        "fp32_model_share_of_matmul": d["fp32"]["gflop_per_s"] / matmul[matmul.get("basis", "fp32")],
    }
    rows = [
        ("(a) tutorial ImageFolder+DataLoader(2 workers)", a),
        ("(b) imgclf streaming", b),
        ("(c) imgclf cached", c),
    ]
    print(
        f"\nFashion-MNIST, small_cnn, {report['train_images']} training images, {epochs} epochs, batch {BATCH}, "
        f"seed {SEED}, on {model['device']}"
    )
    print(
        f"{'pipeline':50} {'precision':>9} {'img/s':>8} {'epoch s':>8} {'peak RSS MB (largest child)':>28} "
        f"{'test acc':>9}"
    )
    for name, row in rows:
        rss = f"{row['peak_rss_mb']:.0f} ({row['peak_rss_largest_child_mb']:.0f})"
        print(
            f"{name:50} {row['precision']:>9} {row['images_per_s']:8.0f} {row['epoch_seconds']:8.1f} "
            f"{rss:>28} {row['test_accuracy']:9.4f}"
        )
    print(f"{'(d) model only, synthetic tensors (after c)':50} {model['precision']:>9} {model['images_per_s']:8.0f}")
    print(f"{'    same, fp32':50} {'fp32':>9} {d['fp32']['images_per_s']:8.0f}")
    print(
        f"ratios: (c)/(a) {report['ratio_c_over_a']:.2f}x   (c)/(b) {report['ratio_c_over_b']:.2f}x   "
        f"(c)/(d) {report['ratio_c_over_d']:.0%}"
    )
    basis = matmul.get("basis", "fp32")
    bf16_note = ""
    if matmul["device"] == "cpu" and d["default"]["precision"] != "bf16":
        bf16_note = ", emulated: no native bf16 on this CPU"
    tf32_note = f"; cuDNN runs fp32 convolutions as TF32, so that is the basis (fp32 {_gflops(matmul['fp32'])})"
    print(
        f"model: {model['mflop_per_image']:.0f} MFLOP per training image; fp32 {_gflops(d['fp32']['gflop_per_s'])} "
        f"GFLOP/s = {report['fp32_model_share_of_matmul']:.0%} of the {matmul['device']}'s {basis} matmul "
        f"({_gflops(matmul[basis])} GFLOP/s, n={matmul['n'][basis]}{tf32_note if basis == 'tf32' else ''}); "
        f"{model['precision']} {_gflops(model['gflop_per_s'])} GFLOP/s "
        f"(bf16 matmul {_gflops(matmul['bf16'])} GFLOP/s{bf16_note})"
    )
    return report


def recipe(data: Path, work: Path, assignments: tuple[str, ...] = ()) -> dict:
    cache = work / "recipe-cache"  # its own, emptied: the throughput run's cache must not shorten the recipe
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    result = in_child("recipe", data, 0, work, assignments, cache=cache)
    report = {**result, "settings": list(assignments), "wall_seconds_total": time.perf_counter() - start}
    changed = f" with {', '.join(assignments)}" if assignments else ""
    print(
        f"\nDefault recipe{changed} on Fashion-MNIST (54k train / 6k val / 10k test): test accuracy "
        f"{result['test_accuracy']:.4f} after {result['train_seconds']:.1f} s of training ({result['epochs']} epochs, "
        f"validation included), {report['wall_seconds_total']:.0f} s wall (scan, cache build, training, evaluation), "
        f"{result['precision']}, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(largest child {result['peak_rss_largest_child_mb']:.0f} MB)"
    )
    return report


def recipe_child(data: Path, work: Path, assignments: list[str]) -> None:
    import imgclf
    from imgclf.config import build_config, parse_assignments

    start = time.perf_counter()
    config = build_config({"data": {"split_ratios": [0.9, 0.1, 0.0]}}, parse_assignments(assignments))
    result = imgclf.train(data, config, out=work / "runs")
    wall = time.perf_counter() - start
    epoch_seconds = [float(row["seconds"]) for row in result.history]
    cache = Path(os.environ.get("IMGCLF_CACHE_DIR", work / "recipe-cache"))
    print(
        json.dumps(
            {
                "test_accuracy": result.metrics["accuracy"],
                "wall_seconds": wall,
                "train_seconds": sum(epoch_seconds),  # training + validation per epoch, as history.csv reports
                "epoch_seconds": epoch_seconds,
                "epochs": len(result.history),
                "precision": _precision(result.run_dir),
                "cache_mb": sum(f.stat().st_size for f in cache.rglob("*.npy")) / 1e6,
                **_peak_rss(),
            }
        )
    )


def front(
    data: Path,
    work: Path,
    budgets: list[float],
    scale: float,
    assignments: tuple[str, ...],
    tutorial: bool,
    png: Path | None,
) -> dict:
    """Test accuracy against training time: imgclf's default recipe with `--time` at each budget (the schedule
    fitted to it; validation counted, the scan, cache build and test evaluation not), and the tutorial pipeline
    given the same budgets (the whole epochs that fit, from a pilot of its speed), each in its own process."""
    per_class = None if scale >= 1 else max(50, int(6000 * scale))
    data = subset(data, per_class, work)
    machine = _machine()
    rows = []
    for minutes in budgets:
        seconds = minutes * 60 * scale
        ours = in_child("front", data, 0, work, (*assignments, f"train.time_budget={seconds:g}s"))
        theirs = in_child("tutorial-budget", data, int(seconds), work) if tutorial else None
        rows.append({"budget_minutes": minutes * scale, "imgclf": ours, "tutorial": theirs})
        line = f"{minutes * scale:6.2f} min: imgclf {ours['test_accuracy']:.4f} ({ours['train_seconds']:.0f} s, "
        line += f"{ours['epochs']} epochs; flip TTA {ours['test_accuracy_tta']:.4f}, test in "
        line += f"{ours['test_seconds']:.1f} s, with TTA {ours['tta_seconds']:.1f} s)"
        if theirs:
            line += (
                f", tutorial {theirs['test_accuracy']:.4f} ({theirs['train_seconds']:.0f} s, {theirs['epochs']} epochs)"
            )
        print(line, flush=True)
    images = "all" if per_class is None else f"{per_class} per class"
    print(f"\nAccuracy vs training time on {machine} (Fashion-MNIST, {images}; test = the official 10,000)")
    header = f"{'budget':>8} {'imgclf test acc':>16} {'flip TTA':>9} {'TTA s':>6} {'train s':>8} {'epochs':>7}"
    print(f"{header} {'tutorial test acc':>18} {'train s':>8} {'epochs':>7}" if tutorial else header)
    for row in rows:
        ours, theirs = row["imgclf"], row["tutorial"]
        extra = ours["tta_seconds"] - ours["test_seconds"]  # what the mirrored pass adds to the test evaluation
        line = (
            f"{row['budget_minutes']:7.2f}m {ours['test_accuracy']:16.4f} {ours['test_accuracy_tta']:9.4f} "
            f"{extra:6.1f} {ours['train_seconds']:8.0f} {ours['epochs']:7d}"
        )
        if theirs:
            line += f" {theirs['test_accuracy']:18.4f} {theirs['train_seconds']:8.0f} {theirs['epochs']:7d}"
        print(line)
    report = {"machine": machine, "images": images, "settings": list(assignments), "rows": rows}
    if png is not None:
        _front_figure(report, png)
        print(f"figure: {png}")
    return report


def _front_figure(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    rows = report["rows"]
    for key, label, style in (("imgclf", "imgclf (--time)", "-o"), ("tutorial", "tutorial pipeline", "--s")):
        points = [(row[key]["train_seconds"] / 60, row[key]["test_accuracy"]) for row in rows if row.get(key)]
        if points:
            axis.plot(*zip(*points), style, label=label)
            for minutes, accuracy in points:
                axis.annotate(
                    f"{accuracy:.4f}", (minutes, accuracy), textcoords="offset points", xytext=(4, -12), fontsize=8
                )
    axis.set(xlabel="training time (minutes, validation included)", ylabel="test accuracy")
    axis.set_title(f"Fashion-MNIST, small_cnn: accuracy vs time\n{report['machine']}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)


def _machine() -> str:
    """The CPU's model name and cores (and the GPU, when imgclf trains on one)."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = (
        "AVX512-BF16"
        if "avx512_bf16" in flags
        else "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else ""
    )
    from imgclf.cpus import usable_cpus

    text = f"{name}, {usable_cpus()} usable cores{', ' + isa if isa else ''}"
    caps = [f"{key}={os.environ[key]}" for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(key)]
    if caps:  # e.g. an AVX2 CPU reproduced on a newer one
        text += f" capped by {' '.join(caps)}"
    import torch

    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def front_child(data: Path, work: Path, assignments: list[str]) -> None:
    import imgclf
    from imgclf.config import build_config, parse_assignments

    start = time.perf_counter()
    base = {
        "data": {"split_ratios": [0.9, 0.1, 0.0]},
        "train": {"epochs": 1000, "early_stopping": {"patience": None}},  # the budget alone decides
    }
    config = build_config(base, parse_assignments(assignments))
    result = imgclf.train(data, config, out=work / "runs", report=False)
    history = result.history
    # flip TTA on the same test images: the model's answer averaged with its answer on the mirrored image, timed
    # beside the plain evaluation (its cost counts against it)
    timed = {}
    for tta in (False, True):
        started = time.perf_counter()
        metrics = imgclf.evaluate(result.run_dir, tta=tta, batch_size=256, out=result.run_dir / f"eval-tta-{tta}")
        timed[tta] = (metrics.metrics["accuracy"], time.perf_counter() - started)
    print(
        json.dumps(
            {
                "test_accuracy": result.metrics["accuracy"],
                "test_accuracy_tta": timed[True][0],
                "test_seconds": timed[False][1],
                "tta_seconds": timed[True][1],
                "train_seconds": float(history[-1]["budget_s"]),
                "epochs": len(history),
                "steps": int(sum(row["steps"] for row in history)),
                "weights": result.weights,
                "wall_seconds": time.perf_counter() - start,
                "precision": _precision(result.run_dir),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("throughput", "recipe", "front", "all"), default="all")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 5, 10, 20], help="front: minutes")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="front: budgets and training images times this (0.1: a quick run)"
    )
    parser.add_argument("--no-tutorial", action="store_true", help="front: imgclf only")
    parser.add_argument("--png", type=Path, default=None, help="front: draw the figure here")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=None, help="training images per class (default: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe: change a setting, as imgclf train does"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    if args.child == "recipe":
        return recipe_child(args.data, work, args.set)
    if args.child == "front":
        return front_child(args.data, work, args.set)
    if args.child == "tutorial-budget":
        result = run_tutorial(args.data, 1, budget=float(args.epochs))
        result.update(_peak_rss())
        print(json.dumps(result))
        return None
    if args.child:
        return child(args.child, args.data, args.epochs, work)
    data = prepare(args.data)
    report = {}
    if args.what == "front":
        scale = args.scale
        report["front"] = front(data, work, args.budgets, scale, tuple(args.set), not args.no_tutorial, args.png)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return None
    if args.what in ("throughput", "all"):
        report["throughput"] = throughput(data, args.epochs, args.per_class, work)
    if args.what in ("recipe", "all"):
        report["recipe"] = recipe(data, work, tuple(args.set))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
