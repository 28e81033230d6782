"""The fast path: decode-once cache, batched augmentation on the device, compute settings."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from conftest import FAST, write_digits
from imgclf.cpus import usable_cpus
from imgclf.data import cache as cache_module
from imgclf.data.batch_transforms import (
    BatchAugment,
    color_jitter,
    eval_batch,
    mix_transform,
    random_affine_crop,
    random_erase,
)
from imgclf.data.cache import choose_mode, decoded_images, fingerprint
from imgclf.data.images import load_image
from imgclf.data.loaders import CachedLoader
from imgclf.data.transforms import Preprocessing, eval_transform, progressive_size
from imgclf.device import compile_in_place, resolve_compute
from imgclf.errors import ConfigError


def photos(folder: Path, count: int = 6) -> list[Path]:
    """Images of different sizes, shapes and modes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (30 + 7 * i, 41 - 3 * i)
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array)
        if i % 3 == 1:
            image = image.convert("L")
        path = folder / f"p{i}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(path)
    return paths


def hashes(paths):
    import hashlib

    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.mark.parametrize("color", ["rgb", "gray"])
@pytest.mark.parametrize(("size", "crop_pct", "interpolation"), [(24, 0.875, "bilinear"), (20, 1.0, "bicubic")])
def test_cached_and_streamed_eval_tensors_are_the_same(tmp_path, color, size, crop_pct, interpolation):
    paths = photos(tmp_path / "img")
    mean, std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)) if color == "rgb" else ((0.45,), (0.22,))
    pre = Preprocessing(img_size=size, color=color, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
    decoded = decoded_images(paths, hashes(paths), pre, mode="memory", max_pixels=10**7)
    cached = eval_batch(torch.from_numpy(decoded.array), pre)
    streamed = torch.stack([eval_transform(pre)(load_image(p, color=color)) for p in paths])
    assert cached.shape == streamed.shape == (len(paths), pre.in_chans, size, size)
    torch.testing.assert_close(cached, streamed, atol=1e-6, rtol=0)


def test_disk_cache_is_reused_and_rebuilt_when_a_file_or_the_preprocessing_changes(tmp_path):
    paths = photos(tmp_path / "img")
    pre = Preprocessing.default_for(16, "rgb")
    cache = tmp_path / "cache"
    first = decoded_images(paths, hashes(paths), pre, mode="disk", cache_dir=cache, max_pixels=10**7)
    again = decoded_images(paths, hashes(paths), pre, mode="disk", cache_dir=cache, max_pixels=10**7)
    assert (first.built, again.built) == (True, False)
    assert np.array_equal(np.asarray(first.array), np.asarray(again.array))

    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(
        paths[2], format="PNG" if paths[2].suffix == ".png" else "JPEG"
    )
    changed = decoded_images(paths, hashes(paths), pre, mode="disk", cache_dir=cache, max_pixels=10**7)
    assert changed.built and changed.location != first.location
    assert not np.array_equal(np.asarray(changed.array[2]), np.asarray(first.array[2]))
    resized = decoded_images(
        paths, hashes(paths), Preprocessing.default_for(20, "rgb"), mode="disk", cache_dir=cache, max_pixels=10**7
    )
    assert resized.built and resized.array.shape[-1] == 20
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_fingerprint_follows_mtime(tmp_path):
    paths = photos(tmp_path / "img", count=2)
    pre = Preprocessing.default_for(16, "rgb")
    before = fingerprint(paths, hashes(paths), pre)
    os.utime(paths[0], ns=(1, 1))
    assert fingerprint(paths, hashes(paths), pre) != before


def _build_in_child(paths, digests, cache, start, results, delay: float) -> None:
    real = cache_module.stored_square

    def slow(image, pre):  # a build that lasts ~0.6 s: the second process arrives while the first is building
        time.sleep(delay)
        return real(image, pre)

    cache_module.stored_square = slow  # this child process only
    start.wait(timeout=120)  # both processes ask for the cache at the same moment
    decoded = decoded_images(
        paths, digests, Preprocessing.default_for(16, "rgb"), mode="disk", cache_dir=cache, max_pixels=10**7
    )
    results.put((decoded.built, str(decoded.location), int(np.asarray(decoded.array, dtype=np.int64).sum())))


def test_two_concurrent_builders_produce_one_valid_cache(tmp_path):
    paths = photos(tmp_path / "img", count=12)
    cache = tmp_path / "cache"
    # Fresh interpreters, not forks: a fork of this multithreaded test process (JAX and ONNX Runtime threads from
    # earlier tests) can inherit a lock some thread held and hang before it reports.
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_build_in_child, args=(paths, hashes(paths), cache, start, results, 0.05))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(built for built, _, _ in outcomes) == [False, True], "one builds, the other waits and reuses"
    assert outcomes[0][1:] == outcomes[1][1:]
    expected = decoded_images(
        paths, hashes(paths), Preprocessing.default_for(16, "rgb"), mode="memory", max_pixels=10**7
    )
    assert outcomes[0][2] == int(expected.array.astype(np.int64).sum())
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file(), "no staging folder left behind"


def test_auto_mode_caches_what_fits_the_budget():
    pre = Preprocessing.default_for(28, "gray")
    assert choose_mode("auto", 60_000, pre, budget_fraction=0.25) == "disk"
    assert choose_mode("auto", 60_000, pre, budget_fraction=1e-9) == "off"
    assert choose_mode("memory", 10, pre, budget_fraction=1e-9) == "memory"


def test_batched_augmentation_draws_parameters_per_sample():
    torch.manual_seed(0)
    pre = Preprocessing.default_for(24, "rgb")
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    batch = image.expand(16, -1, -1, -1).contiguous()
    out = BatchAugment(pre, "standard", hflip=True, vflip=False)(batch)
    assert out.shape == (16, 3, 24, 24)
    distinct = {tuple(out[i].flatten()[:50].tolist()) for i in range(16)}
    assert len(distinct) == 16


@pytest.mark.parametrize("preset", ["none", "light", "standard", "strong"])
def test_batched_augmentation_stays_in_range(preset):
    torch.manual_seed(1)
    pre = Preprocessing(img_size=16, color="gray", mean=(0.5,), std=(0.25,))
    batch = torch.randint(0, 256, (32, 1, 20, 20), dtype=torch.uint8)
    out = BatchAugment(pre, preset, hflip=True, vflip=True)(batch)
    assert out.shape == (32, 1, 16, 16)
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-5 and out.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_flips_follow_the_switches():
    torch.manual_seed(2)
    ramp = torch.linspace(1, 0, 32).expand(64, 1, 32, 32).contiguous()  # bright left, dark right
    kept = random_affine_crop(ramp, 32, scale=(0.9, 1.0), hflip=False)
    left, right = kept[..., :8].mean((1, 2, 3)), kept[..., -8:].mean((1, 2, 3))
    assert bool((left > right).all()), "without hflip no image may be mirrored"
    flipped = random_affine_crop(ramp, 32, scale=(0.9, 1.0), hflip=True)
    mirrored = (flipped[..., :8].mean((1, 2, 3)) < flipped[..., -8:].mean((1, 2, 3))).float().mean()
    assert 0.25 < mirrored < 0.75


@pytest.mark.parametrize(("hflip", "vflip"), [(False, False), (True, False), (False, True), (True, True)])
def test_batch_augment_flips_follow_the_preset_switches(hflip, vflip):
    torch.manual_seed(5)
    pre = Preprocessing(img_size=32, color="gray", mean=(0.0,), std=(1.0,))
    batch = torch.zeros(256, 1, 32, 32, dtype=torch.uint8)
    batch[..., :16, :16] = 255  # bright top-left quadrant
    out = BatchAugment(pre, "light", hflip=hflip, vflip=vflip)(batch)
    mirrored_x = (out[..., :16].mean((1, 2, 3)) < out[..., 16:].mean((1, 2, 3))).float().mean()
    mirrored_y = (out[..., :16, :].mean((1, 2, 3)) < out[..., 16:, :].mean((1, 2, 3))).float().mean()
    assert 0.35 < mirrored_x < 0.65 if hflip else mirrored_x == 0
    assert 0.35 < mirrored_y < 0.65 if vflip else mirrored_y == 0


def test_jitter_and_erasing_vary_per_sample():
    torch.manual_seed(3)
    images = torch.full((16, 3, 8, 8), 0.5)
    images[:, :, :4] = 0.25
    jittered = color_jitter(images, 0.4)
    assert len({round(float(m), 5) for m in jittered.mean((1, 2, 3))}) > 8
    erased = random_erase(torch.ones(64, 1, 16, 16), 0.5)
    hit = (erased == 0).flatten(1).any(1).float().mean()
    assert 0.25 < hit < 0.75


def test_mixup_cutmix_labels_sum_to_one():
    torch.manual_seed(4)
    images, labels = torch.rand(8, 1, 16, 16), torch.arange(8) % 5
    mix = mix_transform(5)
    assert [type(t).__name__ for t in mix.transforms] == ["MixUp", "CutMix"]
    for transform in (*mix.transforms, mix):  # each branch, and the random choice between them
        mixed_images, mixed = transform(images, labels)
        assert mixed.shape == (8, 5) and mixed_images.shape == images.shape
        torch.testing.assert_close(mixed.sum(1), torch.ones(8))
        assert bool((mixed.max(1).values < 1).any()), "labels are mixed, not one-hot"
        assert not torch.equal(mixed_images, images)


def test_cached_loader_orders_by_its_generator():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    loader = CachedLoader(
        images,
        torch.arange(10),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        transform=lambda b: b,
        device=torch.device("cpu"),
        seed=7,
    )
    assert len(loader) == 2
    first = [t.tolist() for _, t in loader]
    loader.generator.manual_seed(7)
    assert [t.tolist() for _, t in loader] == first
    assert [t.tolist() for _, t in loader] != first
    plain = CachedLoader(
        images, torch.arange(10), batch_size=4, shuffle=False, transform=lambda b: b, device=torch.device("cpu")
    )
    assert [t.tolist() for _, t in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_compute_settings():
    assert resolve_compute("cpu", "fp32").dtype is None
    assert resolve_compute("cpu", "bf16").dtype == torch.bfloat16
    assert resolve_compute("cpu", "fp32", channels_last=True).memory_format == torch.channels_last
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        resolve_compute("cpu", "fp16")


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_precision_picks_bf16_only_on_cpus_that_compute_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert resolve_compute("cpu", "auto").precision == expected


@pytest.mark.parametrize(
    ("aten", "onednn", "expected"),
    [
        ("AVX2", None, "fp32"),
        ("AVX512", "AVX2", "fp32"),
        ("AVX512", "AVX512_CORE", "fp32"),
        ("AVX512", "avx512_core_bf16", "bf16"),
        ("AVX512", "ALL", "bf16"),
    ],
)
def test_auto_precision_is_fp32_when_the_isa_is_capped_below_bf16(monkeypatch, aten, onednn, expected):
    """ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU: bf16 would run emulated (~10x slower)."""
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    assert resolve_compute("cpu", "auto").precision == expected


def test_compile_without_a_cpu_compiler_is_a_clear_config_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match=r"train\.compile on a CPU needs a C\+\+ compiler"):
        compile_in_place(torch.nn.Linear(2, 2), torch.device("cpu"))


@pytest.mark.slow
def test_compiled_model_trains_and_keeps_its_state_dict_keys():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    keys = list(model.state_dict())
    eager = model(torch.ones(2, 1, 8, 8))
    compile_in_place(model, torch.device("cpu"))
    compiled = model(torch.ones(2, 1, 8, 8))
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    assert list(model.state_dict()) == keys, "checkpoints and bundles see the same names"


def test_cpu_threads_follow_the_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr("imgclf.device.usable_cpus", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        resolve_compute("cpu", "fp32")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's own setting wins
        resolve_compute("cpu", "fp32")
        assert torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("imgclf.device.usable_cpus", lambda: before + 1)
        resolve_compute("cpu", "fp32")
        assert torch.get_num_threads() == before, "a lower thread count set by the user stays"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs' time: 2 threads
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity mask
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_usable_cpus_respects_a_container_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (min(affinity, expected) if expected else affinity)


def test_cached_and_streamed_training_land_in_the_same_accuracy_band(tmp_path):
    data = write_digits(tmp_path / "digits", per_class=60)
    results = {}
    for cache in ("memory", "off"):
        config = {**FAST, "data": {"img_size": 16, "cache": cache}, "train": {"epochs": 4, "batch_size": 16}}
        results[cache] = imgclf.train(data, config, out=tmp_path / "runs", report=False).metrics["accuracy"]
    # Same seed, same recipe, different random streams for augmentation: within 15 points of each other.
    assert min(results.values()) >= 0.8
    assert abs(results["memory"] - results["off"]) <= 0.15


def test_a_second_run_reuses_the_disk_cache(tmp_path, digits_source, caplog):
    config = {
        **FAST,
        "data": {"img_size": 16, "cache": "disk", "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 1},
    }
    caplog.set_level(logging.INFO, logger="imgclf")
    imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)
    assert "decoded 72 images once" in caplog.text
    caplog.clear()
    imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)
    assert "using the decoded-image cache" in caplog.text
    assert "decoded 72 images once" not in caplog.text


def test_progressive_size_grows_from_min_res_to_img_size():
    for epochs in (1, 3, 8, 10, 30):
        sizes = [progressive_size(e, epochs, 28, 16, (0.4, 0.75)) for e in range(1, epochs + 1)]
        assert sizes[-1] == 28
        assert sizes == sorted(sizes)
        assert all(16 <= size <= 28 and size % 4 == 0 for size in sizes)
    assert [progressive_size(e, 10, 28, 20, (0.4, 0.75)) for e in range(1, 11)] == [20] * 5 + [24] * 2 + [28] * 3
    assert progressive_size(1, 10, 28, 32, (0.4, 0.75)) == 28  # min_res at or above img_size: off
    assert [progressive_size(e, 4, 224, 160, (0.0, 0.0)) for e in range(1, 5)] == [224] * 4


def test_progressive_resizing_trains_early_epochs_on_smaller_batches(tmp_path, digits_source):
    config = {**FAST, "augment": {"min_res": 8, "res_ramp": [0.25, 1.0]}, "train": {"epochs": 4, "batch_size": 8}}
    seen: list[int] = []
    original = torch.nn.Conv2d.forward

    def record(self, images):
        if self.in_channels == 1 and torch.is_grad_enabled():  # the stem, in training
            seen.append(images.shape[-1])
        return original(self, images)

    torch.nn.Conv2d.forward = record
    try:
        result = imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)
    finally:
        torch.nn.Conv2d.forward = original
    assert [row["img_size"] for row in result.history] == [8, 8, 12, 16]
    steps = len(seen) // 4
    assert seen == [8] * 2 * steps + [12] * steps + [16] * steps
    history = (result.run_dir / "history.csv").read_text().splitlines()
    assert history[0].endswith(",img_size") and history[1].endswith(",8")
    assert result.metrics["n"] > 0


def test_forked_workers_decode_and_scan_like_threads(tmp_path, monkeypatch):
    from imgclf.data import parallel
    from imgclf.data.scan import scan_folder

    folder = tmp_path / "data" / "a"
    paths = photos(folder, count=9)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    photos(tmp_path / "data" / "b", count=3)
    paths.append(folder / "broken.png")
    pre = Preprocessing.default_for(16, "rgb")
    results = {}
    for name, limit in (("threads", 10**9), ("processes", 1)):
        monkeypatch.setattr(parallel, "PROCESS_MIN_ITEMS", limit)
        disk = decoded_images(
            paths, hashes(paths), pre, mode="disk", cache_dir=tmp_path / name, max_pixels=10**7, threads=2
        )
        memory = decoded_images(paths, hashes(paths), pre, mode="memory", max_pixels=10**7, threads=2)
        index = scan_folder(tmp_path / "data", workers=2)
        results[name] = (np.array(disk.array), disk.failed, np.array(memory.array), memory.failed, index)
    threads, processes = results["threads"], results["processes"]
    assert threads[0].any() and np.array_equal(threads[0], processes[0]) and np.array_equal(processes[0], processes[2])
    assert [index for index, _ in processes[1]] == [9] == [index for index, _ in processes[3]]
    assert processes[1] == threads[1]
    assert processes[4].records == threads[4].records and len(processes[4].records) == 12
    assert processes[4].problems == threads[4].problems and len(processes[4].problems) == 1


def test_cpu_threads_are_shared_out_between_a_nodes_processes(monkeypatch):
    """Under torchrun each of a node's processes gets usable cores / processes per node, whether OMP_NUM_THREADS is
    unset or torchrun's own default of 1; a value the user chose wins."""
    before = torch.get_num_threads()
    monkeypatch.setattr("imgclf.device.usable_cpus", lambda: 8)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        resolve_compute("cpu", "fp32", processes_per_node=4)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by torchrun, not by the user
        resolve_compute("cpu", "fp32", processes_per_node=2)
        assert torch.get_num_threads() == 4
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's
        resolve_compute("cpu", "fp32", processes_per_node=2)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
