"""Run folders: where each artifact lives, how runs are named, and the environment record."""

from __future__ import annotations

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

from imgclf.data.parallel import usable_cpus
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


def create_run_dir(out: Path, name: str | None, model_name: str) -> RunPaths:
    """Make a new run folder `out/<name>`; the default name is `<model>-<YYYYmmdd-HHMMSS>` (suffixed if taken).

    Raises:
        ImgclfError: `out` cannot be written (checked before any training starts), or a named run exists.
    """
    out = Path(out)
    check_writable(out)
    if name:
        root = out / name
        if root.exists() and any(root.iterdir()):
            raise ImgclfError(f"run folder {root} already exists; use --resume {root} or another --name")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{model_name.replace('/', '_')}-{stamp}"
        root, n = out / base, 1
        while root.exists():
            n += 1
            root = out / f"{base}-{n}"
    root.mkdir(parents=True, exist_ok=True)
    return RunPaths(root)


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
    """The run folder for `path` (a run folder, or its `model/` folder)."""
    path = Path(path)
    if path.name == "model" and (path.parent / "config.yaml").exists():
        path = path.parent
    if not (path / "config.yaml").is_file():
        raise DataError(f"{path} is not an imgclf run folder (no config.yaml); pass runs/<name>")
    return RunPaths(path)


def environment_info(*, device: str, seed: int, argv: list[str] | None = None) -> dict[str, Any]:
    """Versions, hardware and invocation, for `env.json`."""
    packages = package_versions(
        ("imgclf", "torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "safetensors")
    )
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "device": device,
        "seed": seed,
        "command": argv if argv is not None else sys.argv,
        "cwd": str(Path.cwd()),
        "git_commit": _git_commit(),
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


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
