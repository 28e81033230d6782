"""Likely label errors: images whose label the rest of the dataset contradicts, found by confident learning
(Northcutt, Jiang and Chuang, "Confident Learning", JAIR 2021) on out-of-fold predicted probabilities.

1. Features: frozen pretrained features of every image (`models.embeddings`), cached beside the decoded-image
   caches by the files' fingerprint.
2. Out-of-fold probabilities: `FOLDS`-fold multinomial logistic regression on them (scikit-learn; standardised
   features, C = `C`): each image's probabilities come from a model that never saw its label. Not the run's own
   predictions: a network trained on an image has learned its label, right or wrong, so its probabilities on its
   training images hide exactly the errors sought; K-fold training of the network would cost K trainings. The heads
   take seconds (2,000 images: ~10 s on 2 cores, the features ~15 s once).
3. Confident learning: per-class thresholds t_j (the mean probability of class j over the images labelled j); each
   image counts in the confident joint under the class, among those above their threshold, that it is most probable
   to be. The joint's off-diagonal estimates how many labels are wrong (reported beside what is flagged).
4. Flagged: images whose out-of-fold probability for their own label (confident learning's self-confidence score)
   is at most `MAX_SCORE` and that the heads assign to another class. Confident learning's own set (the joint's
   off-diagonal) flags ~1.5-2x the errors on Fashion-MNIST: it counts the classes' own ambiguity (shirt, T-shirt,
   pullover, coat) as noise, where the given label still gets 5-30 %, while a wrong label gets well under 1 %
   (benchmarks/label_issues.py measures precision and recall of both on labels flipped on purpose).

The score of an image is the out-of-fold probability of its given label (lower: likelier wrong); rank 1 is the
likeliest. Nothing here changes a label or a file: `data.exclude` (`--exclude label_issues.csv`, edited to the rows
to drop) leaves images out of a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.files import read_csv, write_csv_atomic
from imgclf.progress import NO_PROGRESS, Progress

__all__ = [
    "AUTO_RANGE",
    "FEATURES_VERSION",
    "FOLDS",
    "LABEL_ISSUE_COLUMNS",
    "MAX_SCORE",
    "MIN_PER_CLASS",
    "C",
    "LabelIssue",
    "LabelIssues",
    "confident_joint",
    "find_label_issues",
    "flag",
    "label_issues_figure",
    "label_issues_wanted",
    "out_of_fold_probabilities",
    "pretrained_features",
    "read_label_issues",
    "save_label_issues",
]

log = logging.getLogger(__name__)

FOLDS = 5
C = 0.01  # inverse L2 strength: the features have ~4,000 dimensions for a few thousand images
MAX_SCORE = 0.01  # the highest out-of-fold probability of its own label a flagged image may have
MIN_PER_CLASS = 5  # fewer images of a class than folds: no out-of-fold estimate for it
AUTO_RANGE = (500, 10_000)  # data.label_issues: auto looks at datasets of this many images (~1 min per 5,000)
FEATURES_VERSION = 1
LABEL_ISSUE_COLUMNS = ("rank", "path", "split", "given", "suggested", "score", "suggested_probability")


@dataclass(frozen=True)
class LabelIssue:
    """One likely mislabelled image."""

    rank: int  # 1 = likeliest wrong
    path: Path
    split: str
    given: str
    suggested: str  # the class the out-of-fold model prefers
    score: float  # out-of-fold probability of the given label
    suggested_probability: float


@dataclass(frozen=True)
class LabelIssues:
    """What `find_label_issues` found, and how."""

    issues: tuple[LabelIssue, ...]
    images: int
    classes: tuple[str, ...] = ()
    folds: int = 0
    accuracy: float | None = None  # out-of-fold accuracy against the given labels
    estimated: int | None = None  # confident learning's estimate of wrong labels (the joint's off-diagonal)
    seconds: float = 0.0
    skipped: str | None = None  # why no image was looked at

    def summary(self) -> dict[str, Any]:
        """JSON-ready: counts, the method, the out-of-fold accuracy."""
        return {
            "flagged": len(self.issues),
            "images": self.images,
            "estimated_by_confident_learning": self.estimated,
            "out_of_fold_accuracy": None if self.accuracy is None else round(self.accuracy, 4),
            "method": f"confident learning on {self.folds}-fold logistic regression over frozen pretrained features "
            f"(score <= {MAX_SCORE})",
            "seconds": round(self.seconds, 1),
            "skipped": self.skipped,
        }


def find_label_issues(
    rows: Sequence[Any],
    *,
    max_pixels: int,
    cache_dir: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> LabelIssues:
    """Likely mislabelled images among `rows` (manifest rows: path, label, split, sha256), ranked.

    Args:
        rows: the images and their given labels (every split: a wrong test label corrupts the test score too).
        max_pixels: the decoder's pixel limit.
        cache_dir: where the features are cached; default the decoded-image cache folder.
        device: where the backbone runs.
        seed: the folds' shuffle.
        progress: reporter for the feature pass.

    Returns:
        The flagged images, likeliest first, with what the method saw.

    Example:
        >>> import dataclasses
        >>> from imgclf.data.split import SplitManifest
        >>> rows = list(SplitManifest.load(Path("runs/small_cnn-20261128-120000/manifest.csv")).rows)
        >>> rows[0] = dataclasses.replace(rows[0], label="digit1")  # a 0 filed as a 1
        >>> found = find_label_issues(rows, max_pixels=50_000_000)
        >>> found.issues[0].path == rows[0].path, found.issues[0].given, found.issues[0].suggested
        (True, 'digit1', 'digit0')
    """
    started = time.perf_counter()
    rows = list(rows)
    labels = [row.label for row in rows]
    counts = {name: labels.count(name) for name in sorted(set(labels))}
    if len(counts) < 2 or min(counts.values()) < MIN_PER_CLASS:
        small = [name for name, count in counts.items() if count < MIN_PER_CLASS]
        why = (
            f"classes with fewer than {MIN_PER_CLASS} images ({', '.join(small)})" if small else "fewer than 2 classes"
        )
        return LabelIssues((), len(rows), tuple(counts), skipped=f"not looked for: {why}")
    # 1. frozen pretrained features of every readable image
    features, readable = pretrained_features(
        [Path(row.path) for row in rows],
        [row.sha256 for row in rows],
        max_pixels=max_pixels,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
    )
    kept = np.flatnonzero(readable)
    classes = tuple(counts)
    y = np.array([classes.index(labels[i]) for i in kept])
    folds = min(FOLDS, int(np.bincount(y, minlength=len(classes)).min()))
    if folds < 2:
        return LabelIssues((), len(rows), classes, skipped="not looked for: a class has fewer than 2 readable images")
    # 2. out-of-fold probabilities, 3. confident learning's flags, ranked
    probs = out_of_fold_probabilities(features[kept], y, folds=folds, seed=seed)
    _, joint = confident_joint(probs, y)
    issues = _ranked_issues(probs, y, [rows[i] for i in kept], classes)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    estimated = round(joint.sum() - np.trace(joint))
    seconds = time.perf_counter() - started
    log.info(
        "label issues: %d likely mislabelled image(s) of %d (confident learning estimates %d; out-of-fold accuracy "
        "%.3f, %d folds, %.0f s)",
        len(issues),
        len(rows),
        estimated,
        accuracy,
        folds,
        seconds,
    )
    return LabelIssues(issues, len(rows), classes, folds, accuracy, estimated, seconds)


def _ranked_issues(
    probs: np.ndarray, y: np.ndarray, rows: Sequence[Any], classes: tuple[str, ...]
) -> tuple[LabelIssue, ...]:
    """The flagged images (`flag`), lowest probability of the given label first, each with its likeliest other
    class; `rows[i]` is the image of `probs[i]` and `y[i]`."""
    flagged = flag(probs, y)
    score = probs[np.arange(len(y)), y]
    others = probs.copy()
    others[np.arange(len(y)), y] = -1
    suggested = others.argmax(axis=1)
    order = [i for i in np.argsort(score, kind="stable") if flagged[i]]
    return tuple(
        LabelIssue(
            rank=rank,
            path=Path(rows[i].path),
            split=rows[i].split,
            given=classes[y[i]],
            suggested=classes[suggested[i]],
            score=float(score[i]),
            suggested_probability=float(probs[i, suggested[i]]),
        )
        for rank, i in enumerate(order, start=1)
    )


def pretrained_features(
    paths: Sequence[Path],
    sha256: Sequence[str],
    *,
    max_pixels: int,
    cache_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress = NO_PROGRESS,
) -> tuple[np.ndarray, np.ndarray]:
    """The frozen features [N, D] of every image and which could be read, computed once per set of files (cached by
    their fingerprint, `data.cache.content_key`)."""
    from imgclf.data.cache import _common_folder, cached_arrays, content_key
    from imgclf.models.embeddings import EMBEDDING_MODEL, GRIDS, embed_images, resolution_for

    resolution = resolution_for(paths)
    key = content_key(paths, sha256, ["pretrained features", FEATURES_VERSION, EMBEDDING_MODEL, resolution, GRIDS])

    def build() -> dict[str, np.ndarray]:
        features, readable = embed_images(
            paths, resolution=resolution, max_pixels=max_pixels, device=device, progress=progress
        )
        return {"features": features, "readable": readable}

    arrays, _ = cached_arrays(
        "pretrained features", key, build, cache_dir=cache_dir, source=_common_folder(list(paths))
    )
    return arrays["features"], arrays["readable"]


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, *, folds: int, seed: int = 0) -> np.ndarray:
    """[N, classes] probabilities, each row from a logistic regression fitted on the other folds (stratified)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, features, labels, cv=splitter, method="predict_proba")


def confident_joint(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's joint of given and likely labels, calibrated to the label counts, and which images it
    puts off the diagonal (their likely class is another one).

    Returns:
        (off-diagonal mask [N], calibrated joint [K, K] whose rows sum to the counts of each given label).

    Example:
        >>> off, joint = confident_joint(np.array([[0.9, 0.1], [0.1, 0.9], [0.95, 0.05]]), np.array([0, 1, 1]))
        >>> off.tolist()
        [False, False, True]
    """
    classes = probs.shape[1]
    counts = np.bincount(labels, minlength=classes)
    thresholds = np.array(
        [probs[labels == k, k].mean() if counts[k] else 1.0 for k in range(classes)]
    )  # the mean self-confidence of each class
    above = probs >= thresholds[None, :] - 1e-12
    likely = np.where(above, probs, -1.0).argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((classes, classes))
    np.add.at(joint, (labels[counted], likely[counted]), 1)
    rows = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * counts[:, None]
    return counted & (likely != labels), calibrated


def flag(probs: np.ndarray, labels: np.ndarray, max_score: float = MAX_SCORE) -> np.ndarray:
    """Images whose own label gets at most `max_score` and that the model assigns to another class."""
    score = probs[np.arange(len(labels)), labels]
    return (score <= max_score) & (probs.argmax(axis=1) != labels)


def save_label_issues(found: LabelIssues, path: Path) -> None:
    """`label_issues.csv`: rank, path, split, given, suggested, score, suggested_probability (likeliest first)."""
    rows = (
        (i.rank, i.path, i.split, i.given, i.suggested, f"{i.score:.6f}", f"{i.suggested_probability:.6f}")
        for i in found.issues
    )
    write_csv_atomic(path, LABEL_ISSUE_COLUMNS, rows)


def read_label_issues(path: Path | str) -> list[dict[str, str]]:
    """The rows of a `label_issues.csv` ([] when absent)."""
    path = Path(path)
    return read_csv(path) if path.is_file() else []


def label_issues_wanted(setting: bool | str, images: int) -> bool:
    """Whether `data.label_issues` asks for a look at a dataset of `images` images (auto: AUTO_RANGE)."""
    if setting == "auto":
        return AUTO_RANGE[0] <= images <= AUTO_RANGE[1]
    return bool(setting)


def label_issues_figure(rows: Sequence[Any], *, color: str = "rgb", limit: int = 24, ncols: int = 6):
    """A gallery of the likeliest mislabelled images (LabelIssue or label_issues.csv rows), captioned given ->
    suggested and the score; None when there are none."""
    from imgclf.data.images import load_thumbnail
    from imgclf.evaluation.plots import image_grid_figure

    rows = list(rows)[:limit]
    if not rows:
        return None
    images = [load_thumbnail(Path(_get(row, "path")), color=color, size=96) for row in rows]
    captions = [
        f"#{_get(row, 'rank')} given: {_get(row, 'given')}\nlikely: {_get(row, 'suggested')} "
        f"(p(given) {float(_get(row, 'score')):.3f})\n{Path(_get(row, 'path')).name}"
        for row in rows
    ]
    return image_grid_figure(images, captions, ncols=ncols, title="Likely label errors (check these first)")


def _get(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, dict) else getattr(row, key)
