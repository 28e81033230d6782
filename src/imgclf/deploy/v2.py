"""The Open Inference Protocol (KServe v2, the HTTP protocol of Triton and KServe) beside the REST routes, so the
clients that speak it (`tritonclient.http`, KServe's) work unchanged, under the same limits as `/predict`.

- `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}` (metadata), `/v2/models/{name}/ready`;
- `POST /v2/models/{name}/infer` with one input: `image`, BYTES [N] (encoded image files: sniffed, pixel-limited
  and decoded as uploads are), or `input`, FP32 [N, C, H, W] (already preprocessed as the model's metadata says);
  the outputs `probabilities` FP32 [N, classes] and `ood_score` FP32 [N];
- the binary tensor extension (`Inference-Header-Content-Length`: a JSON header, then raw tensors; in JSON alone
  a BYTES element is base64) and the classification extension (the `classification` class count on
  `probabilities`, tritonclient's `class_count`: BYTES "probability:index:label", best first);
- errors are `{"error": "..."}` with the status of the REST routes (400, 404, 413, 415, 422, 503, 504).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from imgclf.deploy.drain import Drain
from imgclf.deploy.serve import (
    STATUS_BY_KIND,
    BatchWorker,
    RequestProblem,
    ServeSettings,
    decode_upload,
    read_body,
    run_model,
    serve_request,
)
from imgclf.errors import ImageError

__all__ = ["IMAGE_INPUT", "OUTPUTS", "TENSOR_INPUT", "add_v2_routes"]

IMAGE_INPUT = "image"  # BYTES [N]: encoded image files
TENSOR_INPUT = "input"  # FP32 [N, C, H, W]: preprocessed
OUTPUTS = ("probabilities", "ood_score")
HEADER_LENGTH = "inference-header-content-length"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_v2_routes(app: FastAPI, worker: BatchWorker, settings: ServeSettings, drain: Drain) -> None:
    """The protocol's routes on `app`, for the model `settings.model_name`."""
    name = settings.model_name

    def ready() -> bool:
        return worker.ready.is_set() and not drain.draining.is_set()

    def unknown(model: str) -> JSONResponse:
        return _error(404, f"unknown model '{model}': this server serves '{name}'")

    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "imgclf", "version": _version(), "extensions": ["binary_tensor_data", "classification"]}

    @app.get("/v2/health/live", summary="Open Inference Protocol: the server is alive")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol: ready for inference (503 while loading, draining)")
    async def server_ready():
        return {"ready": True} if ready() else _error(503, "not ready", {"Retry-After": "1"})

    @app.get("/v2/models/{model}", summary="Open Inference Protocol: the model's inputs, outputs and classes")
    @app.get("/v2/models/{model}/versions/{model_version}", include_in_schema=False)
    async def model_metadata(model: str, model_version: str = "1"):
        if model != name:
            return unknown(model)
        if worker.predictor is None:
            return _error(503, "loading the model", {"Retry-After": "1"})
        return _metadata(name, worker)

    @app.get("/v2/models/{model}/ready", summary="Open Inference Protocol: the model is ready")
    @app.get("/v2/models/{model}/versions/{model_version}/ready", include_in_schema=False)
    async def model_ready(model: str, model_version: str = "1"):
        if model != name:
            return unknown(model)
        return {"name": name, "ready": True} if ready() else _error(503, "not ready", {"Retry-After": "1"})

    @app.post("/v2/models/{model}/infer", summary="Open Inference Protocol: inference")
    @app.post("/v2/models/{model}/versions/{model_version}/infer", include_in_schema=False)
    async def infer(request: Request, model: str, model_version: str = "1"):
        """One input, `image` (BYTES [N], image files) or `input` (FP32 [N, C, H, W]); outputs `probabilities`
        and `ood_score` (all unless the request names some), as JSON or binary as the request asks."""
        if model != name:
            return unknown(model)
        return await serve_request(
            request,
            worker,
            settings,
            drain,
            read=lambda: _read_request(request, settings),
            answer=lambda parsed: _answer(worker, settings, *parsed),
            problem=_error,
        )


def _version() -> str:
    try:
        return version("imgclf")
    except PackageNotFoundError:
        return "unknown"


def _metadata(name: str, worker: BatchWorker) -> dict[str, Any]:
    predictor = worker.predictor
    assert predictor is not None
    pre = predictor.bundle.preprocessing
    return {
        "name": name,
        "versions": ["1"],
        "platform": f"imgclf_{predictor.runtime.name}",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, pre.in_chans, pre.img_size, pre.img_size]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(predictor.classes)]},
            {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
        ],
        "parameters": {
            "classes": list(predictor.classes),
            "preprocessing": pre.to_dict(),
            "ood_threshold": None if predictor.ood_threshold is None else predictor.ood_threshold.threshold,
        },
    }


async def _read_request(request: Request, settings: ServeSettings) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary part of an inference request (the body under the byte limit)."""
    body = await read_body(request, settings)
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        head, binary = body, b""
    else:
        if not declared.isdigit() or int(declared) > len(body):
            raise RequestProblem(400, f"{HEADER_LENGTH} must be the JSON header's size in bytes; received {declared!r}")
        head, binary = body[: int(declared)], body[int(declared) :]
    try:
        header = json.loads(head)
    except ValueError:
        raise RequestProblem(400, "the inference request is not JSON (or its header length is wrong)") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise RequestProblem(400, "the inference request needs an 'inputs' list")
    return header, binary


async def _answer(worker: BatchWorker, settings: ServeSettings, header: dict[str, Any], binary: bytes) -> Response:
    """Run the request's one input through the model and write the outputs it asks for."""
    inputs = header["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestProblem(
            400, f"one input is expected ('{IMAGE_INPUT}' or '{TENSOR_INPUT}'); received {len(inputs)}"
        )
    tensor = inputs[0]
    raw = _binary_part(tensor, binary)
    if tensor.get("datatype") == "BYTES":
        images = await _images(worker, settings, _bytes_elements(tensor, raw, settings.max_files))
    elif tensor.get("datatype") == "FP32":
        images = _preprocessed(worker, tensor, raw, settings.max_files)
    else:
        raise RequestProblem(400, f"the input's datatype must be BYTES or FP32; received {tensor.get('datatype')!r}")
    probs, ood = await run_model(worker, images)
    return _response(worker, header, probs, ood)


def _binary_part(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    """The input's raw bytes under the binary extension (the whole binary part: one input), else None."""
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise RequestProblem(400, "binary data follows the header but the input has no binary_data_size")
        return None
    if not isinstance(size, int) or size != len(binary):
        raise RequestProblem(400, f"binary_data_size {size!r} differs from the {len(binary)} bytes after the header")
    return binary


def _count(tensor: dict[str, Any], max_items: int) -> tuple[list[int], int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestProblem(400, f"the input's shape must be a list of sizes; received {shape!r}")
    if shape[0] < 1:
        raise RequestProblem(400, "the input holds no image")
    if shape[0] > max_items:
        raise RequestProblem(413, f"{shape[0]} images in one request exceed the limit of {max_items}")
    return shape, math.prod(shape)


def _bytes_elements(tensor: dict[str, Any], raw: bytes | None, max_items: int) -> list[bytes]:
    """The BYTES tensor's elements: length-prefixed in binary (4 bytes, little-endian), base64 strings in JSON."""
    shape, count = _count(tensor, max_items)
    if len(shape) != 1:
        raise RequestProblem(400, f"'{IMAGE_INPUT}' is BYTES [N], one image file per element; received shape {shape}")
    if raw is None:
        data = tensor.get("data")
        if not isinstance(data, list) or len(data) != count or not all(isinstance(item, str) for item in data):
            raise RequestProblem(400, f"'data' must hold {count} base64 strings (or send the binary extension)")
        try:
            return [base64.b64decode(item, validate=True) for item in data]
        except binascii.Error:
            raise RequestProblem(400, "a BYTES element in JSON must be base64") from None
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestProblem(400, "the BYTES tensor ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    if offset != len(raw) or len(elements) != count:
        raise RequestProblem(400, f"the BYTES tensor holds {len(elements)} elements; its shape says {count}")
    return elements


async def _images(worker: BatchWorker, settings: ServeSettings, files: list[bytes]) -> np.ndarray:
    decoded = await decode_upload(worker, settings, [(f"image[{i}]", data) for i, data in enumerate(files)])
    for outcome in decoded:
        if isinstance(outcome, ImageError):  # a tensor has no per-element error: the first one answers
            raise RequestProblem(STATUS_BY_KIND.get(outcome.kind, 422), str(outcome))
    return np.stack(decoded)


def _preprocessed(worker: BatchWorker, tensor: dict[str, Any], raw: bytes | None, max_items: int) -> np.ndarray:
    """The FP32 input as the model's batch, checked against its preprocessing's shape and for finite values."""
    shape, count = _count(tensor, max_items)
    pre = worker.predictor.bundle.preprocessing
    expected = [shape[0], pre.in_chans, pre.img_size, pre.img_size]
    if shape != expected:
        raise RequestProblem(
            400, f"'{TENSOR_INPUT}' must have shape [N, {expected[1]}, {expected[2]}, {expected[3]}]; received {shape}"
        )
    if raw is not None:
        if len(raw) != 4 * count:
            raise RequestProblem(400, f"an FP32 tensor of shape {shape} is {4 * count} bytes; received {len(raw)}")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            values = np.asarray(tensor.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise RequestProblem(400, "'data' must be a list of numbers") from None
    if values.size != count:
        raise RequestProblem(400, f"'data' holds {values.size} numbers; shape {shape} needs {count}")
    if not np.isfinite(values).all():
        raise RequestProblem(400, "the input holds NaN or infinite values")
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def _response(worker: BatchWorker, header: dict[str, Any], probs: np.ndarray, ood: np.ndarray) -> Response:
    """The outputs asked for (all by default), each as JSON data or binary (`binary_data`, or the request's
    `binary_data_output`); `classification` (a class count) turns probabilities into the classification
    extension's strings."""
    classes = worker.predictor.classes
    asked = header.get("outputs") or [{"name": output} for output in OUTPUTS]
    all_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs, blobs = [], []
    for request in asked:
        name = request.get("name") if isinstance(request, dict) else None
        if name not in OUTPUTS:
            raise RequestProblem(400, f"unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}")
        parameters = request.get("parameters") or {}
        count = parameters.get("classification", 0)  # the classification extension's class count
        if name == "probabilities" and count:
            order = np.argsort(-probs, axis=1)[:, : min(int(count), len(classes))]
            labels = [[f"{probs[i, j]:.6f}:{j}:{classes[j]}".encode() for j in row] for i, row in enumerate(order)]
            datatype, shape, array = "BYTES", [len(probs), order.shape[1]], labels
        else:
            array = probs if name == "probabilities" else ood
            datatype, shape = "FP32", list(array.shape)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if parameters.get("binary_data", all_binary):
            blob = _bytes_blob(array) if datatype == "BYTES" else np.asarray(array, "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = [item.decode() for row in array for item in row] if datatype == "BYTES" else array.ravel().tolist()
            entry["data"] = flat
        outputs.append(entry)
    body = {"model_name": worker.settings.model_name, "model_version": "1", "outputs": outputs}
    if "id" in header:
        body["id"] = header["id"]
    if not blobs:
        return JSONResponse(body)
    head = json.dumps(body).encode()
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _bytes_blob(rows: list[list[bytes]]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for row in rows for item in row)
