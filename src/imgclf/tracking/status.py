"""status.json: what state a run is in (running / finished / stopped / failed, with the reason and the times), kept
true by `record_status` around training; `read_status` says "crashed" for a running record whose process is gone."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError, TrainingInterrupted
from imgclf.files import write_json_atomic
from imgclf.tracking.paths import RunPaths

__all__ = ["CRASHED", "STATUSES", "StatusNote", "read_status", "read_status_file", "record_status"]

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
        >>> from imgclf.tracking.paths import find_run
        >>> paths = find_run(Path("runs/small_cnn-20261128-120000"))
        >>> with record_status(paths) as note:
        ...     note.reason = "early stopping: val_loss did not improve for 10 epochs"
        >>> read_status_file(paths)["status"], read_status_file(paths)["reason"]
        ('finished', 'early stopping: val_loss did not improve for 10 epochs')
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
