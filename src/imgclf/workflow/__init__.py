"""The workflows behind the public API. Each composes the layers below and nothing else:
scan -> split -> loaders -> model -> fit -> bundle -> evaluate; predict and split stand alone.

| module | holds |
|---|---|
| `train.py` | `train` (a new run: checks, scan, run folder and records, then the run), `--fast-dev-run`, `lr_find` |
| `run.py` | one run: `_train_run` (status.json, the run hooks) around `_fit_run` (the recipe, in numbered steps) |
| `resume.py` | `--resume` (`_resume`, `RESUME_SETTINGS`, extension phase), `reproduce`; what either refuses, alone |
| `inference.py` | `evaluate`, `report`, `load_model`, `predict`, `export`, `serve_app`, `serve` (uvicorn, workers) |
| `data.py` | `scan_data`, `split`, a run's preparation (`_prepare`) and its data records (manifest, label issues) |
| `results.py` | `TrainResult`, `EvalResult`, `SplitResult` |

Callers use these names from `imgclf.workflow`; the functions look `_prepare` up here, on the package (tests wrap
`imgclf.workflow._prepare` to break files between the scan and training).
"""

from __future__ import annotations

from imgclf.workflow.data import PROBLEM_COLUMNS, ScannedData, scan_data, split
from imgclf.workflow.data import _prepare as _prepare  # re-exported: looked up here (see above)
from imgclf.workflow.inference import SPLIT_NAMES, evaluate, export, load_model, predict, report, serve, serve_app
from imgclf.workflow.results import EvalResult, SplitResult, TrainResult
from imgclf.workflow.resume import REPRODUCE_SETTINGS, RESUME_SETTINGS, reproduce
from imgclf.workflow.train import FAST_DEV_RUN, lr_find, train  # after resume: `train` names the function

__all__ = [
    "FAST_DEV_RUN",
    "PROBLEM_COLUMNS",
    "REPRODUCE_SETTINGS",
    "RESUME_SETTINGS",
    "SPLIT_NAMES",
    "EvalResult",
    "ScannedData",
    "SplitResult",
    "TrainResult",
    "evaluate",
    "export",
    "load_model",
    "lr_find",
    "predict",
    "report",
    "reproduce",
    "scan_data",
    "serve",
    "serve_app",
    "split",
    "train",
]
