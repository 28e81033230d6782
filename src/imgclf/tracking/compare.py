"""`imgclf runs compare`: several run folders side by side, from their files alone: what differs in their
configuration, their metrics, and their learning curves overlaid (compare.html, one self-contained page, and
compare.png)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.errors import ConfigError
from imgclf.files import write_bytes_atomic, write_text_atomic
from imgclf.tracking.runs import _history, find_run, flatten, summarize_run

__all__ = ["Comparison", "compare_runs", "curves_figure"]

# Metrics shown side by side: (label, where in the summary)
COMPARED = (
    ("status", "status"),
    ("model", "model"),
    ("data", "data"),
    ("epochs", "epochs"),
    ("best epoch", "best_epoch"),
    ("best val accuracy", "best_val_acc"),
    ("best val loss", "best_val_loss"),
    ("test accuracy", "test_acc"),
    ("test balanced accuracy", "metrics.balanced_accuracy"),
    ("test macro F1", "metrics.macro_f1"),
    ("test log loss", "metrics.log_loss"),
    ("test ECE", "metrics.ece"),
    ("minutes", "minutes"),
)


@dataclass(frozen=True)
class Comparison:
    """What `compare_runs` found and wrote."""

    names: list[str]
    summaries: list[dict[str, Any]]
    differing: dict[str, list[Any]]  # config key -> its value in each run (only keys that differ)
    rows: list[tuple[str, list[Any]]]  # (metric label, value per run)
    html: Path
    png: Path


def compare_runs(runs: Sequence[Path | str], out: Path | str) -> Comparison:
    """Compare run folders: the configuration keys whose values differ, the metrics side by side, and overlaid
    learning curves; writes `out/compare.html` and `out/compare.png`.

    Args:
        runs: two or more run folders (a `runs/latest` link is followed).
        out: folder for compare.html and compare.png (created if needed).

    Raises:
        ConfigError: fewer than two runs. DataError: a path is not a run folder.

    Example:
        >>> import imgclf
        >>> runs = [imgclf.train("data/", {"train": {"epochs": 1, "lr": lr}}, report=False) for lr in (2e-3, 1e-3)]
        >>> compare_runs([run.run_dir for run in runs], "comparisons/").differing
        {'train.lr': [0.002, 0.001]}
    """
    import yaml

    if len(runs) < 2:
        raise ConfigError(f"compare needs at least two run folders; received {len(runs)}")
    paths = [find_run(Path(run)) for run in runs]
    summaries = [summarize_run(p.root) for p in paths]
    names = _unique_names([p.root for p in paths])
    configs = [flatten(yaml.safe_load(p.config.read_text(encoding="utf-8")) or {}) for p in paths]
    keys = sorted({key for config in configs for key in config})
    values = {key: [config.get(key) for config in configs] for key in keys}
    differing = {key: row for key, row in values.items() if len({json.dumps(v, default=str) for v in row}) > 1}
    rows = [(label, [_lookup(summary, where) for summary in summaries]) for label, where in COMPARED]
    histories = [_history(p.history) for p in paths]

    out = Path(out)
    png = out / "compare.png"
    figure = curves_figure(names, histories, [s["best_epoch"] for s in summaries])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    write_bytes_atomic(png, buffer.getvalue())
    html = out / "compare.html"
    write_text_atomic(
        html,
        _template().render(
            names=names,
            paths=[str(p.root) for p in paths],
            rows=[(label, [_show(v) for v in row]) for label, row in rows],
            differing={key: [_show(v) for v in row] for key, row in differing.items()},
            config=[(key, [_show(v) for v in row], key in differing) for key, row in values.items()],
            figure=base64.b64encode(buffer.getvalue()).decode("ascii"),
        ),
    )
    return Comparison(names, summaries, differing, rows, html, png)


def curves_figure(names: Sequence[str], histories: Sequence[Sequence[dict[str, Any]]], best: Sequence[Any]):
    """Loss (validation solid, training cross-entropy dashed) and accuracy against epoch, one colour per run, the
    kept epoch of each marked. Data in, matplotlib Figure out."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.6))
    loss_axis, acc_axis = figure.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(names))]
    for name, history, kept, colour in zip(names, histories, best, colours):
        epochs = [row.get("epoch") for row in history]
        for axis, train_key, val_key in ((loss_axis, "train_ce", "val_loss"), (acc_axis, "train_acc", "val_acc")):
            axis.plot(epochs, [_float(row.get(val_key)) for row in history], "-o", ms=3, color=colour, label=name)
            train = [_float(row.get(train_key)) for row in history]
            axis.plot(epochs, train, "--", color=colour, alpha=0.6, label=f"{name} (train)")
            for row in history:
                if row.get("epoch") == kept:
                    axis.plot([kept], [_float(row.get(val_key))], "*", ms=12, color=colour)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss: validation (solid), training (dashed)")
    acc_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy: validation (solid), training (dashed); * kept")
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_axis.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    return figure


def _unique_names(roots: Sequence[Path]) -> list[str]:
    """Each run's folder name, or parent/name where two runs share a folder name."""
    names = [root.name for root in roots]
    return [f"{root.parent.name}/{root.name}" if names.count(root.name) > 1 else root.name for root in roots]


def _lookup(summary: dict[str, Any], where: str) -> Any:
    if where.startswith("metrics."):
        return summary["metrics"].get(where.split(".", 1)[1])
    return summary.get(where)


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _template():
    from importlib import resources

    import jinja2

    source = resources.files("imgclf.tracking").joinpath("compare.html.j2").read_text(encoding="utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(source)
