"""What commands print as results: metrics tables, the diagnosis lines, predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from imgclf.cli.console import console, out_console

__all__ = ["cell", "print_metrics", "print_report", "show_predictions", "size_text"]


# --- output ------------------------------------------------------------------------------------------------------


def print_report(report: Any) -> None:
    """The diagnosis in one line per verdict, and where the report is."""
    if report is None:
        return
    for verdict in report.verdicts:
        out_console.print(f"diagnosis: [bold]{escape(verdict.title)}[/]")
    out_console.print(f"report: [bold]{escape(str(report.html))}[/] (open it in a browser; {report.markdown.name} too)")


def print_metrics(metrics: dict[str, Any]) -> None:
    """Headline metrics and the per-class table."""
    headline = Table(title=f"{metrics.get('split', 'test')} metrics ({metrics.get('n', '?')} images)")
    headline.add_column("metric")
    headline.add_column("value", justify="right")
    for key in (
        "accuracy",
        "balanced_accuracy",
        "top3_accuracy",
        "top5_accuracy",
        "macro_f1",
        "weighted_f1",
        "log_loss",
    ):
        if key in metrics:
            headline.add_row(key, f"{metrics[key]:.4f}")
    ood = metrics.get("ood")
    if ood:
        headline.add_row("answered (ood score <= threshold)", f"{ood['accepted']:.4f}")
        if ood.get("accuracy_accepted") is not None:
            headline.add_row("accuracy of the answered", f"{ood['accuracy_accepted']:.4f}")
    out_console.print(headline)
    per_class = Table("class", "precision", "recall", "f1", "support")
    for name, row in metrics.get("per_class", {}).items():
        per_class.add_row(
            escape(name),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    out_console.print(per_class)


def cell(value: Any, form: str = "{:.4f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return form.format(value)
    return str(value)


def size_text(size_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


def show_predictions(predictions: list, *, out: Path | None, to_stdout: bool, format_: str, top_k: int) -> None:
    """Predictions on standard output (--out -), a line naming the file written, or a table."""
    import sys

    from imgclf.deploy.predict import predictions_text

    if to_stdout:
        sys.stdout.write(predictions_text(predictions, top_k=top_k, format=format_))
        sys.stdout.flush()
    elif out is not None:
        console.print(f"{len(predictions)} predictions written to [bold]{escape(str(out))}[/]")
    else:
        columns = [header for rank in range(1, top_k + 1) for header in (f"class {rank}", f"p {rank}")]
        table = Table("path", "label", *columns, "ood score", "error")
        for p in predictions:
            cells = []
            for rank in range(top_k):
                has = rank < len(p.classes)
                cells += [escape(p.classes[rank]) if has else "", f"{p.probabilities[rank]:.3f}" if has else ""]
            ood = "" if p.ood_score is None else f"{p.ood_score:.2f}"
            table.add_row(escape(p.source), escape(p.label or ""), *cells, ood, escape(p.error or ""))
        out_console.print(table)
