"""Crash-safe file writes: every artifact is written to a temporary file beside it and `os.replace`d.

A reader therefore sees either the old complete file or the new complete file, never a partial one, even if
the process is killed mid-write. A full disk raises an error naming the file and leaves the old file intact.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from imgclf.errors import ImgclfError

__all__ = [
    "read_csv",
    "write_atomic",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

# Temporary files are created private (0600); finished artifacts get the permissions a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` in one `os.replace`.

    Args:
        path: the final file.
        write: writes the complete content to the temporary path it receives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ImgclfError(f"no space left writing {path}; the previous version was kept") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by imgclf, as dicts keyed by the header."""
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))
