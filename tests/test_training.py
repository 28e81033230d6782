"""Training pieces: schedules, early stopping, checkpoints, loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from imgclf.errors import CheckpointError, ConfigError
from imgclf.training.callbacks import EarlyStopping, Monitor
from imgclf.training.checkpoint import load_checkpoint, save_checkpoint
from imgclf.training.optim import build_loss, build_optimizer, build_schedule
from imgclf.training.state import FitState


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def lrs_over(schedule, optimizer, steps):
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_step()
    return seen


def test_cosine_schedule_warms_up_then_decays_to_zero():
    model = tiny_model()
    optimizer = build_optimizer("adamw", model, lr=1.0, weight_decay=0.0)
    schedule = build_schedule("cosine", optimizer, epochs=10, steps_per_epoch=10, warmup_epochs=1)
    lrs = lrs_over(schedule, optimizer, 100)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:11]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] < 0.001


def test_warmup_is_capped_for_short_runs():
    optimizer = build_optimizer("sgd", tiny_model(), lr=1.0, weight_decay=0.0)
    schedule = build_schedule("cosine", optimizer, epochs=1, steps_per_epoch=10, warmup_epochs=5)
    assert max(lrs_over(schedule, optimizer, 10)) == pytest.approx(1.0)


def test_weight_decay_skips_biases_and_norms():
    optimizer = build_optimizer("adamw", tiny_model(), lr=0.1, weight_decay=0.05)
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 0.05]
    no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0.0)
    assert all(p.ndim <= 1 for p in no_decay["params"])


def test_unknown_factory_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="adamw, adam, sgd"):
        build_optimizer("lion", tiny_model(), lr=0.1, weight_decay=0.0)
    optimizer = build_optimizer("sgd", tiny_model(), lr=0.1, weight_decay=0.0)
    with pytest.raises(ConfigError, match="cosine, step, plateau, none"):
        build_schedule("linear", optimizer, epochs=1, steps_per_epoch=1)


def test_class_weights_are_inverse_frequency_averaging_one_per_sample():
    counts = np.array([10, 30, 60])
    weights = build_loss(label_smoothing=0.0, class_counts=counts.tolist()).weight.numpy()
    assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert weights[0] / weights[2] == pytest.approx(6.0)


def fake_state(values, name="val_loss"):
    model = tiny_model()
    optimizer = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    state = FitState(model, optimizer, build_schedule("none", optimizer, epochs=1, steps_per_epoch=1), epochs=100)
    state.history = [{name: v} for v in values]
    state.epoch = len(values)
    return state


@pytest.mark.parametrize(
    ("values", "patience", "min_delta", "stops"),
    [
        ([1.0, 0.9, 0.95, 0.96], 2, 0.0, True),
        ([1.0, 0.9, 0.95, 0.89], 2, 0.0, False),
        ([1.0, 0.9, 0.89, 0.88], 2, 0.05, True),  # improvements smaller than min_delta do not count
        ([1.0, 0.9, 0.95], 2, 0.0, False),
    ],
)
def test_early_stopping_counts_from_history(values, patience, min_delta, stops):
    state = fake_state(values)
    EarlyStopping(Monitor.resolve("val_loss"), patience, min_delta).on_epoch_end(state, state.history[-1])
    assert (state.stop_reason is not None) == stops


def test_monitor_direction():
    assert Monitor.resolve("val_acc").mode == "max"
    assert Monitor.resolve("val_loss").mode == "min"
    assert Monitor.resolve("val_acc").improved(0.9, 0.8)
    assert not Monitor.resolve("val_loss").improved(0.9, 0.8)


def test_checkpoint_round_trip_restores_model_optimizer_and_schedule(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer("adamw", model, lr=0.1, weight_decay=0.01)
    schedule = build_schedule("cosine", optimizer, epochs=3, steps_per_epoch=4)
    for _ in range(5):
        loss = model(torch.randn(2, 1, 8, 8)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.after_step()
    save_checkpoint(
        tmp_path / "last.safetensors",
        model=model,
        optimizer=optimizer,
        schedule_state=schedule.state_dict(),
        meta={"epoch": 2, "history": [{"val_loss": 0.5}]},
    )

    loaded = load_checkpoint(tmp_path / "last.safetensors")
    clone = tiny_model()
    clone_optimizer = build_optimizer("adamw", clone, lr=0.1, weight_decay=0.01)
    clone_schedule = build_schedule("cosine", clone_optimizer, epochs=3, steps_per_epoch=4)
    clone.load_state_dict(loaded.model)
    clone_optimizer.load_state_dict(loaded.optimizer)
    clone_schedule.load_state_dict(loaded.schedule)

    assert loaded.meta == {"epoch": 2, "history": [{"val_loss": 0.5}]}
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)
    original_state = optimizer.state_dict()["state"]
    for key, values in clone_optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(original_state[key][name]))
    assert clone_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert clone_schedule.scheduler.last_epoch == schedule.scheduler.last_epoch == 5


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, np.random.default_rng(0).bytes(4096)])
def test_corrupted_checkpoint_names_the_file_and_the_alternative(tmp_path, content):
    (tmp_path / "best.safetensors").write_bytes(b"placeholder")
    broken = tmp_path / "last.safetensors"
    broken.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"corrupted checkpoint .*last\.safetensors.*best\.safetensors"):
        load_checkpoint(broken)


def test_truncated_checkpoint_is_reported_as_corrupted(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model=model, optimizer=optimizer, schedule_state={}, meta={})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupted checkpoint"):
        load_checkpoint(path)
