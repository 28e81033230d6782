"""env.json records what a run really used: the device it computed on, imgclf's version, and the commit of the
user's repository it was started in, labelled as such."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import imgclf
from conftest import FAST
from imgclf.device import describe_device, select_device
from imgclf.tracking.runs import repository_info

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git on PATH")


def git(folder: Path, *args: str) -> str:
    """Run git in `folder` with a throwaway identity; its output, stripped."""
    identity = ["-c", "user.name=imgclf tests", "-c", "user.email=tests@example.com", "-c", "commit.gpgsign=false"]
    result = subprocess.run(["git", *identity, *args], cwd=folder, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture
def isolated_git(tmp_path, monkeypatch):
    """git may not look above tmp_path for a repository, nor take one from the environment."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def project(isolated_git, monkeypatch) -> Path:
    """A user's project: a git repository with one commit (a tracked file), as the working directory."""
    folder = isolated_git / "my project"
    folder.mkdir()
    git(folder, "init", "-q")
    (folder / "train.py").write_text("print('hello')\n", encoding="utf-8")
    git(folder, "add", "train.py")
    git(folder, "commit", "-q", "-m", "first")
    monkeypatch.chdir(folder)
    return folder


def trained_env(data: Path, out: Path, name: str) -> dict:
    run = imgclf.train(data, FAST, out=out, name=name, report=False).run_dir
    return json.loads((run / "env.json").read_text(encoding="utf-8"))


def test_env_names_the_device_used_and_imgclf_version_outside_any_repository(isolated_git, monkeypatch, digits_source):
    elsewhere = isolated_git / "not a repository"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    env = trained_env(digits_source, isolated_git / "runs", "r")
    assert FAST["train"].get("device", "auto") == "auto"  # configured auto; the record says what auto chose
    assert env["device"] == describe_device(select_device("auto")) != "auto"
    assert env["device"] == ("cpu" if not torch.cuda.is_available() else f"cuda:0 ({torch.cuda.get_device_name(0)})")
    assert env["imgclf_version"] == imgclf.__version__
    assert env["repository"] is None and "git_commit" not in env
    assert Path(env["cwd"]).resolve() == elsewhere.resolve()


@needs_git
def test_env_records_the_users_repository_commit_and_whether_it_is_dirty(project, digits_source):
    head = git(project, "rev-parse", "HEAD")
    clean = trained_env(digits_source, project / "runs", "clean")  # the new run folder is untracked: not dirty
    assert clean["repository"] == {"path": clean["repository"]["path"], "commit": head, "dirty": False}
    assert Path(clean["repository"]["path"]).resolve() == project.resolve()

    (project / "train.py").write_text("print('changed')\n", encoding="utf-8")  # an uncommitted change
    dirty = trained_env(digits_source, project / "runs", "dirty")
    assert dirty["repository"]["commit"] == head and dirty["repository"]["dirty"] is True

    text = imgclf.report(project / "runs" / "dirty").markdown.read_text(encoding="utf-8")
    assert f"| repository commit (git, of the working directory) | {head} (uncommitted changes) in " in text
    assert f"| device | {dirty['device']} |" in text and f"| imgclf version | {imgclf.__version__} |" in text


@needs_git
def test_repository_before_the_first_commit_and_in_a_subfolder(isolated_git, monkeypatch):
    folder = isolated_git / "new"
    (folder / "sub").mkdir(parents=True)
    git(folder, "init", "-q")
    monkeypatch.chdir(folder / "sub")
    info = repository_info()
    assert info is not None and Path(info["path"]).resolve() == folder.resolve()  # the top, not the subfolder
    assert info["commit"] is None and info["dirty"] is False


@needs_git
def test_no_repository_entry_and_no_failure_without_git(project, monkeypatch, tmp_path):
    empty = tmp_path / "no programs"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # git cannot be found
    assert repository_info() is None


def test_the_version_env_json_records_is_imgclfs_and_tracking_reads_it_without_the_package_api():
    """env.json takes imgclf's version from `imgclf._version` (tracking sits below the package's API and does not
    import it); that version is the package's and pyproject.toml's."""
    import ast
    import re

    from imgclf import _version

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert _version.__version__ == imgclf.__version__ == re.search(r'^version = "(.+)"', pyproject, re.M)[1]
    for module in (Path(imgclf.__file__).parent / "tracking").glob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        bare = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Import) and any(
            alias.name == "imgclf" for alias in node.names)]  # fmt: skip
        assert not bare, f"{module.name}:{bare} imports the package imgclf itself"


def test_describe_device_names_cpu_and_the_gpu_model():
    assert describe_device(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        assert describe_device(torch.device("cuda")) == describe_device(torch.device("cuda:0")) == f"cuda:0 ({name})"


def test_config_yaml_and_the_bundle_record_the_early_pooling_auto_chose(tmp_path, digits_source):
    """`model.early_pool: auto` (the default) resolves by the compute used, once, and the run keeps the choice:
    config.yaml (so --resume and --reproduce build the same network anywhere) and the bundle's spec."""
    import yaml

    from imgclf.device import auto_early_pool, resolve_compute

    for precision in ("auto", "fp32"):
        config = {**FAST, "train": {**FAST["train"], "epochs": 1, "device": "cpu", "precision": precision}}
        run = imgclf.train(digits_source, config, out=tmp_path, name=precision, report=False).run_dir
        recorded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        expected = auto_early_pool(resolve_compute("cpu", recorded["train"]["precision"]))
        assert recorded["model"]["early_pool"] is expected
        spec = json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))["arch"]
        assert spec["options"]["early_pool"] is expected
    assert expected is True  # fp32 on a CPU: half the FLOPs
