"""`imgclf` command line: each command parses its flags, builds a config, calls `imgclf.workflow`, and maps
errors to exit codes (0 ok, 1 failure, 2 usage error, 130 interrupted).

- `app`: the Typer app and its top-level options;
- `console`: consoles, progress (rich bars in a terminal, plain lines elsewhere), logging, the error wrapper;
- `options`: shared options and `training_options`, which gives train and tune every flag of `imgclf.flags`;
- `output`: what commands print (metrics, diagnosis, predictions);
- one module per command group: `train` (train, tune, lr-find), `inference` (evaluate, predict, export, serve),
  `data` (split, init, inspect, preview), `runs` (report, runs, runs compare), `housekeeping` (models, demo,
  config, cache).

Heavy modules (torch, the workflow) are imported inside the commands, so `imgclf --help` answers at once.
"""

from __future__ import annotations

from imgclf.cli import data, housekeeping, inference, runs, train  # noqa: F401  (each registers its commands)
from imgclf.cli.app import app
from imgclf.cli.console import _PlainTask
from imgclf.cli.options import FLAG_KEYS, flag_name
from imgclf.cli.train import train as train_command
from imgclf.cli.train import tune as tune_command

__all__ = ["FLAG_KEYS", "_PlainTask", "app", "flag_name", "main", "train_command", "tune_command"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="imgclf")
