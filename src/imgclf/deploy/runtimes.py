"""Where a model's forward pass runs: eager PyTorch, ONNX Runtime, TorchScript or the LiteRT interpreter.

Every runtime has one method, `logits(batch)`: a float32 NumPy batch [N, C, H, W] of preprocessed images in,
float32 logits [N, classes] out. `Predictor`, the export check and the server all call that method, so the
same pixels reach every backend. Each module imports its engine only when a runtime of its kind is made: the
ONNX Runtime path never imports torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from imgclf.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ONNX_INPUT",
    "ONNX_OUTPUT",
    "LiteRtRuntime",
    "OnnxRuntime",
    "Runtime",
    "TorchRuntime",
    "TorchScriptRuntime",
]

log = logging.getLogger(__name__)

ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"


class Runtime(Protocol):
    name: str  # torch | onnxruntime | torchscript | litert

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] -> float32 [N, classes]."""


class TorchRuntime:
    """An eager `nn.Module` in eval mode on a device, in channels_last where that is faster."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        import torch

        # channels_last: oneDNN and cuDNN convolutions run faster on it (small_cnn on 2 CPU cores: 1.8x)
        self.memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
        self.model = model.eval().to(memory_format=self.memory_format)
        self.device = device

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.memory_format)
            return self.model(tensor).float().cpu().numpy()


class OnnxRuntime:
    """An `.onnx` file in an ONNX Runtime session on the CPU (or the providers given)."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None, providers: list[str] | None = None) -> None:
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail / InvalidProtobuf / NoSuchFile types
            raise CheckpointError(f"cannot load {path} with ONNX Runtime ({str(exc).strip()[:300]})") from None
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.path = Path(path)

    def metadata(self) -> dict[str, str]:
        """The model's `metadata_props`."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TorchScriptRuntime:
    """A `.ts` file loaded with `torch.jit.load` on the CPU."""

    name = "torchscript"

    def __init__(self, path: Path) -> None:
        import warnings

        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ deprecates TorchScript; it still runs
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"cannot load {path} as TorchScript ({str(exc).strip()[:300]})") from None

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).float().numpy()


class LiteRtRuntime:
    """A `.tflite` file in LiteRT's interpreter (`ai_edge_litert`). Its batch size is fixed at export: a
    shorter batch is padded with copies of its last image and the extra rows dropped."""

    name = "litert"

    def __init__(self, path: Path) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ConfigError(
                "running a .tflite model needs LiteRT: pip install 'imgclf[tflite]' (ai-edge-litert)"
            ) from None
        try:
            self.interpreter = Interpreter(model_path=str(path))
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"cannot load {path} with LiteRT ({str(exc).strip()[:300]})") from None
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch_size = int(self.input["shape"][0])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), axis=0)])
            self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(padded, dtype=np.float32))
            self.interpreter.invoke()
            rows.append(self.interpreter.get_tensor(self.output["index"])[: len(chunk)].copy())
        return np.concatenate(rows)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX models run on ONNX Runtime: pip install onnxruntime") from None
    return onnxruntime
