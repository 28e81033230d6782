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
- every request has a deadline (`timeout_s`, 504 past it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from imgclf.data.images import load_image
from imgclf.data.preprocessing import eval_array
from imgclf.deploy.predict import Predictor
from imgclf.errors import ConfigError, ImageError

__all__ = ["STATUS_BY_KIND", "BatchWorker", "BodyTooLarge", "ServeSettings", "create_app"]

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

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_files", "max_pixels", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"serve {name} must be at least 1; received {getattr(self, name)}")
        if self.max_delay_ms < 0 or self.timeout_s <= 0:
            raise ConfigError(
                f"serve max_delay_ms must be >= 0 and timeout_s > 0; received {self.max_delay_ms}, {self.timeout_s}"
            )


class BodyTooLarge(Exception):
    pass


@dataclass
class _Job:
    images: np.ndarray  # float32 [n, C, H, W]
    future: Future


class BatchWorker:
    """One thread that owns the model: loads it, warms it up, then runs queued jobs in batches."""

    def __init__(self, model: Predictor | Callable[[], Predictor], settings: ServeSettings) -> None:
        self.settings = settings
        self.predictor: Predictor | None = model if isinstance(model, Predictor) else None
        self._loader = None if isinstance(model, Predictor) else model
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=settings.queue_size)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.warmup_ms: float | None = None
        self.batches = 0  # forward passes run
        self.requests = 0  # requests answered by them
        self.images = 0
        self.running = 0  # requests in the forward pass under way
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgclf-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, images: np.ndarray) -> Future:
        """Queue one request's images; raises `queue.Full` when `queue_size` requests already wait."""
        job = _Job(images, Future())
        self.jobs.put_nowait(job)
        return job.future

    def _run(self) -> None:
        try:
            if self.predictor is None:
                assert self._loader is not None
                self.predictor = self._loader()
            pre = self.predictor.bundle.preprocessing
            started = time.perf_counter()
            self.predictor.predict_batch(np.zeros((1, pre.in_chans, pre.img_size, pre.img_size), np.float32))
            self.warmup_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:  # a model that cannot load or run: /ready says why, the server stays up
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("the model could not be loaded: %s", self.load_error)
            return
        self.ready.set()
        log.info("model ready (%s, warm-up %.0f ms)", self.predictor.runtime.name, self.warmup_ms)
        while not self._stop.is_set():
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            self._forward(self._gather(first))

    def _gather(self, first: _Job) -> list[_Job]:
        """The first job and, when batching, those that arrive within `max_delay_ms`, up to `max_batch` images."""
        jobs, count = [first], len(first.images)
        if not self.settings.batching:
            return jobs
        deadline = time.perf_counter() + self.settings.max_delay_ms / 1000
        while count < self.settings.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    def _forward(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # timed-out ones are skipped
        if not live:
            return
        assert self.predictor is not None
        self.running = len(live)
        try:
            probs, ood = self.predictor.infer(np.concatenate([job.images for job in live]))
        except Exception as exc:
            log.exception("inference failed")
            for job in live:
                job.future.set_exception(exc)
            return
        finally:
            self.running = 0
        self.batches += 1
        self.requests += len(live)
        self.images += sum(len(job.images) for job in live)
        start = 0
        for job in live:
            end = start + len(job.images)
            job.future.set_result((probs[start:end], ood[start:end]))
            start = end


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
    settings = settings or ServeSettings()
    app = FastAPI(
        title="imgclf",
        summary="Image classification with a model trained by imgclf.",
        description="POST images to /predict (multipart/form-data, one or several files); / is a page to drop "
        "images on.",
        lifespan=_lifespan,
    )
    app.state.worker = worker = BatchWorker(model, settings)
    _add_status_routes(app, worker, settings)
    _add_predict_route(app, worker, settings)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The worker thread runs while the app does: it loads the model once the server starts."""
    app.state.worker.start()
    yield
    app.state.worker.stop()


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _add_status_routes(app: FastAPI, worker: BatchWorker, settings: ServeSettings) -> None:
    """The page, and what the server says about itself: health, readiness, counters, the model's metadata."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("imgclf.deploy").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health", summary="The process is alive (answers while the model works)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model is loaded and one warm-up batch ran, 503 before")
    async def ready():
        if worker.ready.is_set():
            return {"status": "ready", "warmup_ms": worker.warmup_ms}
        if worker.load_error:
            return _problem(503, f"the model failed to load: {worker.load_error}")
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


def _add_predict_route(app: FastAPI, worker: BatchWorker, settings: ServeSettings) -> None:
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
        if not worker.ready.is_set():
            return _problem(503, "the model is not ready yet", {"Retry-After": "1"})
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return _problem(413, f"request body of {int(declared):,} bytes exceeds {settings.max_body_bytes:,}")
        try:
            files = await _read_files(request, settings)
        except BodyTooLarge:
            return _problem(413, f"request body exceeds {settings.max_body_bytes:,} bytes")
        except ValueError as exc:
            return _problem(413 if "Too many files" in str(exc) else 400, str(exc))
        if not files:
            return _problem(400, "no file in the request: send multipart/form-data with image files")
        k = top_k or settings.top_k
        try:
            return await asyncio.wait_for(_answer(worker, settings, files, k, abstain), timeout=settings.timeout_s)
        except asyncio.TimeoutError:
            return _problem(504, f"the request took longer than {settings.timeout_s} s")
        except queue.Full:
            return _problem(503, "the server is busy: too many requests wait for the model", {"Retry-After": "1"})


async def _answer(
    worker: BatchWorker, settings: ServeSettings, files: list[tuple[str, bytes]], k: int, abstain: bool
) -> dict[str, Any] | JSONResponse:
    """Decode the files on the thread pool, run the good ones through the worker, and answer one entry per file
    (or the error status when no file is a usable image)."""
    predictor = worker.predictor
    assert predictor is not None
    pre = predictor.bundle.preprocessing
    limit = settings.max_pixels or predictor.max_pixels  # not set: the predictor's own (DEFAULT_MAX_PIXELS)
    decoded = await run_in_threadpool(lambda: [_decode(data, name, pre, limit) for name, data in files])
    good = [array for array in decoded if isinstance(array, np.ndarray)]
    if not good:
        first = next(error for error in decoded if isinstance(error, ImageError))
        return _problem(STATUS_BY_KIND.get(first.kind, 422), str(first))
    probs, ood = await asyncio.wrap_future(worker.submit(np.stack(good)))
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

    async def limited() -> AsyncIterator[bytes]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > settings.max_body_bytes:
                raise BodyTooLarge
            yield chunk

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        body = b"".join([chunk async for chunk in limited()])
        return [("body", body)] if body else []
    parser = MultiPartParser(request.headers, limited(), max_files=settings.max_files, max_fields=settings.max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ValueError(str(exc)) from None
    files = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or "upload", await value.read()))
    finally:
        await form.close()
    return files


def _decode(data: bytes, name: str, pre: Any, max_pixels: int) -> np.ndarray | ImageError:
    """The model input of one uploaded file, or why it cannot be one (content sniffed, never the declared type;
    the pixel limit is checked from the header before any pixel is decoded; EXIF orientation applied)."""
    try:
        return eval_array(load_image(data, color=pre.color, max_pixels=max_pixels, name=name), pre)
    except ImageError as exc:
        return exc
