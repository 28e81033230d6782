"""Run folders: where each artifact lives, how runs are named, the environment record, and the run's status
(status.json: running / finished / stopped / failed, with the reason and the times)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import imgclf
from imgclf.cpus import usable_cpus
from imgclf.errors import DataError, ImgclfError, TrainingInterrupted
from imgclf.files import write_json_atomic


@dataclass(frozen=True)
class RunPaths:
    """The run-folder contract (see DESIGN.md): every command finds its inputs here."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def problems(self) -> Path:
        return self.root / "problems.csv"

    @property
    def duplicates(self) -> Path:
        return self.root / "duplicates.csv"

    @property
    def label_issues(self) -> Path:
        return self.root / "label_issues.csv"

    @property
    def label_issues_summary(self) -> Path:
        return self.root / "label_issues.json"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def confusion_csv(self) -> Path:
        return self.root / "confusion_matrix.csv"

    @property
    def confusion_png(self) -> Path:
        return self.root / "confusion_matrix.png"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_assets(self) -> Path:
        """PNG figures for report.md (report.html embeds the same images)."""
        return self.root / "report"

    @property
    def status(self) -> Path:
        return self.root / "status.json"


LATEST = "latest"  # out/latest: a relative symlink to the newest run folder made in `out`


DEV_RUN_PREFIX = "fast-dev-run-"


def create_run_dir(out: Path, name: str | None, model_name: str, *, dev_run: bool = False) -> RunPaths:
    """Make a new run folder `out/<name>`; the default name is `<model>-<YYYYmmdd-HHMMSS>` (suffixed if taken),
    `fast-dev-run-<model>-...` for a dev run. `out/latest` then points to it (see `point_latest`), unless it is a
    dev run: `latest` always names a real run.

    Raises:
        ImgclfError: `out` cannot be written (checked before any training starts), a named run exists, or the
            name is `latest`.
    """
    out = Path(out)
    check_writable(out)
    if name == LATEST:
        raise ImgclfError(f"--name {LATEST} is taken: {out / LATEST} points to the newest run; choose another name")
    if name:
        root = out / name
        if root.exists() and any(root.iterdir()):
            raise ImgclfError(f"run folder {root} already exists; use --resume {root} or another --name")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{DEV_RUN_PREFIX if dev_run else ''}{model_name.replace('/', '_')}-{stamp}"
        root, n = out / base, 1
        while root.exists():
            n += 1
            root = out / f"{base}-{n}"
    root.mkdir(parents=True, exist_ok=True)
    if not dev_run:
        point_latest(out, root)
    return RunPaths(root)


def point_latest(out: Path, run_dir: Path) -> None:
    """Make `out/latest` a relative symlink to `run_dir`, so `--resume runs/latest`, `report runs/latest` and
    `evaluate runs/latest` name the newest run. The link is made under a temporary name and renamed over the old
    one (atomic: a reader sees the old run or the new one, never no link). Skipped without a word where
    symlinks cannot be made (Windows without developer mode, some network or FAT file systems) or where
    `out/latest` is a real folder."""
    link = Path(out) / LATEST
    if link.exists() and not link.is_symlink():
        return
    temporary = link.with_name(f".{LATEST}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        temporary.symlink_to(os.path.relpath(run_dir, out), target_is_directory=True)
        os.replace(temporary, link)
    except (OSError, NotImplementedError):
        with contextlib.suppress(OSError):
            temporary.unlink()


def check_writable(out: Path) -> None:
    """Create `out` if needed and prove a file can be written there; fail before any long work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".imgclf-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ImgclfError(
            f"output folder {out} is not writable ({exc.strerror or exc}); choose another --out"
        ) from None


def find_run(path: Path) -> RunPaths:
    """The run folder for `path` (a run folder, or its `model/` folder). A link such as `runs/latest` is
    followed once, here: a newer run moving it later cannot redirect what this command writes."""
    path = Path(path)
    if path.name == "model" and (path.parent / "config.yaml").exists():
        path = path.parent
    if path.is_symlink():
        path = path.parent / path.readlink()  # relative stays relative: messages name runs/<name>, as typed
    if not (path / "config.yaml").is_file():
        raise DataError(f"{path} is not an imgclf run folder (no config.yaml); pass runs/<name>")
    return RunPaths(path)


def environment_info(*, device: str, seed: int, argv: list[str] | None = None) -> dict[str, Any]:
    """Versions, hardware and invocation, for `env.json`.

    Args:
        device: the device the run computes on, as `imgclf.device.describe_device` names it (`cuda:0 (NVIDIA
            H200)`, `cpu`), not the configured `auto`.
        seed: the run's seed.
        argv: the command line; default `sys.argv`.

    Returns:
        A JSON-ready dict. `repository` is the git repository of the working directory (the user's project, not
        imgclf's): `{"path", "commit", "dirty"}`, or None outside any repository or without git.

    Example:
        >>> environment_info(device="cpu", seed=0)["repository"]
        {'path': '/home/me/project', 'commit': '3f2a...', 'dirty': False}
    """
    packages = package_versions(
        ("imgclf", "torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "safetensors")
    )
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "device": device,
        "imgclf_version": imgclf.__version__,  # of the code that ran, installed or not
        "seed": seed,
        "command": argv if argv is not None else sys.argv,
        "cwd": str(Path.cwd()),
        "repository": repository_info(),
        "packages": packages,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution, None when absent."""
    result: dict[str, str | None] = {}
    for name in names:
        try:
            result[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            result[name] = None
    return result


def write_env(paths: RunPaths, info: dict[str, Any]) -> None:
    write_json_atomic(paths.env, info)


GIT_TIMEOUT = 5  # seconds per git call: a huge or networked repository must not hold up the run


def repository_info() -> dict[str, Any] | None:
    """The git repository the working directory is in: its top folder, HEAD commit and whether it is dirty.

    `dirty` is True when tracked files differ from the commit (staged or not); untracked files, such as this
    run's own new folder, do not count (as `git describe --dirty`). `commit` is None before the first commit.
    None outside any repository, without git, or when git does not answer within GIT_TIMEOUT seconds.
    """
    top = _git("rev-parse", "--show-toplevel")
    if top is None:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "--verify", "--quiet", "HEAD")
    return {"path": top, "commit": commit, "dirty": None if status is None else bool(status)}


def _git(*args: str) -> str | None:
    """git's output, stripped ("" when it prints nothing); None when git is missing, fails or times out."""
    try:
        # No optional locks: `git status` would otherwise refresh the index under index.lock, which can make a
        # git command the user runs meanwhile fail.
        result = subprocess.run(
            ["git", *args],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=GIT_TIMEOUT,
            check=False,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# --- status.json: what state a run is in --------------------------------------------------------------------------

STATUSES = ("running", "finished", "stopped", "failed")
# What the runs table shows for a "running" record whose process is gone: the run crashed (killed, power lost)
# before it could write how it ended.
CRASHED = "crashed"


@dataclass
class StatusNote:
    """What the code inside `record_status` tells it: why a run that ends normally ended (early stopping, all
    epochs, pruned by a tuner)."""

    reason: str | None = None


@contextlib.contextmanager
def record_status(paths: RunPaths) -> Iterator[StatusNote]:
    """Keep `status.json` true while a run trains: "running" (with this process's pid, its start time and the host)
    while the block runs, then "finished" (the note's reason), "stopped" (a signal, Ctrl-C: resumable) or "failed"
    (the error). A resumed run keeps its first start time and adds up the seconds of all its sessions.

    A process killed outright leaves "running"; `read_status` then sees that the pid is gone and says "crashed".

    Example:
        >>> with record_status(paths) as note:
        ...     note.reason = "early stopping: val_loss did not improve for 10 epochs"
    """
    before = read_status_file(paths)
    started = time.time()
    record = {
        "status": "running",
        "reason": None,
        "started": before.get("started", _iso(started)),
        "session_started": _iso(started),
        "ended": None,
        "seconds": float(before.get("seconds") or 0.0),
        "sessions": int(before.get("sessions") or 0) + 1,
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "host": socket.gethostname(),
    }
    write_json_atomic(paths.status, record)
    note = StatusNote()

    def end(status: str, reason: str | None) -> None:
        now = time.time()
        record.update(
            status=status, reason=reason, ended=_iso(now), seconds=round(record["seconds"] + now - started, 3)
        )
        write_json_atomic(paths.status, record)

    try:
        yield note
    except TrainingInterrupted as exc:
        end("stopped", str(exc))
        raise
    except KeyboardInterrupt:
        end("stopped", "interrupted (Ctrl-C twice): resume from the last finished epoch")
        raise
    except BaseException as exc:
        end("failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, ImgclfError) else str(exc))
        raise
    end("finished", note.reason)


def read_status_file(paths: RunPaths) -> dict[str, Any]:
    """status.json as written ({} when absent or unreadable: a run older than status records, or a folder being
    created)."""
    try:
        record = json.loads(paths.status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_status(paths: RunPaths) -> dict[str, Any]:
    """The run's status, with a "running" record whose process is gone on this host turned into "crashed".

    A run without status.json (made before status records existed) is "finished" when it has metrics.json, else
    "unknown".
    """
    record = read_status_file(paths)
    if not record:
        return {"status": "finished" if paths.metrics.is_file() else "unknown", "reason": None}
    if record.get("status") == "running" and record.get("host") == socket.gethostname():
        pid = record.get("pid")
        if not isinstance(pid, int) or not _alive(pid, record.get("pid_start")):
            record = {**record, "status": CRASHED, "reason": f"its process ({pid}) ended without a word: killed?"}
    return record


def _alive(pid: int, start: Any) -> bool:
    """Whether process `pid` runs and is the one that wrote the record (same start time, where /proc tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now_start = _process_start(pid)
    return start is None or now_start is None or now_start == start


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid, it names a
    process uniquely, so a reused pid is not mistaken for a live run. None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


# --- the runs table: what `imgclf runs` shows, from run folders only ----------------------------------------------

# Columns of the runs table (and keys of `--json`'s records); `--sort` also takes any test metric's name.
RUN_COLUMNS = (
    "name",
    "status",
    "started",
    "model",
    "data",
    "epochs",
    "best_epoch",
    "best_val_acc",
    "best_val_loss",
    "test_acc",
    "minutes",
)


def list_runs(folder: Path, *, include_dev_runs: bool = False) -> list[dict[str, Any]]:
    """One summary per run folder directly inside `folder` (see `summarize_run`), oldest first; folders that are
    not runs (no config.yaml) and the `latest` link are left out, and so are fast dev runs unless asked for.

    Raises:
        DataError: `folder` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"runs folder not found: {folder} (train writes runs into --out, default runs/)")
    summaries = []
    for entry in sorted(folder.iterdir()):
        if entry.name == LATEST or not (entry / "config.yaml").is_file():
            continue
        if entry.name.startswith(DEV_RUN_PREFIX) and not include_dev_runs:
            continue
        summaries.append(summarize_run(entry))
    return sorted(summaries, key=lambda s: s["started"] or "")


def summarize_run(path: Path) -> dict[str, Any]:
    """A run folder in one record: its status (crashed when a "running" run's process is gone), when it started,
    model, data fingerprint (the same for runs on the same images and split), epochs done of planned, the best
    epoch's validation accuracy and loss, test accuracy, minutes of training, and every numeric test metric under
    `metrics`. Reads the folder only; a run that is unfinished, stopped or failed has blanks (None) where its files
    are missing."""
    import yaml

    paths = RunPaths(Path(path))
    status = read_status(paths)
    try:
        config = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    history = _history(paths.history)
    metrics = read_json(paths.metrics)
    best = _best_row(history, config, read_json(paths.model / "model.json").get("training") or {})
    planned = (config.get("train") or {}).get("epochs")
    seconds = status.get("seconds")
    if seconds is None or status.get("status") == "running":
        seconds = sum(row.get("seconds") or 0.0 for row in history) or None
    env = read_json(paths.env)
    return {
        "name": paths.root.name,
        "path": str(paths.root),
        "status": status.get("status"),
        "reason": status.get("reason"),
        "started": status.get("started") or env.get("started"),
        "model": (config.get("model") or {}).get("name"),
        "pretrained": bool((config.get("model") or {}).get("pretrained")),
        "data": data_fingerprint(paths.manifest),
        "epochs": len(history),
        "epochs_planned": planned,
        "best_epoch": best.get("epoch"),
        "best_val_acc": best.get("val_acc"),
        "best_val_loss": best.get("val_loss"),
        "test_acc": metrics.get("accuracy"),
        "minutes": round(seconds / 60, 3) if seconds else None,
        "metrics": {key: v for key, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "dev_run": paths.root.name.startswith(DEV_RUN_PREFIX),
    }


def sort_runs(summaries: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Runs ordered by a column or a test metric: numbers best first (losses and ECE low, the rest high), text
    A to Z; runs without the value last.

    Raises:
        ConfigError: `key` is neither a column nor a metric of any run.
    """
    from imgclf.errors import ConfigError

    metric_names = sorted({name for s in summaries for name in s["metrics"]})
    if key not in RUN_COLUMNS and key not in metric_names:
        raise ConfigError(
            f"--sort takes a column ({', '.join(RUN_COLUMNS)}) or a test metric "
            f"({', '.join(metric_names) or 'none recorded yet'}); received '{key}'"
        )

    def value(summary: dict[str, Any]) -> Any:
        return summary.get(key) if key in RUN_COLUMNS else summary["metrics"].get(key)

    present = [s for s in summaries if value(s) is not None]
    missing = [s for s in summaries if value(s) is None]
    numeric = all(isinstance(value(s), (int, float)) for s in present)
    low_first = any(word in key for word in ("loss", "ece", "minutes", "started", "name"))
    return sorted(present, key=value, reverse=numeric and not low_first) + missing


def data_fingerprint(manifest: Path) -> str | None:
    """12 hex digits naming the exact images and split of a run (sha256 over its manifest's split, label and
    file hash, in order): two runs with the same fingerprint trained and tested on the same data."""
    import hashlib

    try:
        rows = _csv_rows(manifest)
    except OSError:
        return None
    digest = hashlib.sha256()
    for row in sorted((r.get("split", ""), r.get("label", ""), r.get("sha256", "")) for r in rows):
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()[:12]


def _history(path: Path) -> list[dict[str, Any]]:
    try:
        rows = _csv_rows(path)
    except OSError:
        return []
    return [{key: _number(value) for key, value in row.items()} for row in rows]


def _best_row(history: list[dict[str, Any]], config: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The epoch the run kept, as model.json's `training` records it (its epoch, and with `weights: ema` the
    averaged weights' validation figures); before the run has shipped a model, the best row by its early-stopping
    monitor, as the checkpointer chooses."""
    kept = next((row for row in history if row.get("epoch") == training.get("best_epoch")), None)
    if kept is not None:
        if training.get("weights") == "ema":
            return {**kept, "val_acc": kept.get("val_acc_ema"), "val_loss": kept.get("val_loss_ema")}
        return kept
    stopping = ((config.get("train") or {}).get("early_stopping")) or {}
    monitor = stopping.get("monitor", "val_loss")
    rows = [row for row in history if isinstance(row.get(monitor), float) and row[monitor] == row[monitor]]
    if not rows:
        return {}
    mode = stopping.get("mode", "auto")
    highest = mode == "max" or (mode == "auto" and monitor.endswith("acc"))
    return (max if highest else min)(rows, key=lambda row: row[monitor])


def _csv_rows(path: Path) -> list[dict[str, str]]:
    from imgclf.files import read_csv

    return read_csv(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder's file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(text: str) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text if text != "" else None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.002}} -> {"train.lr": 0.002}: a nested config as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
