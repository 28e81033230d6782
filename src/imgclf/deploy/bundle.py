"""The model bundle: `weights.safetensors` + `model.json` (architecture, classes, preprocessing, versions).

A bundle is everything needed to predict exactly as evaluation did; it loads without pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from imgclf.data.transforms import Preprocessing
from imgclf.errors import CheckpointError
from imgclf.files import write_atomic, write_json_atomic
from imgclf.models.registry import ModelSpec, build_model
from imgclf.tracking.runs import package_versions

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


def save_bundle(folder: Path, model: nn.Module, bundle: ModelBundle) -> Path:
    """Write the bundle into `folder` (created) and return it."""
    folder = Path(folder)
    weights = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(weights, str(tmp), metadata={"format": FORMAT}))
    write_json_atomic(
        folder / MODEL_JSON,
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "arch": bundle.spec.to_dict(),
            "classes": list(bundle.classes),
            "preprocessing": bundle.preprocessing.to_dict(),
            "training": bundle.training,
            "calibration": {"temperature": bundle.temperature},
            "tta": {"hflip": bundle.hflip_valid},
            "versions": package_versions(("imgclf", "torch", "torchvision", "timm")),
        },
    )
    return folder


def load_bundle(path: Path, device: torch.device | str = "cpu") -> tuple[ModelBundle, nn.Module]:
    """Read a bundle folder (or a run folder containing `model/`) and rebuild the network in eval mode.

    Raises:
        CheckpointError: missing or unreadable files, or weights that do not fit the architecture.
    """
    folder = Path(path)
    if not (folder / MODEL_JSON).exists() and (folder / "model" / MODEL_JSON).exists():
        folder = folder / "model"
    try:
        info = json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no model bundle at {path} (expected {MODEL_JSON}; pass runs/<name>)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupted {folder / MODEL_JSON} ({exc})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{folder / MODEL_JSON} is not an imgclf model (format {info.get('format')!r})")
    bundle = ModelBundle(
        spec=ModelSpec.from_dict(info["arch"]),
        classes=tuple(info["classes"]),
        preprocessing=Preprocessing.from_dict(info["preprocessing"]),
        training=info.get("training", {}),
        temperature=float(info.get("calibration", {}).get("temperature", 1.0)),
        hflip_valid=info.get("tta", {}).get("hflip"),
    )
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
