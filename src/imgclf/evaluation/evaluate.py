"""Evaluating a model on labelled images, and calibrating it: the rows to evaluate (a split of the run's
manifest, or another labelled folder), their predictions and metrics with the files they go to (metrics.json,
confusion_matrix.csv/png, predictions.csv), and temperature scaling on the validation split. `workflow` composes
these; the run folder is the only state."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgclf.config import load_config
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.data.scan import scan_folder
from imgclf.data.split import SplitManifest
from imgclf.errors import ConfigError, DataError
from imgclf.files import write_atomic, write_csv_atomic, write_json_atomic
from imgclf.progress import Progress
from imgclf.tracking.runs import RunPaths, find_run

__all__ = [
    "calibrate",
    "evaluate_rows",
    "fit_ood_threshold",
    "folder_rows",
    "manifest_rows",
    "predict_rows",
    "run_max_pixels",
    "score_rows",
    "training_overlap",
]

log = logging.getLogger(__name__)

# predictions.csv: these, then one `p_<class>` probability column per class
PREDICTION_COLUMNS = ("path", "true", "predicted", "probability", "correct", "error", "ood_score")


def manifest_rows(manifest: SplitManifest, split: str) -> tuple[list[tuple[Path, str]], str]:
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test; received '{split}'")
    rows = manifest.split(split)
    if not rows and split == "test":
        log.warning(
            "this run has no test split; reporting validation metrics instead (optimistic: the model "
            "was selected on them)"
        )
        rows, split = manifest.split("val"), "val"
    if not rows:
        raise DataError(f"the run's manifest has no {split} images")
    return [(row.path, row.label) for row in rows], split


def folder_rows(
    folder: Path, split: str | None, classes: Sequence[str], *, max_pixels: int
) -> tuple[list[tuple[Path, str]], str, list[str]]:
    """(path, label) rows, the split used and the images' sha256, of a labelled folder to evaluate on."""
    index = scan_folder(folder, max_pixels=max_pixels, labelled_only=True)
    if index.layout == "split":
        split = split or "test"
        records = [r for r in index.records if r.split == split]
        if not records:
            present = sorted({r.split for r in index.records if r.split})
            raise DataError(f"{folder} has no {split} images (it has {', '.join(present)}); pass --split")
    else:
        if split is not None:
            raise ConfigError(
                f"{folder} is a flat folder of classes (no train/val/test folders), so it has no {split} split; "
                "drop --split to evaluate on all its images"
            )
        records, split = list(index.records), "all"
        log.info("%s: a flat folder; evaluating on all its %d images", folder, len(records))
    unknown = sorted({r.label for r in records} - set(classes))
    if unknown:
        raise DataError(
            f"{folder} has classes the model does not know: {', '.join(unknown)} (model classes: {', '.join(classes)})"
        )
    return [(r.path, r.label) for r in records], split, [r.sha256 for r in records]


def training_overlap(run: Path, hashes: Sequence[str]) -> int | None:
    """How many of the images are identical (sha256) to the run's training images; warned when any are."""
    try:
        manifest = SplitManifest.load(find_run(run).manifest)
    except (DataError, OSError):
        return None  # a bundle without its run folder: nothing to compare with
    trained = {row.sha256 for row in manifest.split("train")}
    overlap = sum(1 for digest in hashes if digest in trained)
    if overlap:
        log.warning(
            "%d of the %d images are identical to training images of the run (sha256): the model has seen them, "
            "so their accuracy says how well it remembers, not how well it generalises",
            overlap,
            len(hashes),
        )
    return overlap


def run_max_pixels(model: Path) -> int:
    """The pixel limit a model was trained with (`data.max_pixels` of its run's config.yaml), found from the run
    folder, its `model/` bundle or an exported file inside it; the default when there is no run around it."""
    for folder in (model, model.parent, model.parent.parent):
        if (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml").data.max_pixels
    return DEFAULT_MAX_PIXELS


def predict_rows(predictor, rows, split: str, *, batch_size: int, tta: bool, progress: Progress):
    """(probabilities, error or None per row, class index per row) for `rows` [(path, label)]; unreadable rows
    are logged, and none readable at all is an error."""
    probs, _, errors, y_true = score_rows(predictor, rows, split, batch_size=batch_size, tta=tta, progress=progress)
    return probs, errors, y_true


def score_rows(predictor, rows, split: str, *, batch_size: int, tta: bool, progress: Progress):
    """`predict_rows` with each row's OOD score: (probabilities, OOD scores, errors, class indices)."""
    class_index = {label: i for i, label in enumerate(predictor.classes)}
    probs, ood, errors = predictor.scores([path for path, _ in rows], batch_size=batch_size, tta=tta, progress=progress)
    for error in errors:
        if error is not None:
            log.warning("skipped in evaluation: %s", error)
    if all(error is not None for error in errors):
        raise DataError(f"none of the {len(rows)} {split} images could be read")
    return probs, ood, errors, np.array([class_index[label] for _, label in rows])


def fit_ood_threshold(
    predictor, paths: RunPaths, manifest: SplitManifest, *, coverage: float, batch_size: int, progress: Progress
):
    """Choose the out-of-distribution threshold on the validation split (`coverage` of its images below it), record
    the split's prediction baseline (`evaluation.baseline`: what a server's live answers are compared with), store
    both in the bundle's model.json and return the predictor that carries them; without validation images,
    unchanged."""
    from dataclasses import replace

    from imgclf.deploy.bundle import rewrite_description
    from imgclf.evaluation.baseline import prediction_baseline
    from imgclf.evaluation.ood import choose_threshold

    rows = [(row.path, row.label) for row in manifest.split("val")]
    if not rows:
        log.warning("no validation split: no out-of-distribution threshold is stored (predict --abstain needs one)")
        return predictor
    probs, ood, errors, _ = score_rows(predictor, rows, "val", batch_size=batch_size, tta=False, progress=progress)
    threshold = choose_threshold(ood[[error is None for error in errors]], coverage)
    baseline = prediction_baseline(probs, predictor.classes, predictor.bundle.temperature)
    bundle = replace(predictor.bundle, ood=threshold.to_dict(), baseline=baseline)
    rewrite_description(paths.model, bundle)
    log.info(
        "out-of-distribution threshold: energy %.3f (%.0f %% of %d validation images below it); predict --abstain "
        "answers 'unknown' above it",
        threshold.threshold,
        100 * coverage,
        threshold.images,
    )
    return type(predictor)(bundle, predictor.runtime, max_pixels=predictor.max_pixels)


def evaluate_rows(
    predictor,
    rows,
    split: str,
    out_dir: Path,
    *,
    batch_size: int,
    tta: bool = False,
    overlap: int | None = None,
    progress: Progress,
) -> dict:
    """Predict `rows` [(path, label)], compute metrics and write metrics.json, confusion_matrix.{csv,png} and
    predictions.csv (with every class probability, for the report) into `out_dir`."""
    from imgclf.evaluation.metrics import classification_metrics, confusion_matrix
    from imgclf.evaluation.plots import confusion_matrix_figure

    classes = predictor.classes
    probs, ood, errors, y_true = score_rows(predictor, rows, split, batch_size=batch_size, tta=tta, progress=progress)
    ok = np.array([error is None for error in errors], dtype=bool)
    metrics = classification_metrics(y_true[ok], probs[ok], classes)
    metrics = {
        "split": split,
        "skipped": int((~ok).sum()),
        "tta": tta,
        "temperature": predictor.bundle.temperature,
        **metrics,
    }
    threshold = predictor.ood_threshold
    if threshold is not None:
        accepted = ood[ok] <= threshold.threshold
        correct = probs[ok].argmax(axis=1) == y_true[ok]
        metrics["ood"] = {
            "score": threshold.score,
            "threshold": threshold.threshold,
            "accepted": round(float(accepted.mean()), 6),  # the share of this split below the threshold
            "accuracy_accepted": round(float(correct[accepted].mean()), 6) if accepted.any() else None,
            "accuracy_abstained": round(float(correct[~accepted].mean()), 6) if (~accepted).any() else None,
        }
    if overlap is not None:
        metrics["identical_to_training_images"] = overlap
    matrix = confusion_matrix(y_true[ok], probs[ok].argmax(1), len(classes))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_csv_atomic(
        out_dir / "confusion_matrix.csv",
        ["true \\ predicted", *classes],
        ([classes[i], *map(int, matrix[i])] for i in range(len(classes))),
    )
    figure = confusion_matrix_figure(matrix, classes)
    write_atomic(out_dir / "confusion_matrix.png", lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    prediction_rows = []
    for (path, label), row, score, error in zip(rows, probs, ood, errors):
        if error is not None:
            prediction_rows.append([str(path), label, "", "", "", error, "", *[""] * len(classes)])
            continue
        best = int(row.argmax())
        prediction_rows.append(
            [
                str(path),
                label,
                classes[best],
                f"{row[best]:.6f}",
                int(classes[best] == label),
                "",
                f"{score:.4f}",
                *_probs(row),
            ]
        )
    write_csv_atomic(
        out_dir / "predictions.csv",
        [*PREDICTION_COLUMNS, *(f"p_{name}" for name in classes)],
        prediction_rows,
    )
    log.info("%s accuracy %.4f on %d images; metrics in %s", split, metrics["accuracy"], metrics["n"], out_dir)
    return metrics


def _probs(row: np.ndarray) -> list[str]:
    return [f"{value:.6f}" for value in row]


def calibrate(
    predictor, paths: RunPaths, manifest: SplitManifest, *, batch_size: int, force: bool = False, progress: Progress
):
    """Fit a temperature on the validation split, record it in calibration.json and the bundle, and return the
    predictor that applies it. Without validation images the model is returned unchanged (warned); a temperature
    fitted on too few images, or one that raises validation ECE, is refused (T stays 1, warned, recorded) unless
    `force`."""
    from dataclasses import replace

    from imgclf.deploy.bundle import read_model_json, rewrite_description
    from imgclf.evaluation.baseline import prediction_baseline
    from imgclf.evaluation.calibration import (
        apply_temperature,
        calibration_decision,
        calibration_summary,
        fit_temperature,
    )
    from imgclf.evaluation.metrics import reliability_bins

    rows = [(row.path, row.label) for row in manifest.split("val")]
    if not rows:
        log.warning("--calibrate needs a validation split; this run has none, so the model stays uncalibrated")
        return predictor
    uncalibrated = predictor.with_temperature(1.0)
    probs, errors, y_true = predict_rows(uncalibrated, rows, "val", batch_size=batch_size, tta=False, progress=progress)
    ok = np.array([error is None for error in errors], dtype=bool)
    probs, y_true = probs[ok], y_true[ok]
    fitted = fit_temperature(probs, y_true)
    summary = calibration_summary(y_true, probs, fitted)
    refused = calibration_decision(summary, int(ok.sum()), force=force)
    temperature = 1.0 if refused else fitted
    write_json_atomic(
        paths.calibration,
        {
            "method": "temperature scaling",
            "split": "val",
            "n": int(ok.sum()),
            **summary,
            "kept": refused is None,
            "refused_because": refused,
            "forced": force,
            "reliability_before": reliability_bins(y_true, probs),
            "reliability_after": reliability_bins(y_true, apply_temperature(probs, fitted)),
        },
    )
    figures = (
        f"temperature {fitted:.3f} fitted on {int(ok.sum())} validation images; validation ECE "
        f"{summary['ece_before']:.4f} -> {summary['ece_after']:.4f}, log loss {summary['log_loss_before']:.4f} -> "
        f"{summary['log_loss_after']:.4f}"
    )
    if refused:
        log.warning(
            "calibration refused, the model stays uncalibrated (T = 1): %s. %s. Keep it anyway with imgclf evaluate "
            "%s --calibrate --force-calibration",
            refused,
            figures,
            paths.root,
        )
    else:
        log.info("calibration: %s", figures)
    # the baseline's confidences at the temperature the model now answers with (its classes are the same)
    baseline = prediction_baseline(apply_temperature(probs, temperature), predictor.classes, temperature)
    bundle = replace(predictor.bundle, temperature=temperature, baseline=baseline)
    calibrated = type(predictor)(bundle, predictor.runtime, max_pixels=predictor.max_pixels)
    rewrite_description(paths.model, calibrated.bundle)
    exports = sorted(read_model_json(paths.model).get("exports", {}))
    if exports and temperature != predictor.bundle.temperature:
        log.warning(
            "the exported %s still carry the temperature %.3f they were made with; run imgclf export again to "
            "ship the new one",
            ", ".join(exports),
            predictor.bundle.temperature,
        )
    return calibrated
