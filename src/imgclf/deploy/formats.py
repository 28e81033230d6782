"""The three export formats, each as a writer, its runtime, where it stores the model description, and what
`model.json` records about it; `deploy.export` runs the same check on each.

- onnx: `torch.onnx.export(dynamo=True)` with a dynamic batch axis; ONNX Runtime; `metadata_props` ("imgclf");
- torchscript: `torch.jit.trace`; `torch.jit.load`; the extra file `imgclf.json`;
- tflite: `litert_torch.convert` at one fixed batch size; LiteRT's interpreter; `model.json` beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.deploy.predict import ONNX_METADATA_KEY
from imgclf.deploy.runtimes import ONNX_INPUT, ONNX_OUTPUT, OnnxRuntime, Runtime
from imgclf.errors import ConfigError
from imgclf.tracking.runs import package_versions

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Exporter", "annotate_onnx", "exporters", "quiet"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exporter:
    require: Callable[[], None]  # raises ConfigError naming the extra to install
    write: Callable[[nn.Module, np.ndarray, Path], None]  # model, sample batch, file
    runtime: Callable[[Path], Runtime]
    annotate: Callable[[Path, dict[str, Any]], None]  # store the model description in the file, where it can
    details: Callable[[Path], dict[str, Any]]  # what model.json records beyond the check
    batch_sizes: tuple[int, ...]


def exporters(tflite_batch: int, batch_sizes: tuple[int, ...]) -> dict[str, Exporter]:
    """Each format's exporter; `batch_sizes` are those the check runs (a TFLite file has only `tflite_batch`)."""
    return {
        "onnx": Exporter(_require_onnx, _write_onnx, OnnxRuntime, annotate_onnx, _onnx_details, batch_sizes),
        "torchscript": Exporter(
            lambda: None,
            _write_torchscript,
            _torchscript_runtime,
            _annotate_torchscript,
            _no_details,
            batch_sizes,
        ),
        "tflite": Exporter(
            _require_litert,
            _write_tflite,
            _litert_runtime,
            lambda path, info: None,  # LiteRT files carry no free-form metadata here: model.json beside it does
            lambda path: {"batch_size": tflite_batch, "layout": "NCHW"},
            (tflite_batch,),
        ),
    }


def _require(format: str, extra: str, modules: tuple[tuple[str, str], ...]) -> None:
    """Raise ConfigError naming the first missing (module, package) of a format and the extra that brings them."""
    for module, package in modules:
        try:
            __import__(module)
        except ImportError:
            packages = ", ".join(package for _, package in modules)
            raise ConfigError(f"{format} export needs {package}: pip install 'imgclf[{extra}]' ({packages})") from None


def _require_onnx() -> None:
    _require("ONNX", "onnx", (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")))


def _write_onnx(model: nn.Module, sample: np.ndarray, path: Path) -> None:
    """The dynamo exporter (the legacy one rejects small_cnn's 3x3 -> 2x2 adaptive pooling), a dynamic batch
    axis, weights inside the file."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    with quiet():
        torch.onnx.export(
            model,
            (torch.from_numpy(sample),),
            str(path),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
            verbose=False,
        )


def annotate_onnx(path: Path, info: dict[str, Any]) -> None:
    """Store the model description in the file's `metadata_props`: the whole of it as JSON under "imgclf"
    (what `Predictor.from_onnx` reads), and its main fields as their own keys for other tools."""
    import onnx

    model = onnx.load(str(path))
    props = {
        ONNX_METADATA_KEY: json.dumps(info, ensure_ascii=False),
        "classes": json.dumps(info["classes"], ensure_ascii=False),
        "preprocessing": json.dumps(info["preprocessing"]),
        "temperature": str(info["calibration"]["temperature"]),
        "imgclf_version": package_versions(("imgclf",)).get("imgclf", "unknown"),
        "source_run": info["source_run"],
        "check": json.dumps(info["check"]),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"imgclf {info['arch']['name']} classifier of {len(info['classes'])} classes"
    onnx.save(model, str(path))


def _onnx_details(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    return {"opset": opsets.get("ai.onnx"), "input": ONNX_INPUT, "output": ONNX_OUTPUT, "dynamic_batch": True}


def _write_torchscript(model: nn.Module, sample: np.ndarray, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.9+ calls TorchScript deprecated; it still loads everywhere
        traced = torch.jit.trace(model, torch.from_numpy(sample))
    torch.jit.save(traced, str(path))


def _annotate_torchscript(path: Path, info: dict[str, Any]) -> None:
    """Re-save with the model description as the extra file `imgclf.json` (`torch.jit.load(...,
    _extra_files={"imgclf.json": ""})` reads it back)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    torch.jit.save(module, str(path), _extra_files={"imgclf.json": json.dumps(info, ensure_ascii=False)})


def _torchscript_runtime(path: Path) -> Runtime:
    from imgclf.deploy.runtimes import TorchScriptRuntime

    return TorchScriptRuntime(path)


def _require_litert() -> None:
    _require("TFLite", "tflite", (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")))


def _write_tflite(model: nn.Module, sample: np.ndarray, path: Path) -> None:
    import litert_torch
    import torch

    with quiet():
        edge = litert_torch.convert(model, (torch.from_numpy(sample),))
        edge.export(str(path))


def _litert_runtime(path: Path) -> Runtime:
    from imgclf.deploy.runtimes import LiteRtRuntime

    return LiteRtRuntime(path)


def _no_details(path: Path) -> dict[str, Any]:
    return {}


@contextlib.contextmanager
def quiet():
    """Exporters print progress to stdout and warn about internals; keep them out of imgclf's output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    if buffer.getvalue().strip():
        log.debug("exporter output:\n%s", buffer.getvalue())
