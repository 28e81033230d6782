"""The CLI's output outside a terminal (CI, nohup, `| tee`): plain periodic progress lines, no blank lines, no
wrapping inside paths; and rich's bars still in a real terminal. The commands run in subprocesses with piped
stdout and stderr, as a CI job runs them."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli as run
from conftest import write_digits
from imgclf.cli import _PlainTask

LONG = "a-folder-name-long-enough-that-rich-would-wrap-it-at-80-columns-" * 2  # 130 characters
TINY = ["--img-size", "16", "--batch-size", "8", "--set", "model.width=8"]


def piped(*args, every: str | None = "0") -> subprocess.CompletedProcess:
    """`python -m imgclf ARGS` with stdout and stderr piped (not a TTY) and no COLUMNS, as in CI."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    if every is not None:
        env["IMGCLF_PROGRESS_SECONDS"] = every  # 0: a line at every update, so tiny tasks show their middle
    else:
        env.pop("IMGCLF_PROGRESS_SECONDS", None)
    return subprocess.run(
        [sys.executable, "-m", "imgclf", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def assert_plain(text: str) -> list[str]:
    lines = text.splitlines()
    assert "\x1b[" not in text, "no cursor control or colour codes"
    assert all(line.strip() for line in lines), "no blank lines"
    assert all(line == line.rstrip() for line in lines), "no lines padded to a width"
    return lines


@pytest.fixture(scope="module")
def long_digits(tmp_path_factory) -> Path:
    folder = write_digits(tmp_path_factory.mktemp("output") / LONG / "digits")
    assert len(str(folder)) > 100
    return folder


def test_train_piped_prints_progress_lines_unbroken_paths_and_no_blank_lines(tmp_path, long_digits):
    out = tmp_path / LONG / "runs"
    result = piped("train", long_digits, "--epochs", "1", *TINY, "--no-report", "--out", out, "--name", "r")

    assert result.returncode == 0, result.stderr[-3000:]
    lines = assert_plain(result.stderr)
    scanning = [line for line in lines if line.startswith(f"Checking images in {long_digits}: ")]
    assert re.search(r": 45/90 \(50%\), 0:00:\d\d, [\d.]+/s$", "\n".join(scanning), re.M), scanning
    assert scanning[-1].startswith(f"Checking images in {long_digits}: done, 90/90 (100%)")
    steps = [i for i, line in enumerate(lines) if re.match(r"epoch 1/1: \d/9 \(\d+%\), .*, loss \d", line)]
    summary = next(i for i, line in enumerate(lines) if line.startswith("INFO     epoch 1/1  train loss"))
    assert steps and steps[0] < summary, "progress inside the epoch, before its summary"
    assert any(line.startswith("INFO     run folder: ") and line.endswith(str(out / "r")) for line in lines)
    stdout = assert_plain(result.stdout)
    assert f"run folder: {out / 'r'}" in stdout
    assert any(line.startswith("│ accuracy") for line in stdout)


def test_lr_find_piped_reports_progress_and_keeps_paths_whole(tmp_path, long_digits):
    out = tmp_path / LONG / "lr"
    result = piped("lr-find", long_digits, *TINY, "--steps", "20", "--out", out)

    assert result.returncode == 0, result.stderr[-3000:]
    lines = assert_plain(result.stderr)
    assert any(line.startswith(f"Checking images in {long_digits}: 1/90 (1%)") for line in lines)
    assert any(
        line.startswith("INFO     LR finder suggests ") and line.endswith(str(out / "lr_find.png")) for line in lines
    )
    assert f"plot: {out / 'lr_find.png'}" in assert_plain(result.stdout)


def test_by_default_a_quick_task_prints_its_last_line(long_digits, tmp_path):
    result = piped("inspect", long_digits, "--out", tmp_path / LONG / "inspect", every=None)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = assert_plain(result.stderr)
    assert any(line.startswith(f"Checking images in {long_digits}: done, 90/90 (100%), 0:00:") for line in lines)
    assert str(tmp_path / LONG / "inspect") in result.stdout


def test_plain_progress_marks_tenths_no_closer_than_the_gap_and_beats_on_long_silences(capsys):
    now = [0.0]
    task = _PlainTask("work", 100, every_s=30.0, min_gap_s=2.0)
    task.clock = lambda: now[0]
    task.started = task.last_line = 0.0
    for at, amount in [(0.5, 10), (2.5, 10), (3.0, 5), (4.0, 1), (40.0, 64)]:
        now[0] = at
        task.advance(amount, loss="0.5")
    task.finish()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "work: 20/100 (20%), 0:00:02, 8.0/s, loss 0.5",  # 10 % came too soon after the start; 20 % did not
        "work: 90/100 (90%), 0:00:40, 2.2/s, loss 0.5",  # 30 s of silence
        "work: stopped at 90/100 (90%), 0:00:40, 2.2/s, loss 0.5",  # it ended short of its total
    ]

    unknown = _PlainTask("listing", None, every_s=30.0, min_gap_s=2.0)
    unknown.clock = lambda: now[0]
    unknown.started = unknown.last_line = now[0] = 0.0
    for at in (1.0, 20.0, 31.0):
        now[0] = at
        unknown.advance()
    unknown.finish()
    assert capsys.readouterr().err.splitlines() == ["listing: 3, 0:00:31, 0.1/s", "listing: done, 3, 0:00:31, 0.1/s"]


def test_a_bad_progress_interval_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("IMGCLF_PROGRESS_SECONDS", "often")
    result = run("models", "resnet18", "--limit", "1")
    assert result.exit_code == 2
    assert "IMGCLF_PROGRESS_SECONDS" in result.output


def test_a_terminal_still_gets_rich_bars():
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("IMGCLF_PROGRESS_SECONDS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "models", "resnet18", "--limit", "1"],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=120) == 0, output[-2000:]
    text = output.decode("utf-8", "replace")
    assert "\x1b[" in text  # the bar draws and erases itself
    assert "Reading model definitions: done" not in text
    assert "resnet18" in text
