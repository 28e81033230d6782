"""Run folders: where each artifact lives, how runs are named, and the environment record."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import imgclf
from imgclf.cpus import usable_cpus
from imgclf.errors import DataError, ImgclfError
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
