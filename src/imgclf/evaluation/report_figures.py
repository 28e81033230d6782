"""The report's figures: one per question a reader asks, drawn from the run folder's files and rendered to PNG.

`draw_figures` reads a `RunRecord` (what `report.read_run` found) and returns the figures in reading order: the
data (training images, near-duplicates, likely label errors), the training (learning curves), the evaluation
(confusion matrices, per-class scores, calibration, accuracy against coverage) and the mistakes (a gallery and their
Grad-CAM). Only Grad-CAM needs the model; every other figure comes from the CSV and JSON files.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.evaluation import grids, plots
from imgclf.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from imgclf.evaluation.report import RunRecord

__all__ = [
    "DPI",
    "MAX_GRADCAM",
    "MAX_MISTAKES",
    "MAX_PAIRS",
    "MAX_SAMPLE_CLASSES",
    "SAMPLES_PER_CLASS",
    "THUMBNAIL",
    "Figure",
    "draw_figures",
    "loss_note",
]

log = logging.getLogger(__name__)

THUMBNAIL = 96  # px: gallery tiles; enough to see the object, small enough for a mailable report
SAMPLES_PER_CLASS = 6
MAX_SAMPLE_CLASSES = 40
MAX_MISTAKES = 24
MAX_GRADCAM = 8
MAX_PAIRS = 9  # near-duplicate pairs drawn
DPI = 100

Drawn = tuple[str, str, str, Any]  # (file stem, heading, caption, matplotlib Figure), before rendering


@dataclass(frozen=True)
class Figure:
    """One rendered figure: its file stem, heading and caption, and the PNG."""

    name: str
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def draw_figures(record: RunRecord, *, device: Any = "cpu", progress: Progress = NO_PROGRESS) -> dict[str, Figure]:
    """Every figure of the report, in reading order, rendered to PNG (each one as soon as it is drawn)."""
    figures: dict[str, Figure] = {}
    for drawn in (
        *_data_figures(record),
        *_training_figures(record),
        *_evaluation_figures(record),
        *_mistake_figures(record, device=device, progress=progress),
    ):
        name, title, caption, figure = drawn
        figures[name] = Figure(name, title, caption, _png(figure))
    return figures


def _data_figures(record: RunRecord) -> Iterator[Drawn]:
    """Training images per class, near-duplicate pairs, likely label errors: what the data holds."""
    classes = record.classes
    train_rows = record.manifest.split("train")
    samples = _samples_per_class(train_rows, classes[:MAX_SAMPLE_CLASSES], record)
    if samples:
        shown = "" if len(classes) <= MAX_SAMPLE_CLASSES else f" (the first {MAX_SAMPLE_CLASSES} classes)"
        yield (
            "samples",
            "Training images",
            f"A few training images per class{shown}.",
            grids.sample_grid_figure(samples),
        )
    near = [row for row in record.duplicates if row.get("kind") == "near"][:MAX_PAIRS]
    if near:
        images, captions = [], []
        for row in near:
            for side in ("a", "b"):
                images.append(_thumbnail(Path(row[f"path_{side}"]), record))
                captions.append(f"{row[f'split_{side}']} / {row[f'label_{side}']}\n{Path(row[f'path_{side}']).name}")
            captions[-1] += f"\ndistance {float(row['distance']):.3f} ({row['method']})"
        yield (
            "near_duplicates",
            "Near-duplicates across splits or labels",
            "Each pair: the same picture saved twice (re-encoded, resized, cropped or brightened), found by its "
            "perceptual hash or thumbnail and checked on aligned thumbnails; distance = 1 - their correlation. "
            "duplicates.csv lists every pair.",
            grids.image_grid_figure(images, captions, ncols=6),
        )
    if record.label_issues:
        from imgclf.evaluation.label_issues import label_issues_figure

        color = record.model["preprocessing"].get("color", "rgb")
        yield (
            "label_issues",
            "Likely label errors",
            "The images whose given label a model that never saw it finds least likely (out-of-fold probability of "
            "the given label, p(given)), with the class it suggests; label_issues.csv lists them all, ranked.",
            label_issues_figure(record.label_issues, color=color),
        )


def _training_figures(record: RunRecord) -> Iterator[Drawn]:
    """The learning curves, with the best epoch marked."""
    best_epoch = record.model.get("training", {}).get("best_epoch")
    yield (
        "learning_curves",
        "Learning curves",
        "Loss, accuracy and learning rate per epoch; the best epoch (kept weights) and phase changes are marked. "
        + loss_note(record.config),
        plots.learning_curves_figure(record.history, best_epoch=best_epoch),
    )


def _evaluation_figures(record: RunRecord) -> Iterator[Drawn]:
    """Confusion matrices, per-class scores, calibration and accuracy against coverage, on the evaluated split."""
    from imgclf.evaluation.metrics import confusion_matrix, reliability_bins

    classes = record.classes
    y_true = record.y_true
    matrix = confusion_matrix(y_true, record.probs.argmax(axis=1), len(classes)) if len(y_true) else None
    split = record.metrics.get("split", "test")
    if matrix is not None:
        yield (
            "confusion_counts",
            "Confusion matrix (counts)",
            f"Rows: true class, columns: predicted class, on the {split} split.",
            plots.confusion_matrix_figure(matrix, classes),
        )
        yield (
            "confusion_normalized",
            "Confusion matrix (row-normalised)",
            "Each row sums to 1: the diagonal is each class's recall.",
            plots.confusion_matrix_figure(matrix, classes, normalize=True),
        )
    if record.metrics.get("per_class"):
        yield (
            "per_class",
            "Precision, recall and F1 per class",
            f"On the {split} split.",
            plots.per_class_figure(record.metrics["per_class"]),
        )
    if len(y_true):
        yield (
            "reliability",
            "Calibration (reliability diagram)",
            "Accuracy against confidence: a calibrated model's bars follow the diagonal.",
            plots.reliability_figure(_reliability_curves(record, reliability_bins)),
        )
    selective = _selective(record)
    if selective is not None:
        yield selective


def _mistake_figures(record: RunRecord, *, device: Any, progress: Progress) -> Iterator[Drawn]:
    """The most confident mistakes, then where the model looked in them (Grad-CAM, which runs the model)."""
    mistakes = _mistakes(record)
    if not mistakes:
        return
    split = record.metrics.get("split", "test")
    images = [_thumbnail(Path(row["path"]), record) for row in mistakes]
    yield (
        "mistakes",
        "Most confident mistakes",
        f"The {len(mistakes)} misclassified {split} images the model was surest about, most confident first.",
        grids.mistakes_figure(
            images,
            [row["true"] for row in mistakes],
            [row["predicted"] for row in mistakes],
            [float(row["probability"]) for row in mistakes],
            [row["path"] for row in mistakes],
        ),
    )
    gradcam = _gradcam(record, mistakes[:MAX_GRADCAM], device=device, progress=progress)
    if gradcam is not None:
        yield (
            "gradcam",
            "Grad-CAM of the mistakes",
            "Where the model looked for the class it (wrongly) predicted: warm colours weigh most.",
            gradcam,
        )


# --- pieces of the figures ---------------------------------------------------------------------------------------


def _reliability_curves(record: RunRecord, reliability_bins) -> dict[str, dict[str, Any]]:
    """Reliability on the evaluated split; with a fitted temperature, also how the uncalibrated model looked."""
    split = record.metrics.get("split", "test")
    if record.temperature == 1.0:
        return {f"{split}": reliability_bins(record.y_true, record.probs)}
    return {
        f"{split}, before calibration": reliability_bins(record.y_true, record.uncalibrated_probs),
        f"{split}, after (T={record.temperature:.2f})": reliability_bins(record.y_true, record.probs),
    }


def _selective(record: RunRecord):
    """(name, title, caption, figure) of the accuracy-against-coverage curve, from predictions.csv's ood_score;
    None for runs written before imgclf scored them."""
    from imgclf.evaluation.ood import selective_accuracy

    scores = [row.get("ood_score") for row in record.readable]
    if not scores or any(not score for score in scores):
        return None
    scores = np.array([float(score) for score in scores])
    correct = (record.probs.argmax(axis=1) == record.y_true).astype(float)
    ood = record.metrics.get("ood") or {}
    split = record.metrics.get("split", "test")
    threshold = ood.get("threshold")
    caption = (
        f"Sorting the {split} images from most to least like the training data (the energy of the logits) and "
        "answering only the first ones: accuracy on those answered, as their share grows. "
    )
    if threshold is not None:
        caption += (
            f"The threshold stored with the model (chosen on validation) answers {ood['accepted']:.1%} of them "
            f"at accuracy {ood.get('accuracy_accepted') or 0:.4f}; `imgclf predict --abstain` says 'unknown' for "
            "the rest."
        )
    figure = plots.selective_figure(
        selective_accuracy(correct, scores),
        threshold_coverage=ood.get("accepted") if threshold is not None else None,
        full_accuracy=float(correct.mean()),
    )
    return "selective", "Accuracy against coverage", caption, figure


def _mistakes(record: RunRecord) -> list[dict[str, str]]:
    wrong = [row for row in record.readable if row["correct"] == "0"]
    return sorted(wrong, key=lambda row: (-float(row["probability"]), row["path"]))[:MAX_MISTAKES]


def _samples_per_class(rows, classes: Sequence[str], record: RunRecord) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)  # the same images on every rebuild
    by_class: dict[str, list] = {name: [] for name in classes}
    for row in rows:
        if row.label in by_class:
            by_class[row.label].append(row.path)
    samples = {}
    for name, files in by_class.items():
        chosen = rng.permutation(len(files))[:SAMPLES_PER_CLASS]
        samples[name] = [_thumbnail(files[i], record) for i in sorted(chosen)]
    return {name: images for name, images in samples.items() if images}


def _thumbnail(path: Path, record: RunRecord) -> np.ndarray:
    """The image in the model's colour mode, at most THUMBNAIL px."""
    from imgclf.data.images import load_thumbnail

    return load_thumbnail(path, color=record.model["preprocessing"].get("color", "rgb"), size=THUMBNAIL)


def _gradcam(record: RunRecord, rows: Sequence[Mapping[str, str]], *, device: Any, progress: Progress):
    """Grad-CAM for the predicted class of each row, drawn on the crop the model saw, with the layer it weighs."""
    import torch

    from imgclf.data.images import load_image
    from imgclf.data.preprocessing import eval_pixels
    from imgclf.data.transforms import eval_tensor
    from imgclf.deploy.bundle import load_bundle
    from imgclf.errors import ImageError, ImgclfError
    from imgclf.evaluation.explain import cam_layer, grad_cam

    bundle, model = load_bundle(record.paths.model, device)
    pre = bundle.preprocessing
    images, tensors, targets, captions = [], [], [], []
    with progress.task("Grad-CAM", total=len(rows)) as task:
        for row in rows:
            task.advance()
            try:
                image = load_image(Path(row["path"]), color=pre.color)
            except (ImageError, OSError):
                continue
            images.append(np.asarray(eval_pixels(image, pre)))
            tensors.append(eval_tensor(image, pre))
            targets.append(bundle.classes.index(row["predicted"]))
            captions.append(f"true {row['true']} → {row['predicted']} ({float(row['probability']):.2f})")
    if not tensors:
        return None
    try:
        layer = cam_layer(model, pre.img_size)  # chosen at the size the model is used at, not a dummy one
        heatmaps = grad_cam(model, torch.stack(tensors).to(device), targets, layer=layer.module)
    except ImgclfError as exc:  # a model without convolutions: the rest of the report still stands
        log.warning("report: no Grad-CAM (%s)", exc)
        return None
    return grids.gradcam_figure(images, list(heatmaps), captions, note=layer.caption())


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No metadata: the same run folder gives the same bytes, whichever matplotlib wrote them.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def loss_note(config: Mapping[str, Any]) -> str:
    """What the training and validation losses measure, and whether they can be compared."""
    train = config.get("train", {})
    smoothing, weights = train.get("label_smoothing") or 0, train.get("class_weights") == "auto"
    mixing = config.get("augment", {}).get("preset") == "strong"
    changes = [
        f"label smoothing {smoothing:g} (its floor is above 0 even for a perfect model)" if smoothing else "",
        "class weights" if weights else "",
        "MixUp/CutMix (mixed images and targets)" if mixing else "",
    ]
    changes = [c for c in changes if c]
    note = (
        "The loss panel draws the plain cross-entropy of the training batches (solid) against the validation "
        "cross-entropy: the same measure, so the two can be compared"
    )
    if changes:
        note += (
            f"; the training objective, with {', '.join(changes)}, is the dashed line, and it is not comparable "
            "with the validation loss"
        )
    return note + ". Training batches are augmented; validation images are not."
