"""`Predictor`: load a model once, predict batches of files, PIL images or bytes with the eval preprocessing.

One `Predictor` for every backend: a run folder or bundle runs eager PyTorch, an `.onnx` file runs ONNX Runtime
with the classes, preprocessing and temperature its metadata carries (and imports no torch). Decoding and
preprocessing are `data.images.load_image` and `data.preprocessing.eval_array`, the same as evaluation's.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_mode
from imgclf.data.parallel import map_indices
from imgclf.data.preprocessing import Preprocessing, eval_array
from imgclf.deploy.bundle import ModelBundle
from imgclf.deploy.runtimes import Runtime
from imgclf.errors import CheckpointError, ConfigError, ImageError
from imgclf.evaluation.ood import OodThreshold, energy
from imgclf.files import write_text_atomic
from imgclf.progress import NO_PROGRESS, Progress

__all__ = [
    "ONNX_METADATA_KEY",
    "OUTPUT_FORMATS",
    "Prediction",
    "Predictor",
    "predictions_text",
    "prepare",
    "write_predictions",
]

log = logging.getLogger(__name__)

# the metadata_props key of an exported ONNX model that holds its `ModelBundle.to_dict()` as JSON
ONNX_METADATA_KEY = "imgclf"
OUTPUT_FORMATS = ("csv", "jsonl")


UNKNOWN = "unknown"  # the label of an input the model abstains on (`predict --abstain`)


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one input, or the error that prevented a prediction.

    `ood_score` is how unlike the training data the input is (`evaluation.ood`: the energy of the logits, higher =
    more unusual); `unknown` is set when the caller asked to abstain and the score is above the model's threshold.
    """

    source: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    error: str | None = None
    ood_score: float | None = None
    unknown: bool = False

    @property
    def label(self) -> str | None:
        """The answer: the most probable class, or `unknown` when the model abstained."""
        if self.unknown:
            return UNKNOWN
        return self.classes[0] if self.classes else None


class Predictor:
    """A loaded model (on any runtime) plus its preprocessing.

    Example:
        >>> predictor = Predictor.load("runs/small_cnn-20261128-120000")
        >>> predictor.predict(["cat.jpg"], top_k=3)[0].classes  # a digits model: its 3 classes, most probable first
        ('digit...', 'digit...', 'digit...')
        >>> Predictor.load("runs/small_cnn-20261128-120000/model/model.onnx").runtime.name
        'onnxruntime'
    """

    def __init__(self, bundle: ModelBundle, runtime: Runtime, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, path: Path | str, device: str = "auto", *, threads: int | None = None) -> Predictor:
        """From a run folder, its `model/` bundle (eager PyTorch on `device`) or an exported `.onnx` file
        (ONNX Runtime on the CPU with `threads` intra-op threads, default all cores; no torch import)."""
        path = Path(path)
        if path.suffix == ".onnx":
            return cls.from_onnx(path, threads=threads)
        if path.suffix in (".ts", ".tflite", ".pt", ".pth"):
            raise ConfigError(
                f"{path}: imgclf predicts with a run folder, its model/ bundle or an exported .onnx file; "
                f"{path.suffix} files are for other runtimes (their model.json beside them describes them)"
            )
        from imgclf.deploy.bundle import load_bundle
        from imgclf.deploy.runtimes import TorchRuntime
        from imgclf.device import select_device

        torch_device = select_device(device)
        bundle, model = load_bundle(path, torch_device)
        return cls(bundle, TorchRuntime(model, torch_device))

    @classmethod
    def from_onnx(cls, path: Path, *, threads: int | None = None) -> Predictor:
        """An exported `.onnx` file: its metadata says the classes, preprocessing and temperature."""
        from imgclf.deploy.runtimes import OnnxRuntime

        if not path.is_file():
            raise CheckpointError(f"no ONNX model at {path}; make one with: imgclf export runs/<name>")
        runtime = OnnxRuntime(path, threads=threads)
        raw = runtime.metadata().get(ONNX_METADATA_KEY)
        if raw is None:
            raise CheckpointError(
                f"{path} has no '{ONNX_METADATA_KEY}' metadata (classes, preprocessing): export it with "
                "imgclf export, or predict with its run folder"
            )
        try:
            info = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its '{ONNX_METADATA_KEY}' metadata is not JSON ({exc})") from None
        return cls(ModelBundle.from_dict(info, f"{path} metadata"), runtime)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.classes

    def with_temperature(self, temperature: float) -> Predictor:
        """The same model and runtime, with probabilities `softmax(logits / temperature)`."""
        return Predictor(replace(self.bundle, temperature=temperature), self.runtime, max_pixels=self.max_pixels)

    def prepare(self, source: ImageSource | Image.Image) -> np.ndarray | str:
        """Decode and preprocess one input into the model's float32 [C, H, W] input, or the error message."""
        return prepare(source, self.bundle.preprocessing, max_pixels=self.max_pixels)

    @property
    def ood_threshold(self) -> OodThreshold | None:
        """The out-of-distribution threshold stored with the model (chosen on validation), or None for models
        trained before imgclf stored one."""
        return OodThreshold.from_dict(self.bundle.ood)

    def infer(self, batch: np.ndarray, *, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, classes], OOD scores [N]) for a preprocessed float32 batch [N, C, H, W] (`prepare`'s
        arrays stacked): the one forward path of the CLI, the Python API and the server. The OOD score is the
        energy of the image's own logits (with `tta` too: the threshold was chosen without flips)."""
        logits = self.runtime.logits(batch)
        probs = self._softmax(logits)
        if tta:
            probs = (probs + self._softmax(self.runtime.logits(np.ascontiguousarray(batch[..., ::-1])))) / 2
        return probs, energy(logits).astype(np.float32)

    def predict_batch(self, batch: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """Probabilities [N, classes] of `infer`."""
        return self.infer(batch, tta=tta)[0]

    def probabilities(
        self,
        sources: Sequence[ImageSource | Image.Image],
        *,
        batch_size: int = 64,
        tta: bool = False,
        progress: Progress = NO_PROGRESS,
    ) -> tuple[np.ndarray, list[str | None]]:
        """Class probabilities for each source; rows of unreadable sources are NaN with an error message.

        Probabilities are `softmax(logits / T)` with the bundle's temperature (1 unless calibrated).

        Args:
            sources: paths, bytes, file objects or PIL images.
            batch_size: images per forward pass.
            tta: average the probabilities of each image and its horizontal mirror (see `check_tta`).
            progress: reporter, one unit per image.

        Returns:
            (probabilities of shape [len(sources), num_classes], error message or None per source).
        """
        probs, _, errors = self.scores(sources, batch_size=batch_size, tta=tta, progress=progress)
        return probs, errors

    def scores(
        self,
        sources: Sequence[ImageSource | Image.Image],
        *,
        batch_size: int = 64,
        tta: bool = False,
        progress: Progress = NO_PROGRESS,
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """`probabilities`, with each source's OOD score [len(sources)] (NaN for unreadable sources) in the middle."""
        if tta:
            self.check_tta()
        probs = np.full((len(sources), len(self.classes)), np.nan, dtype=np.float32)
        ood = np.full(len(sources), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(sources)
        # decoded on every core while the model runs (arrays cross the process boundary)
        prepared = map_indices(lambda index: self.prepare(sources[index]), len(sources))
        with progress.task("Predicting", total=len(sources)) as task:
            for start in range(0, len(sources), batch_size):
                chunk = list(itertools.islice(prepared, batch_size))
                arrays: list[np.ndarray] = []
                rows: list[int] = []
                for offset, outcome in enumerate(chunk):
                    if isinstance(outcome, str):
                        errors[start + offset] = outcome
                    else:
                        arrays.append(outcome)
                        rows.append(start + offset)
                if arrays:
                    probs[rows], ood[rows] = self.infer(np.stack(arrays), tta=tta)
                task.advance(len(chunk))
        return probs, ood, errors

    def predict(
        self,
        sources: Sequence[ImageSource | Image.Image],
        *,
        top_k: int = 1,
        batch_size: int = 64,
        tta: bool = False,
        abstain: bool = False,
        progress: Progress = NO_PROGRESS,
    ) -> list[Prediction]:
        """Top-k predictions per source, in input order; unreadable sources get a `Prediction` with `error` set.
        With `abstain`, an input whose OOD score is above the model's threshold is labelled `unknown`."""
        if abstain:
            self.check_abstain()
        probs, ood, errors = self.scores(sources, batch_size=batch_size, tta=tta, progress=progress)
        return [
            Prediction(_describe(source), (), (), error)
            if error
            else self.top_k(_describe(source), row, top_k, ood_score=float(score), abstain=abstain)
            for source, row, score, error in zip(sources, probs, ood, errors)
        ]

    def top_k(
        self, source: str, probabilities: np.ndarray, k: int, *, ood_score: float | None = None, abstain: bool = False
    ) -> Prediction:
        """The `k` most probable classes of one row of probabilities, with its OOD score; `abstain`: `unknown`
        above the model's threshold."""
        order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(self.classes)))]
        threshold = self.ood_threshold
        unknown = bool(abstain and threshold is not None and ood_score is not None and ood_score > threshold.threshold)
        return Prediction(
            source,
            tuple(self.classes[i] for i in order),
            tuple(float(probabilities[i]) for i in order),
            ood_score=ood_score,
            unknown=unknown,
        )

    def check_abstain(self) -> None:
        """`--abstain` needs the threshold training stores (models trained before imgclf stored one have none).

        Raises:
            ConfigError: the model has no OOD threshold.
        """
        if self.ood_threshold is None:
            raise ConfigError(
                "--abstain answers 'unknown' above the out-of-distribution threshold stored with the model, and this "
                "model has none (trained before imgclf stored it): choose one with `imgclf evaluate RUN --ood` or "
                "drop --abstain; the ood_score column is written either way"
            )

    def check_tta(self) -> None:
        """Flip TTA is only honest when a mirrored image shows the same class, i.e. training used flips.

        Raises:
            ConfigError: the model was trained with `--no-hflip` (digits, text, arrows: a mirror changes them).
        """
        if self.bundle.hflip_valid is False:
            raise ConfigError(
                "--tta averages each image with its mirror, but this model was trained without horizontal flips "
                "(augment.hflip: false), so mirrored images are not valid inputs for it; drop --tta"
            )

    def _softmax(self, logits: np.ndarray) -> np.ndarray:
        scaled = logits.astype(np.float32) / np.float32(self.bundle.temperature)
        scaled -= scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(axis=1, keepdims=True)


def prepare(source: ImageSource | Image.Image, pre: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """One input decoded by the safe decoder and preprocessed for evaluation: float32 [C, H, W], or the error
    message (str) when it cannot be read."""
    try:
        if isinstance(source, Image.Image):
            image = to_mode(source, pre.color)
        else:
            image = load_image(source, color=pre.color, max_pixels=max_pixels)
    except ImageError as exc:
        return str(exc)
    except OSError as exc:
        return f"{_describe(source)}: cannot read ({exc.strerror or exc})"
    return eval_array(image, pre)


def predictions_text(predictions: Sequence[Prediction], *, top_k: int, format: str = "csv") -> str:
    """Predictions as CSV (`path, label, class_1, probability_1, ..., class_k, probability_k, ood_score, error`) or
    JSON Lines (one `{"path", "label", "classes", "probabilities", "ood_score", "error"}` object per input); `label`
    is the answer (`unknown` where the model abstained)."""
    if format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}; received '{format}'")
    if format == "jsonl":
        lines = (
            json.dumps(
                {
                    "path": p.source,
                    "label": p.label,
                    "classes": list(p.classes),
                    "probabilities": [round(v, 6) for v in p.probabilities],
                    "ood_score": None if p.ood_score is None else round(p.ood_score, 4),
                    "error": p.error,
                },
                ensure_ascii=False,
            )
            for p in predictions
        )
        return "".join(line + "\n" for line in lines)
    header = ["path", "label"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    header += ["ood_score", "error"]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for prediction in predictions:
        row: list[object] = [prediction.source, prediction.label or ""]
        for rank in range(top_k):
            if rank < len(prediction.classes):
                row += [prediction.classes[rank], f"{prediction.probabilities[rank]:.6f}"]
            else:
                row += ["", ""]
        row += ["" if prediction.ood_score is None else f"{prediction.ood_score:.4f}", prediction.error or ""]
        writer.writerow(row)
    return buffer.getvalue()


def write_predictions(predictions: Sequence[Prediction], path: Path, *, top_k: int, format: str = "csv") -> None:
    """Write `predictions_text` to `path` atomically (a reader never sees half a file)."""
    write_text_atomic(path, predictions_text(predictions, top_k=top_k, format=format))


def _describe(source: object) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<image>"
    if isinstance(source, bytes):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))
