"""Run folders and what a run records about itself, under the one name the rest of imgclf imports them by.

The code lives in one module per concept: `tracking.paths` (the run-folder contract, naming, `out/latest`,
`find_run`), `tracking.env` (env.json), `tracking.status` (status.json), `tracking.records` (reading a run's files
back) and `tracking.table` (the runs table). This module re-exports their names, so `from imgclf.tracking.runs
import ...` keeps working.
"""

from __future__ import annotations

from imgclf.tracking.env import GIT_TIMEOUT, environment_info, package_versions, repository_info, write_env
from imgclf.tracking.paths import (
    DEV_RUN_PREFIX,
    LATEST,
    RunPaths,
    check_writable,
    create_run_dir,
    find_run,
    point_latest,
)
from imgclf.tracking.records import flatten, read_history, read_json
from imgclf.tracking.status import CRASHED, STATUSES, StatusNote, read_status, read_status_file, record_status
from imgclf.tracking.table import RUN_COLUMNS, data_fingerprint, list_runs, sort_runs, summarize_run

__all__ = [
    "CRASHED",
    "DEV_RUN_PREFIX",
    "GIT_TIMEOUT",
    "LATEST",
    "RUN_COLUMNS",
    "STATUSES",
    "RunPaths",
    "StatusNote",
    "check_writable",
    "create_run_dir",
    "data_fingerprint",
    "environment_info",
    "find_run",
    "flatten",
    "list_runs",
    "package_versions",
    "point_latest",
    "read_history",
    "read_json",
    "read_status",
    "read_status_file",
    "record_status",
    "repository_info",
    "sort_runs",
    "summarize_run",
    "write_env",
]

_history = read_history  # the name tracking.compare imports
