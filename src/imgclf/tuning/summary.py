"""A study's files for people: trials.csv (one row per trial), history.png and importance.png (Optuna's plots)
and summary.html (one self-contained page: the space, the best trial, its test metrics, the plots)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgclf.files import write_bytes_atomic, write_csv_atomic, write_text_atomic
from imgclf.tuning.objective import OBJECTIVE
from imgclf.tuning.space import Dimension
from imgclf.tuning.storage import safe_url

__all__ = ["draw_plots", "show", "space_text", "write_summary", "write_trials_csv"]

log = logging.getLogger(__name__)


def write_trials_csv(path: Path, trials: Sequence[Any], dimensions: Sequence[Dimension]) -> None:
    """trials.csv: each trial's number, state, value, kept and last epoch, the epoch it was pruned after, seconds,
    host, run folder, searched values and error."""
    keys = [d.key for d in dimensions]
    header = [
        "number", "state", OBJECTIVE, "best_epoch", "epochs", "pruned_at", "seconds", "host", "run", *keys, "error"
    ]  # fmt: skip
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                _blank(t.value),
                _blank(t.user_attrs.get("best_epoch")),
                _blank(t.user_attrs.get("epochs")),
                _blank(t.user_attrs.get("pruned_at")),
                _blank(round(seconds, 1) if seconds is not None else None),
                t.user_attrs.get("host", ""),
                t.user_attrs.get("run", ""),
                *[_blank(t.params.get(key)) for key in keys],
                t.user_attrs.get("error", ""),
            ]
        )
    write_csv_atomic(path, header, rows)


def draw_plots(study: Any, study_dir: Path) -> dict[str, bytes]:
    """history.png and importance.png with Optuna's matplotlib plots; a plot Optuna cannot draw yet (importance
    needs two completed trials) is left out with a log line.

    Returns:
        The PNG bytes of each plot drawn, by name (history, importance).
    """
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    drawn = {}
    for name, draw in (("history", plots.plot_optimization_history), ("importance", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("tune: no %s plot yet (%s)", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(8, 4.5)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        write_bytes_atomic(study_dir / f"{name}.png", buffer.getvalue())
        drawn[name] = buffer.getvalue()
    return drawn


def write_summary(study_dir, name, url, counts, trials, best, test_metrics, figures, dimensions) -> None:
    """summary.html: the study's storage and trial counts, the searched space, the best trial (its values, run,
    test metrics once measured) and the plots, in one self-contained page."""
    import html

    def table(rows: Sequence[tuple[str, Any]]) -> str:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(show(v))}</td></tr>" for k, v in rows)
        return f"<table>{cells}</table>"

    parts = [
        f"<h1>imgclf tune: {html.escape(name)}</h1>",
        f"<p>Storage <code>{html.escape(safe_url(url))}</code>; {trials} trials asked for; "
        + ", ".join(f"{count} {state.lower()}" for state, count in counts.items())
        + f". Trials are ranked by the validation accuracy of the epoch each run kept ({OBJECTIVE}); the test split "
        "is evaluated for the best trial only, once.</p>",
        "<h2>Searched</h2>",
        table([(d.key, space_text(d)) for d in dimensions]),
    ]
    if best is not None:
        parts += [
            f"<h2>Best trial: {best.number}</h2>",
            table([(OBJECTIVE, best.value), *best.params.items(), ("run", best.user_attrs.get("run"))]),
            "<p>Train with it: <code>imgclf train DATA --config "
            + html.escape(str(study_dir / "best.yaml"))
            + "</code></p>",
        ]
        if test_metrics:
            keys = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "n")
            parts += ["<h3>Its test metrics (measured once)</h3>", table([(k, test_metrics.get(k)) for k in keys])]
    for key, title in (("history", "Validation accuracy per trial"), ("importance", "Which parameters mattered")):
        if key in figures:
            data = base64.b64encode(figures[key]).decode("ascii")
            parts += [f"<h2>{title}</h2>", f'<img alt="{key}" src="data:image/png;base64,{data}">']
    parts.append('<p>Every trial: <a href="trials.csv">trials.csv</a>; each is a run folder under trials/.</p>')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:0 auto;padding:0 1.5rem 2rem;color:#1d2330}"
        "table{border-collapse:collapse}td{border:1px solid #dde3ec;padding:.2rem .6rem}img{max-width:100%}"
        "code{background:#eef1f5;padding:0 .25rem}"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>imgclf tune: {html.escape(name)}'
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    write_text_atomic(study_dir / "summary.html", page)


def space_text(dimension: Dimension) -> str:
    """A searched key's values in words: `one of a, b` or `float 0.0003 .. 0.01, log scale`."""
    if dimension.kind == "categorical":
        return "one of " + ", ".join(map(str, dimension.choices))
    scale = ", log scale" if dimension.log else ""
    return f"{dimension.kind} {show(dimension.low)} .. {show(dimension.high)}{scale}"


def show(value: Any) -> str:
    """A value for people: floats to 4 significant digits, None as '-'."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _blank(value: Any) -> Any:
    return "" if value is None else value
