"""`imgclf tune` with Optuna on the digits: pruning, best.yaml, one test evaluation, an interrupted study that
resumes, two processes sharing one study on a real PostgreSQL, and no global state left between trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, run_cli
from imgclf.errors import ConfigError, TrainingInterrupted
from imgclf.files import read_csv
from imgclf.training.state import Callback

REQUIRE_POSTGRES = "IMGCLF_REQUIRE_POSTGRES"  # set by .ci/run: the PostgreSQL test must run, never skip

try:
    import optuna
except ImportError:
    if os.environ.get(REQUIRE_POSTGRES):  # the PostgreSQL test lives here: skipping the module would skip it
        pytest.fail(f"{REQUIRE_POSTGRES} is set but Optuna is not installed: pip install 'imgclf[tune]'", pytrace=False)
    pytest.skip("the tune extra: pip install 'imgclf[tune]'", allow_module_level=True)

# lr 0.02 learns the 3 digit classes within an epoch, 1e-5 does not: with successive halving, a 1e-5 trial after a
# 0.02 one is pruned at its first epoch. --tune-seed 3 draws 0.02, 1e-5, 0.02, 0.02 (Optuna's seeded TPE startup).
SPACE = {"train.lr": {"type": "categorical", "choices": [0.02, 1e-5]}}
RECIPE = ["--epochs", "3", "--img-size", "16", "--batch-size", "8", "--set", "model.width=8", "--set"]
RECIPE += ["augment.preset=light", "--set", "augment.hflip=false"]


def write_space(folder: Path, space=SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def trial_runs(study_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in (study_dir / "trials").iterdir() if p.is_dir() and not p.is_symlink()}


@pytest.mark.slow
def test_tune_prunes_writes_best_yaml_and_evaluates_test_once(tmp_path, digits_source):
    result = run_cli(
        "tune", digits_source, "--trials", "4", "--space", write_space(tmp_path), "--pruner", "halving",
        "--tune-seed", "3", *RECIPE, "--out", tmp_path / "out", "--study", "digits",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    study_dir = tmp_path / "out" / "tune-digits"
    rows = read_csv(study_dir / "trials.csv")
    assert [row["number"] for row in rows] == ["0", "1", "2", "3"]
    states = [row["state"] for row in rows]
    assert "pruned" in states and states.count("complete") >= 1, rows
    pruned = next(row for row in rows if row["state"] == "pruned")
    assert pruned["train.lr"] == "1e-05" and pruned["pruned_at"] == "1" and pruned["epochs"] == "1"
    stopped = json.loads((Path(pruned["run"]) / "status.json").read_text())
    assert stopped["status"] == "finished" and stopped["reason"].startswith("pruned by the tuner after epoch 1")
    runs = trial_runs(study_dir)
    assert sorted(runs) == ["trial-0000", "trial-0001", "trial-0002", "trial-0003"]
    evaluated = [name for name, run in runs.items() if (run / "metrics.json").exists()]
    best = max((row for row in rows if row["state"] == "complete"), key=lambda row: float(row["val_acc"]))
    assert evaluated == [Path(best["run"]).name]  # test evaluated once, for the best trial only
    best_config = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert best_config["train"]["lr"] == float(best["train.lr"]) == 0.02
    assert best_config["train"]["epochs"] == 3 and best_config["model"]["width"] == 8
    for name in ("history.png", "importance.png", "summary.html", "study.db"):
        assert (study_dir / name).is_file(), name
    summary = (study_dir / "summary.html").read_text()
    assert "Best trial" in summary and "measured once" in summary
    again = run_cli("train", digits_source, "--config", study_dir / "best.yaml", "--out", tmp_path, "--no-report")
    assert again.exit_code == 0, again.output


class InterruptTrial2(Callback):
    """Sends this process a real SIGINT in the first epoch of trial 2 (the study's third trial)."""

    def on_run_start(self, run):
        self.name = run.root.name

    def on_batch_end(self, state, index, loss, batch_size):
        if self.name == "trial-0002" and index == 1:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_repeating_finished_trials(tmp_path, digits_source):
    from imgclf.tuning import tune

    config = {**FAST, "train": {**FAST["train"], "epochs": 2}, "tracking": {"callbacks": ["test_tune:InterruptTrial2"]}}
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    with pytest.raises(TrainingInterrupted):
        tune(digits_source, config, space=space, trials=4, out=tmp_path, study="s", pruner="none")
    study_dir = tmp_path / "tune-s"
    runs = trial_runs(study_dir)
    finished = {name: (run / "history.csv").read_bytes() for name, run in runs.items() if name != "trial-0002"}
    assert sorted(finished) == ["trial-0000", "trial-0001"]
    assert json.loads((runs["trial-0002"] / "status.json").read_text())["status"] == "stopped"
    assert not (study_dir / "trials.csv").exists()  # interrupted before the study wrote its files

    config["tracking"] = {"callbacks": []}
    result = tune(digits_source, config, space=space, trials=4, out=tmp_path, study="s", pruner="none")
    rows = read_csv(study_dir / "trials.csv")
    assert [(row["number"], row["state"]) for row in rows] == [
        ("0", "complete"),
        ("1", "complete"),
        ("2", "fail"),
        ("3", "complete"),
        ("4", "complete"),
    ]
    assert result.counts == {"COMPLETE": 4, "FAIL": 1}
    for name, history in finished.items():  # trials 0 and 1 were not run again
        assert (study_dir / "trials" / name / "history.csv").read_bytes() == history
    assert result.test_metrics is not None
    assert result.best_run.name in {"trial-0000", "trial-0001", "trial-0003", "trial-0004"}


# --- shared storage: a real PostgreSQL -------------------------------------------------------------------------


def postgres_admin() -> tuple[str, object]:
    """The admin URL of the PostgreSQL that .ci/run starts (IMGCLF_TEST_POSTGRES) and the psycopg module; the test
    is skipped without either, unless IMGCLF_REQUIRE_POSTGRES is set: then it fails, so that CI cannot pass
    without having run it."""
    required = bool(os.environ.get(REQUIRE_POSTGRES))
    admin = os.environ.get("IMGCLF_TEST_POSTGRES")
    if not admin:
        if required:
            pytest.fail(f"{REQUIRE_POSTGRES} is set but IMGCLF_TEST_POSTGRES is not", pytrace=False)
        pytest.skip("no PostgreSQL (set IMGCLF_TEST_POSTGRES=postgresql://user:pw@127.0.0.1:5432/postgres)")
    try:
        import psycopg
    except ImportError:
        if required:
            message = f"{REQUIRE_POSTGRES} is set but psycopg is not installed: pip install 'psycopg[binary]'"
            pytest.fail(message, pytrace=False)
        pytest.skip("the PostgreSQL driver: pip install 'psycopg[binary]'")
    return admin, psycopg


@pytest.fixture
def postgres_url():
    """A fresh database on the PostgreSQL that .ci/run starts (IMGCLF_TEST_POSTGRES: an admin URL), dropped after."""
    admin, psycopg = postgres_admin()
    name = f"imgclf_tune_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
        try:
            yield admin.rsplit("/", 1)[0] + "/" + name
        finally:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("required", [False, True])
@pytest.mark.parametrize("missing", ["server", "driver"])
def test_the_postgres_test_skips_without_postgres_unless_it_is_required(monkeypatch, required, missing):
    """Without a server (IMGCLF_TEST_POSTGRES) or without the driver (psycopg), the PostgreSQL test skips; with
    IMGCLF_REQUIRE_POSTGRES set (CI) it fails instead, in both cases."""
    monkeypatch.delenv(REQUIRE_POSTGRES, raising=False)
    if required:
        monkeypatch.setenv(REQUIRE_POSTGRES, "1")
    if missing == "server":
        monkeypatch.delenv("IMGCLF_TEST_POSTGRES", raising=False)
    else:
        monkeypatch.setenv("IMGCLF_TEST_POSTGRES", "postgresql://user:pw@127.0.0.1:5432/postgres")
        monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the driver were not installed
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match="IMGCLF_TEST_POSTGRES" if missing == "server" else "psycopg"):
        postgres_admin()


@pytest.mark.slow
def test_two_processes_share_one_postgres_study_and_run_no_trial_twice(tmp_path, digits_source, postgres_url):
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True}})
    processes = []
    for worker in ("w1", "w2"):
        command = [sys.executable, "-m", "imgclf", "tune", str(digits_source), "--trials", "6", "--study", "shared"]
        command += ["--storage", postgres_url, "--space", str(space), "--pruner", "none", *RECIPE]
        command += ["--out", str(tmp_path / worker)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    done = [t for t in counted if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 6 and len(counted) == 6, [(t.number, t.state) for t in study.trials]
    folders = [run for worker in ("w1", "w2") for run in trial_runs(tmp_path / worker / "tune-shared")]
    assert sorted(folders) == sorted(f"trial-{t.number:04d}" for t in counted)  # each trial ran once, somewhere
    assert all(trial_runs(tmp_path / worker / "tune-shared") for worker in ("w1", "w2")), "both processes worked"
    evaluated = [
        run
        for worker in ("w1", "w2")
        for run in trial_runs(tmp_path / worker / "tune-shared").values()
        if (run / "metrics.json").exists()
    ]
    assert len(evaluated) <= 1  # the best trial is evaluated on test at most once, by the process that finished last


# --- no global state between trials; errors ----------------------------------------------------------------------


def test_a_trial_leaves_no_deterministic_mode_threads_or_rng_behind():
    from imgclf.device import preserved_torch_state, resolve_compute

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with preserved_torch_state():
        resolve_compute("cpu", "fp32", deterministic=True)
        torch.set_num_threads(1)
        torch.rand(100)
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == deterministic and torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)


def test_bad_search_spaces_are_usage_errors(tmp_path, digits_source):
    from imgclf.tuning import load_space

    unknown = run_cli("tune", digits_source, "--space", write_space(tmp_path, {"train.learning_rate": {}}))
    assert unknown.exit_code == 2 and "did you mean train.lr" in " ".join(unknown.output.split())
    with pytest.raises(ConfigError, match="needs numbers low < high"):
        load_space({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}})
    with pytest.raises(ConfigError, match="log-scaled"):
        load_space({"train.lr": {"type": "float", "low": 0, "high": 0.01, "log": True}})
    with pytest.raises(ConfigError, match="categorical"):
        load_space({"augment.preset": {"type": "categorical", "choices": []}})
    invalid = run_cli(
        "tune", digits_source, "--space",
        write_space(tmp_path, {"augment.preset": {"type": "categorical", "choices": ["light", "heavy"]}}),
        "--out", tmp_path,
    )  # fmt: skip
    assert invalid.exit_code == 2 and "augment.preset = 'heavy' is not a valid setting" in " ".join(
        invalid.output.split()
    )
    assert not (tmp_path / "tune-flat").exists()


@pytest.mark.slow
def test_a_study_whose_trials_keep_diverging_stops_after_five_and_says_why(tmp_path, digits_source):
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [1e30, 1e32]}})
    recipe = [*RECIPE, "--set", "train.grad_clip=null"]
    recipe[recipe.index("--epochs") + 1] = "1"
    result = run_cli("tune", digits_source, "--trials", "20", "--space", space, *recipe, "--out", tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "tune-flat" / "trials.csv")
    assert [row["state"] for row in rows] == ["fail"] * 5, rows  # not twenty: the space trains no model
    assert all("the training loss became" in row["error"] for row in rows)
    assert "the last 5 trials failed" in " ".join(result.output.split())


def test_the_median_pruner_waits_for_two_trials_and_the_first_epoch_then_prunes_below_the_median():
    """`--pruner median` (the default): trials report validation accuracy per epoch, numbered from 1 as in
    history.csv, on a maximizing study; from the third trial on, one below the median of the earlier trials at the
    same epoch is pruned, never at its first epoch (with `n_warmup_steps=1` Optuna only spared step 0, which no
    trial reports, so a trial could be pruned after its first epoch)."""
    from imgclf.tuning import make_pruner as _pruner

    study = optuna.create_study(direction="maximize", pruner=_pruner(optuna, "median"))
    for good in (0.8, 0.9):
        trial = study.ask()
        trial.report(good - 0.1, 1)
        trial.report(good, 2)
        study.tell(trial, good)
    weak = study.ask()
    weak.report(0.1, 1)
    assert not weak.should_prune()  # epoch 1, far below the others: warming up
    weak.report(0.2, 2)
    assert weak.should_prune()
    strong = study.ask()
    strong.report(0.95, 1)
    assert not strong.should_prune()
    strong.report(0.95, 2)
    assert not strong.should_prune()
    first = optuna.create_study(direction="maximize", pruner=_pruner(optuna, "median"))
    early = first.ask()
    early.report(0.0, 2)
    assert not early.should_prune()  # no earlier trials to compare with


def epoch_row(epoch, val_acc, val_loss, val_acc_ema=None, val_loss_ema=None):
    row = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss}
    if val_acc_ema is not None:
        row.update(val_acc_ema=val_acc_ema, val_loss_ema=val_loss_ema)
    return row


def test_trials_report_the_accuracy_of_the_weights_they_would_ship():
    """With train.ema a trial is ranked by the accuracy of the weights its run ships (the average's when it
    validates better by the early-stopping monitor), so the pruner hears that same accuracy each epoch, not the
    model's own weights' `val_acc`."""
    from types import SimpleNamespace

    from imgclf.tuning import TrialReporter

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    state = SimpleNamespace(finished=False, stop_reason=None)
    trial = study.ask()
    reporter = TrialReporter(trial)  # the default monitor, val_loss: the weights with the lower loss ship
    reporter.on_epoch_end(state, epoch_row(1, 0.5, 1.0, val_acc_ema=0.7, val_loss_ema=0.8))  # the average's
    reporter.on_epoch_end(state, epoch_row(2, 0.9, 0.3, val_acc_ema=0.6, val_loss_ema=0.9))  # the model's own
    reporter.on_epoch_end(state, epoch_row(3, 0.8, 0.4, val_acc_ema=0.85, val_loss_ema=0.4))  # a tie: its own
    assert study.trials[-1].intermediate_values == {1: 0.7, 2: 0.9, 3: 0.8}

    from imgclf.training.callbacks import Monitor

    by_accuracy = study.ask()
    reporter = TrialReporter(by_accuracy, Monitor.resolve("val_acc"))  # the better accuracy ships, whatever the loss
    reporter.on_epoch_end(state, epoch_row(1, 0.6, 0.5, val_acc_ema=0.8, val_loss_ema=0.9))
    reporter.on_epoch_end(state, epoch_row(2, 0.9, 0.5, val_acc_ema=0.7, val_loss_ema=0.2))
    assert study.trials[-1].intermediate_values == {1: 0.8, 2: 0.9}

    plain = study.ask()
    TrialReporter(plain).on_epoch_end(state, epoch_row(1, 0.5, 1.0))  # no train.ema: the model's own
    assert study.trials[-1].intermediate_values == {1: 0.5}
