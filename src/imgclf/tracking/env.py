"""env.json: what a run computed with (Python, platform, CPUs, the device used, package versions, imgclf's
version), how it was started (seed, command line, working directory) and the git repository it was started in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from imgclf._version import __version__
from imgclf.cpus import usable_cpus
from imgclf.files import write_json_atomic
from imgclf.tracking.paths import RunPaths

__all__ = ["GIT_TIMEOUT", "environment_info", "package_versions", "repository_info", "write_env"]


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
        >>> info = environment_info(device="cpu", seed=0)
        >>> info["device"], info["seed"], sorted(info["packages"])[:3]
        ('cpu', 0, ['imgclf', 'numpy', 'pillow'])
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
        "imgclf_version": __version__,  # of the code that ran, installed or not
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
