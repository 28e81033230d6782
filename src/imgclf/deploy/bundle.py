"""The model bundle: `weights.safetensors` + `model.json` (architecture, classes, preprocessing, versions).

A bundle is everything needed to predict exactly as evaluation did; it loads without pickle. Exported files
(`model.onnx`, `model.ts`, `model.tflite`) sit beside it, and `model.json` records each one's check under
`exports`. Reading `model.json` needs no torch (the ONNX Runtime path carries the same description in its
metadata); only saving and loading the weights import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.data.preprocessing import Preprocessing
from imgclf.errors import CheckpointError
from imgclf.files import write_atomic, write_json_atomic
from imgclf.models.registry import ModelSpec
from imgclf.tracking.runs import package_versions

if TYPE_CHECKING:
    import torch
    from torch import nn

    from imgclf.training.state import FitState

__all__ = [
    "FORMAT",
    "WEIGHTS",
    "ModelBundle",
    "bundle_folder",
    "fitted_bundle",
    "kept_weights",
    "load_bundle",
    "read_bundle",
    "read_model_json",
    "record_export",
    "rewrite_description",
    "save_bundle",
]

FORMAT = "imgclf-model"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"


@dataclass(frozen=True)
class ModelBundle:
    """What `model.json` holds."""

    spec: ModelSpec
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    training: dict[str, Any] = field(default_factory=dict)
    # softmax(logits / temperature): 1.0 unless `--calibrate` fitted one on the validation split
    temperature: float = 1.0
    # whether a horizontally flipped image shows the same class (training used flips): gates `--tta`
    hflip_valid: bool | None = None
    # the out-of-distribution threshold chosen on validation (`evaluation.ood.OodThreshold.to_dict()`), or None
    ood: dict[str, Any] | None = None
    # what the model answered on validation (`evaluation.baseline.prediction_baseline`): the server's drift baseline
    baseline: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The description `model.json` and an export's metadata share."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "arch": self.spec.to_dict(),
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "training": self.training,
            "calibration": {"temperature": self.temperature},
            "tta": {"hflip": self.hflip_valid},
            "ood": self.ood,
            "baseline": self.baseline,
        }

    @classmethod
    def from_dict(cls, info: dict[str, Any], where: str) -> ModelBundle:
        """Parse `to_dict`'s output; `where` names the file in errors."""
        if info.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not an imgclf model (format {info.get('format')!r})")
        try:
            return cls(
                spec=ModelSpec.from_dict(info["arch"]),
                classes=tuple(info["classes"]),
                preprocessing=Preprocessing.from_dict(info["preprocessing"]),
                training=info.get("training", {}),
                temperature=float(info.get("calibration", {}).get("temperature", 1.0)),
                hflip_valid=info.get("tta", {}).get("hflip"),
                ood=info.get("ood"),
                baseline=info.get("baseline"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} lacks or garbles a field of the model description ({exc!r})") from None


def kept_weights(state: FitState) -> tuple[int | None, float | None]:
    """The epoch and the monitored metric of the weights a finished fit keeps (`state.kept`: the model's own, or
    their moving average's when it validated better)."""
    if state.kept == "ema":
        return state.best_ema_epoch, state.best_ema_metric
    return state.best_epoch, state.best_metric


def fitted_bundle(
    state: FitState,
    spec: ModelSpec,
    classes: tuple[str, ...],
    preprocessing: Preprocessing,
    *,
    run: str,
    monitor: str,
    ema_decay: float,
    hflip_valid: bool,
) -> ModelBundle:
    """The bundle of a finished fit: architecture, classes and preprocessing, and under `training` the run's name,
    the kept weights' epoch and `monitor` metric, which weights they are (and the average's decay).

    Args:
        state: the finished fit (`state.kept` says which weights ship).
        spec: the architecture the weights fit.
        classes: class names in index order.
        preprocessing: what evaluation, prediction and export apply to an image.
        run: the run folder's name.
        monitor: the name of the metric model selection watched (`val_loss`, `val_acc`).
        ema_decay: `train.ema_decay`, recorded when the fit averaged its weights.
        hflip_valid: whether training flipped images (gates `--tta`).
    """
    epoch, metric = kept_weights(state)
    training = {"run": run, "best_epoch": epoch, monitor: metric, "weights": state.kept}
    if state.ema is not None:
        training["ema_decay"] = ema_decay
    return ModelBundle(
        spec=spec, classes=classes, preprocessing=preprocessing, training=training, hflip_valid=hflip_valid
    )


def bundle_folder(path: Path) -> Path:
    """The bundle folder of a run folder (`runs/<name>/model`) or of a bundle folder itself."""
    folder = Path(path)
    if not (folder / MODEL_JSON).exists() and (folder / "model" / MODEL_JSON).exists():
        return folder / "model"
    return folder


def read_model_json(path: Path) -> dict[str, Any]:
    """The parsed `model.json` of a bundle or run folder.

    Raises:
        CheckpointError: no bundle there, or a file that is not JSON.
    """
    folder = bundle_folder(path)
    try:
        return json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no model bundle at {path} (expected {MODEL_JSON}; pass runs/<name>)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupted {folder / MODEL_JSON} ({exc})") from None


def read_bundle(path: Path) -> ModelBundle:
    """The `ModelBundle` of a bundle or run folder, without loading weights (and without torch)."""
    return ModelBundle.from_dict(read_model_json(path), str(bundle_folder(path) / MODEL_JSON))


def save_bundle(folder: Path, model: nn.Module, bundle: ModelBundle) -> Path:
    """Write the bundle into `folder` (created) and return it. Export records of the same weights are kept."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(weights, str(tmp), metadata={"format": FORMAT}))
    write_json_atomic(folder / MODEL_JSON, _model_json(bundle, exports={}))
    return folder


def rewrite_description(folder: Path, bundle: ModelBundle) -> None:
    """Rewrite `model.json` with `bundle`'s description (a fitted temperature, an OOD threshold); the weights and
    the export records stay.

    Exports made before keep the description they were made with in their own metadata: re-export to ship the
    new one (the caller warns).
    """
    exports = read_model_json(folder).get("exports", {})
    write_json_atomic(Path(folder) / MODEL_JSON, _model_json(bundle, exports=exports))


def record_export(folder: Path, name: str, entry: dict[str, Any]) -> None:
    """Add or replace `exports[name]` in `model.json` (atomically; nothing else changes)."""
    info = read_model_json(folder)
    info.setdefault("exports", {})[name] = entry
    write_json_atomic(Path(folder) / MODEL_JSON, info)


def _model_json(bundle: ModelBundle, *, exports: dict[str, Any]) -> dict[str, Any]:
    info = {**bundle.to_dict(), "versions": package_versions(("imgclf", "torch", "torchvision", "timm"))}
    if exports:
        info["exports"] = exports
    return info


def load_bundle(path: Path, device: torch.device | str = "cpu") -> tuple[ModelBundle, nn.Module]:
    """Read a bundle folder (or a run folder containing `model/`) and rebuild the network in eval mode.

    Raises:
        CheckpointError: missing or unreadable files, or weights that do not fit the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from imgclf.models.registry import build_model

    folder = bundle_folder(path)
    bundle = read_bundle(path)
    model = build_model(bundle.spec)
    try:
        weights = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"corrupted or missing weights {folder / WEIGHTS} ({exc})") from None
    missing, unexpected = _key_differences(model, weights)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not fit {bundle.spec.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(weights)
    return bundle, model.to(device).eval()


def _key_differences(model: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(weights)), sorted(set(weights) - expected)
