"""The REST server: a FastAPI app factory around a `Predictor`, with one batching worker off the event loop.

LitServe's shape (setup, decode, predict, encode; batching a setting, not a code path) on FastAPI:
- the app loads nothing at import; its lifespan starts one worker thread, which loads the model (when given
  a loader), runs one warm-up batch, and only then makes `/ready` answer 200;
- `POST /predict` reads the body under a byte limit (413 as soon as it is exceeded, with or without a
  Content-Length), sniffs every file's content (415 for non-images whatever their declared type), rejects
  pixel bombs from their header (413 before decoding), decodes on a thread pool and hands the preprocessed
  arrays to the worker through a bounded queue (503 with Retry-After when it is full);
- the worker groups waiting requests into one forward pass of up to `max_batch` images, waiting at most
  `max_delay_ms` for more (`batching=False`: one request, one forward pass); inference never runs on the event
  loop, so `/health` answers while the model works;
- every request has a deadline (`timeout_s`, 504 past it);
- the Open Inference Protocol (KServe v2: `deploy.v2`) beside these routes, under the same limits; Prometheus
  metrics at `/metrics` (`deploy.metrics`); `/livez` and `/readyz` as aliases of `/health` and `/ready`;
- SIGTERM drains (`deploy.drain`): readiness 503, new requests 503 with Retry-After, accepted ones finish.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from imgclf.data.images import load_image
from imgclf.data.preprocessing import eval_array
from imgclf.deploy.batching import BatchWorker
from imgclf.deploy.drain import Drain
from imgclf.deploy.metrics import CONTENT_TYPE_LATEST, MetricsMiddleware, ServeMetrics
from imgclf.deploy.predict import Predictor
from imgclf.errors import ConfigError, ImageError

__all__ = [
    "STATUS_BY_KIND",
    "BatchWorker",
    "BodyTooLarge",
    "RequestProblem",
    "ServeSettings",
    "create_app",
    "decode_upload",
    "read_body",
    "run_model",
    "serve_request",
]

log = logging.getLogger(__name__)

# HTTP status for a request whose every file failed, by ImageError.kind
STATUS_BY_KIND = {"not_image": 415, "too_large": 413, "corrupt": 422}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the server (the `imgclf serve` flags)."""

    max_batch: int = 32  # images per forward pass when batching
    max_delay_ms: float = 5.0  # how long the worker waits for more requests to fill a batch
    batching: bool = True  # False: every request is its own forward pass
    queue_size: int = 64  # requests waiting for the model; one more is answered 503 with Retry-After
    max_body_bytes: int = 20 * 2**20  # request body limit (413)
    max_files: int = 16  # files per request (413)
    # per image, checked from the header before decoding (413); None: the run's data.max_pixels (`serve_app`), or
    # the predictor's own limit (50 megapixels unless set) for a model given as it is
    max_pixels: int | None = None
    timeout_s: float = 30.0  # per request, reading excluded (504)
    top_k: int = 5  # classes per image unless the request asks (?top_k=)
    drain_timeout_s: float = 30.0  # after SIGTERM, how long accepted requests may take to finish
    model_name: str = "imgclf"  # the model's name in the Open Inference Protocol's routes (/v2/models/{name})

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_files", "max_pixels", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"serve {name} must be at least 1; received {getattr(self, name)}")
        if self.max_delay_ms < 0 or self.timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ConfigError(
                "serve max_delay_ms and drain_timeout_s must be >= 0 and timeout_s > 0; received "
                f"{self.max_delay_ms}, {self.drain_timeout_s}, {self.timeout_s}"
            )


class BodyTooLarge(Exception):
    pass


def create_app(model: Predictor | Callable[[], Predictor], settings: ServeSettings | None = None):
    """The FastAPI app serving `model` (a loaded `Predictor`, or a function that loads one on the worker).

    Example:
        >>> predictor = Predictor.load("runs/small_cnn-20261128-120000/model/model.onnx")
        >>> app = create_app(predictor, ServeSettings(max_batch=16))
        >>> from fastapi.testclient import TestClient
        >>> with TestClient(app) as client, open("cat.jpg", "rb") as image:  # in this process, for a try
        ...     client.post("/predict", files={"file": image}).status_code
        200
        >>> import uvicorn
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # serves until stopped  # doctest: +SKIP
    """
    from imgclf.deploy.v2 import add_v2_routes

    settings = settings or ServeSettings()
    app = FastAPI(
        title="imgclf",
        summary="Image classification with a model trained by imgclf.",
        description="POST images to /predict (multipart/form-data, one or several files); / is a page to drop "
        "images on.",
        lifespan=_lifespan,
    )
    metrics = ServeMetrics()
    app.state.worker = worker = BatchWorker(model, settings, metrics)
    app.state.drain = drain = Drain(settings.drain_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_status_routes(app, worker, settings, drain, metrics)
    _add_predict_route(app, worker, settings, drain)
    add_v2_routes(app, worker, settings, drain)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The worker thread runs while the app does: it loads the model once the server starts; SIGTERM drains."""
    app.state.drain.install()
    app.state.worker.start()
    yield
    app.state.worker.stop()


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the REST routes' form: {"detail": ...}."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _add_status_routes(
    app: FastAPI, worker: BatchWorker, settings: ServeSettings, drain: Drain, metrics: ServeMetrics
) -> None:
    """The page, and what the server says about itself: health, readiness, counters, metrics, the model's
    metadata."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("imgclf.deploy").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health", summary="The process is alive (answers while the model works)")
    @app.get("/livez", summary="The process is alive (the Kubernetes spelling of /health)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model is loaded and one warm-up batch ran; 503 before and draining")
    @app.get("/readyz", summary="/ready under the Kubernetes spelling")
    async def ready():
        if drain.draining.is_set():
            return _problem(503, "the server is stopping", {"Retry-After": "1"})
        if worker.ready.is_set():
            return {"status": "ready", "warmup_ms": worker.warmup_ms}
        if worker.load_error:
            return _problem(503, "the model failed to load (the server's log says why)")
        return _problem(503, "loading the model", {"Retry-After": "1"})

    @app.get("/stats", summary="Forward passes, requests and images served so far; requests waiting and running")
    async def stats() -> dict[str, int]:
        return {
            "batches": worker.batches,
            "requests": worker.requests,
            "images": worker.images,
            "queued": worker.jobs.qsize(),
            "running": worker.running,
        }

    @app.get("/metrics", summary="Prometheus metrics: requests, latency, queue and compute time, classes, confidence")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metadata", summary="Classes, preprocessing, model, backend and limits")
    async def metadata():
        if worker.predictor is None:
            return _problem(503, "loading the model", {"Retry-After": "1"})
        bundle = worker.predictor.bundle
        return {
            "classes": list(bundle.classes),
            "preprocessing": bundle.preprocessing.to_dict(),
            "model": bundle.spec.to_dict(),
            "temperature": bundle.temperature,
            "ood": bundle.ood,
            "backend": worker.predictor.runtime.name,
            "source_run": bundle.training.get("run"),
            "limits": asdict(settings),
        }


# what /docs shows of POST /predict: FastAPI cannot infer a body the endpoint streams itself
_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "413": {"description": "body, file count or image pixels above the limits"},
        "415": {"description": "no file is an image"},
        "503": {"description": "the model is loading, or the queue is full (see Retry-After)"},
        "504": {"description": "the request took longer than the timeout"},
    },
}


def _add_predict_route(app: FastAPI, worker: BatchWorker, settings: ServeSettings, drain: Drain) -> None:
    """POST /predict: the limits while the body streams in, then decoding, the worker and the answer, within the
    request's deadline."""

    @app.post("/predict", summary="Top-k classes of each uploaded image", openapi_extra=_PREDICT_OPENAPI)
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, description="classes per image"),
        abstain: bool = Query(False, description="label images unlike the training data 'unknown'"),
    ):
        """Multipart form with one or several image files (any field name), or one image as the raw body.

        Each image gets `{"filename", "label", "classes", "probabilities", "ood_score", "unknown", "error": null}`:
        `ood_score` says how unlike the training data the image is (the energy of the logits, higher = more
        unusual), `unknown` whether it is above the threshold stored with the model, and `label` is the top class,
        or "unknown" for those with `?abstain=true`. A file that is not a usable image gets its `error` and no
        classes, while the others are predicted. When every file fails, the answer is 415 (not images), 413 (too
        many pixels) or 422 (corrupt)."""
        return await serve_request(
            request,
            worker,
            settings,
            drain,
            read=lambda: _read_files(request, settings),
            answer=lambda files: _answer(worker, settings, files, top_k or settings.top_k, abstain),
            problem=_problem,
        )


class RequestProblem(Exception):
    """A request the server answers with `status` and `detail` (its own words: no path, no trace)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def serve_request(
    request: Request,
    worker: BatchWorker,
    settings: ServeSettings,
    drain: Drain,
    *,
    read: Callable[[], Awaitable[Any]],
    answer: Callable[[Any], Awaitable[Any]],
    problem: Callable[[int, str, dict[str, str] | None], Response],
) -> Any:
    """What every inference route shares, in this order: refused while draining or loading (503, Retry-After),
    a declared body over the limit (413), `read()` (the byte limit counted as the body streams in: 413), then
    `answer(read's result)` within the request's deadline (504) with a full queue answered 503. `problem` writes
    an error in the route's protocol; a `RequestProblem` from either step is answered with its status."""
    with drain.admit() as accepted:
        if not accepted:
            return problem(503, "the server is stopping", {"Retry-After": "1", "Connection": "close"})
        if not worker.ready.is_set():
            return problem(503, "the model is not ready yet", {"Retry-After": "1"})
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return problem(413, f"request body of {int(declared):,} bytes exceeds {settings.max_body_bytes:,}", None)
        try:
            body = await read()
            return await asyncio.wait_for(answer(body), timeout=settings.timeout_s)
        except BodyTooLarge:
            return problem(413, f"request body exceeds {settings.max_body_bytes:,} bytes", None)
        except RequestProblem as exc:
            return problem(exc.status, exc.detail, None)
        except asyncio.TimeoutError:
            return problem(504, f"the request took longer than {settings.timeout_s} s", None)
        except queue.Full:
            return problem(503, "the server is busy: too many requests wait for the model", {"Retry-After": "1"})


async def run_model(worker: BatchWorker, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, OOD scores) of preprocessed images from the worker's next forward pass; `queue.Full` when
    `queue_size` requests already wait."""
    return await asyncio.wrap_future(worker.submit(images))


async def decode_upload(
    worker: BatchWorker, settings: ServeSettings, files: list[tuple[str, bytes]]
) -> list[np.ndarray | ImageError]:
    """Each uploaded file as the model's input, or why it cannot be one, decoded on the thread pool."""
    predictor = worker.predictor
    assert predictor is not None
    pre = predictor.bundle.preprocessing
    limit = settings.max_pixels or predictor.max_pixels  # not set: the predictor's own (DEFAULT_MAX_PIXELS)
    return await run_in_threadpool(lambda: [_decode(data, name, pre, limit) for name, data in files])


async def _answer(
    worker: BatchWorker, settings: ServeSettings, files: list[tuple[str, bytes]], k: int, abstain: bool
) -> dict[str, Any] | JSONResponse:
    """Decode the files on the thread pool, run the good ones through the worker, and answer one entry per file
    (or the error status when no file is a usable image)."""
    if not files:
        raise RequestProblem(400, "no file in the request: send multipart/form-data with image files")
    predictor = worker.predictor
    assert predictor is not None
    decoded = await decode_upload(worker, settings, files)
    good = [array for array in decoded if isinstance(array, np.ndarray)]
    if not good:
        first = next(error for error in decoded if isinstance(error, ImageError))
        raise RequestProblem(STATUS_BY_KIND.get(first.kind, 422), str(first))
    probs, ood = await run_model(worker, np.stack(good))
    rows, scores, results = iter(probs), iter(ood), []
    threshold = predictor.ood_threshold
    for (name, _), outcome in zip(files, decoded):
        if isinstance(outcome, ImageError):
            results.append(_failed_entry(name, outcome))
            continue
        score = float(next(scores))
        prediction = predictor.top_k(name, next(rows), k, ood_score=score, abstain=abstain)
        results.append(
            {
                "filename": name,
                "label": prediction.label,
                "classes": list(prediction.classes),
                "probabilities": [round(p, 6) for p in prediction.probabilities],
                "ood_score": round(score, 4),
                "unknown": None if threshold is None else score > threshold.threshold,
                "error": None,
            }
        )
    return {"predictions": results, "ood_threshold": None if threshold is None else threshold.threshold}


def _failed_entry(name: str, error: ImageError) -> dict[str, Any]:
    """The answer's entry for a file that is not a usable image: its error, no classes."""
    return {
        "filename": name,
        "label": None,
        "classes": [],
        "probabilities": [],
        "ood_score": None,
        "unknown": None,
        "error": str(error),
    }


async def _read_files(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file of a multipart body, or the raw body as one file; the byte limit is
    counted while the body streams in, so a chunked upload without Content-Length stops at the limit."""

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        body = await read_body(request, settings)
        return [("body", body)] if body else []
    parser = MultiPartParser(
        request.headers, _limited(request, settings), max_files=settings.max_files, max_fields=settings.max_files
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestProblem(413 if "Too many files" in str(exc) else 400, str(exc)) from None
    files = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or "upload", await value.read()))
    finally:
        await form.close()
    return files


async def read_body(request: Request, settings: ServeSettings) -> bytes:
    """The whole request body, `BodyTooLarge` as soon as it streams past the limit."""
    return b"".join([chunk async for chunk in _limited(request, settings)])


async def _limited(request: Request, settings: ServeSettings) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, counted against the limit (a chunked upload without Content-Length too)."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > settings.max_body_bytes:
            raise BodyTooLarge
        yield chunk


def _decode(data: bytes, name: str, pre: Any, max_pixels: int) -> np.ndarray | ImageError:
    """The model input of one uploaded file, or why it cannot be one (content sniffed, never the declared type;
    the pixel limit is checked from the header before any pixel is decoded; EXIF orientation applied)."""
    try:
        return eval_array(load_image(data, color=pre.color, max_pixels=max_pixels, name=name), pre)
    except ImageError as exc:
        return exc
