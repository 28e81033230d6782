"""Resumable training state as plain data: one safetensors file per checkpoint, no pickle.

Tensors (model weights, optimizer moments, the weights' moving average) are safetensors entries named
`model.<name>`, `optimizer.<param index>.<name>` and `ema.<name>`; everything else (epoch, history, best metric,
scheduler and optimizer settings) is JSON in the file's metadata. One file means one atomic `os.replace`: a
checkpoint is either the old complete one or the new complete one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.optim import Optimizer

from imgclf.errors import CheckpointError
from imgclf.files import write_atomic

__all__ = ["FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint", "save_weights"]

FORMAT = "imgclf-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    meta: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None  # with train.ema: the averaged weights


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    schedule_state: dict[str, Any],
    meta: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model, optimizer and schedule state plus `meta` (JSON-able) to `path` atomically; `ema`: a state
    dict of averaged weights kept beside the model's."""
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    tensors.update({f"ema.{name}": value for name, value in (ema or {}).items()})
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for param_id, values in optimizer_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "schedule": schedule_state,
        "meta": meta,
    }
    # safetensors refuses tensors that share memory (tied weights) and needs contiguous CPU data.
    plain = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in tensors.items()}
    metadata = {"imgclf": json.dumps(header)}
    write_atomic(Path(path), lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def save_weights(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write a model's weights alone (no optimizer or schedule) in the checkpoint format, atomically:
    `load_checkpoint(path).model` reads them back."""
    plain = {
        f"model.{name}": value.detach().to("cpu", copy=True).contiguous() for name, value in model.state_dict().items()
    }
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "optimizer_param_groups": [],
        "optimizer_scalars": {},
        "schedule": {},
        "meta": meta,
    }
    write_atomic(Path(path), lambda tmp: save_file(plain, str(tmp), metadata={"imgclf": json.dumps(header)}))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: missing, truncated, not a safetensors file, or not an imgclf checkpoint; the message
            names the file and the other checkpoints in the same folder that may be used instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}{_alternatives(path)}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = json.loads((handle.metadata() or {})["imgclf"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        if header.get("format") != FORMAT:
            raise ValueError(f"format is {header.get('format')!r}, expected {FORMAT!r}")
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupted checkpoint {path} ({exc}){_alternatives(path)}") from None

    model = {name[len("model.") :]: t for name, t in tensors.items() if name.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = tensor
    for name, value in header["optimizer_scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer = {"state": state, "param_groups": header["optimizer_param_groups"]}
    ema = {name[len("ema.") :]: t for name, t in tensors.items() if name.startswith("ema.")}
    return Checkpoint(
        model=model, optimizer=optimizer, schedule=header["schedule"], meta=header["meta"], ema=ema or None
    )


def _alternatives(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.safetensors") if p.name != path.name)
    if not others:
        return ""
    return f"; other checkpoint(s) in {path.parent}: {', '.join(others)}"
