"""The server's one model thread: it loads the model, runs a warm-up batch, then answers queued requests in
batches (up to `max_batch` images, waiting at most `max_delay_ms` for more), off the event loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imgclf.deploy.metrics import ServeMetrics
from imgclf.deploy.predict import Predictor

if TYPE_CHECKING:
    from imgclf.deploy.serve import ServeSettings

__all__ = ["BatchWorker"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    images: np.ndarray  # float32 [n, C, H, W]
    future: Future
    queued: float  # time.perf_counter() when it was submitted


class BatchWorker:
    """One thread that owns the model: loads it, warms it up, then runs queued jobs in batches."""

    def __init__(
        self,
        model: Predictor | Callable[[], Predictor],
        settings: ServeSettings,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
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
        job = _Job(images, Future(), time.perf_counter())
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
        if self.metrics is not None:
            self.metrics.model_loaded(self.predictor.bundle)
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
        started = time.perf_counter()
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
        if self.metrics is not None:
            queued = [started - job.queued for job in live]
            self.metrics.observe_forward(queued, time.perf_counter() - started, len(probs))
            self.metrics.observe_answers(probs, ood, self.predictor)
        start = 0
        for job in live:
            end = start + len(job.images)
            job.future.set_result((probs[start:end], ood[start:end]))
            start = end
