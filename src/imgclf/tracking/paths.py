"""Run folders: where each artifact lives (`RunPaths`, the contract of DESIGN.md), how a new run is named, the
`out/latest` link to the newest run, and `find_run`, which turns what a user typed into a run folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import DataError, ImgclfError

__all__ = [
    "DEV_RUN_PREFIX",
    "LATEST",
    "RunPaths",
    "check_writable",
    "create_run_dir",
    "find_run",
    "point_latest",
]


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
