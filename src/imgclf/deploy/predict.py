"""`Predictor`: load a bundle once, predict batches of files, PIL images or bytes with the eval preprocessing."""

from __future__ import annotations

import glob
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, open_image, to_mode
from imgclf.data.parallel import map_indices
from imgclf.data.scan import looks_like_image, walk_files
from imgclf.data.transforms import eval_tensor
from imgclf.deploy.bundle import ModelBundle, load_bundle
from imgclf.device import select_device
from imgclf.errors import ConfigError, ImageError
from imgclf.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one input, or the error that prevented a prediction."""

    source: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.classes[0] if self.classes else None


class Predictor:
    """A loaded model plus its preprocessing.

    Example:
        >>> predictor = Predictor.load("runs/small_cnn-20261128-120000")
        >>> predictor.predict(["cat.jpg"], top_k=3)[0].classes
        ('cat', 'dog', 'fox')
    """

    def __init__(
        self,
        bundle: ModelBundle,
        model: torch.nn.Module,
        device: torch.device,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.bundle = bundle
        self.max_pixels = max_pixels
        # channels_last: oneDNN and cuDNN convolutions run faster on it (small_cnn on 2 CPU cores: 1.8x)
        self.memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
        self.model = model.eval().to(memory_format=self.memory_format)
        self.device = device

    @classmethod
    def load(cls, path: Path | str, device: str = "auto") -> Predictor:
        """From a run folder or its `model/` bundle."""
        torch_device = select_device(device)
        bundle, model = load_bundle(Path(path), torch_device)
        return cls(bundle, model, torch_device)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.classes

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
        if tta:
            self.check_tta()
        probs = np.full((len(sources), len(self.classes)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(sources)
        # decoded on every core while the model runs (arrays, not tensors, cross the process boundary)
        prepared = map_indices(lambda index: _as_array(self._prepare(sources[index])), len(sources))
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
                    probs[rows] = self._forward(torch.from_numpy(np.stack(arrays)), tta=tta)
                task.advance(len(chunk))
        return probs, errors

    def predict(
        self,
        sources: Sequence[ImageSource | Image.Image],
        *,
        top_k: int = 1,
        batch_size: int = 64,
        tta: bool = False,
        progress: Progress = NO_PROGRESS,
    ) -> list[Prediction]:
        """Top-k predictions per source, in input order; unreadable sources get a `Prediction` with `error` set."""
        probs, errors = self.probabilities(sources, batch_size=batch_size, tta=tta, progress=progress)
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for source, row, error in zip(sources, probs, errors):
            name = _describe(source)
            if error is not None:
                results.append(Prediction(name, (), (), error))
                continue
            order = np.argsort(-row, kind="stable")[:k]
            results.append(Prediction(name, tuple(self.classes[i] for i in order), tuple(float(row[i]) for i in order)))
        return results

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

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor, *, tta: bool = False) -> np.ndarray:
        batch = batch.to(self.device).contiguous(memory_format=self.memory_format)
        probs = self._softmax(self.model(batch))
        if tta:
            probs = (probs + self._softmax(self.model(batch.flip(-1)))) / 2
        return probs.cpu().numpy()

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.bundle.temperature, dim=1)

    def _prepare(self, source: ImageSource | Image.Image) -> torch.Tensor | str:
        pre = self.bundle.preprocessing
        try:
            if isinstance(source, Image.Image):
                image = to_mode(source, pre.color)
            else:
                image = load_image(source, color=pre.color, max_pixels=self.max_pixels)
        except ImageError as exc:
            return str(exc)
        except OSError as exc:
            return f"{_describe(source)}: cannot read ({exc.strerror or exc})"
        return eval_tensor(image, pre)


def _as_array(outcome: torch.Tensor | str) -> np.ndarray | str:
    return outcome if isinstance(outcome, str) else outcome.numpy()


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files, folders (recursively; image files by extension or content) and glob patterns, in order.

    A path that does not exist and matches nothing is kept, so that its prediction row reports the error.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [p for p in walk_files(path).files if looks_like_image(p) or _sniff(p)]
        elif path.exists():
            found.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            found += [Path(m) for m in matches if Path(m).is_file()]
            if not matches:
                log.warning("pattern %s matched no files", item)
        else:
            found.append(path)
    return found


def _sniff(path: Path) -> bool:
    try:
        with open_image(path):
            return True
    except (ImageError, OSError):
        return False


def _describe(source: object) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<image>"
    if isinstance(source, bytes):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))
