"""The server's Prometheus metrics (prometheus-client): requests by route and status, latency, requests in flight,
queue time vs compute time, images per forward pass, and what a model server rarely shows: the predicted classes
and the top-1 confidence of live traffic beside the validation split's (the bundle's `baseline`), so drift is a
query away (`imgclf_predictions_total / sum(imgclf_predictions_total)` against `imgclf_baseline_class_fraction`).

With several worker processes (`imgclf serve --workers N`), each writes its values under
`PROMETHEUS_MULTIPROC_DIR` and /metrics, whichever worker answers, adds them up (prometheus-client's multiprocess
mode); the baseline is a constant of the model and comes from the answering worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from imgclf.evaluation.baseline import CONFIDENCE_BUCKETS

__all__ = ["CONTENT_TYPE_LATEST", "MetricsMiddleware", "ServeMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The metrics of one server, in a registry of their own (two apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "imgclf_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "imgclf_request_duration_seconds", "time to answer a request", ["route"], buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "imgclf_requests_in_flight", "requests being answered", registry=registry, multiprocess_mode="livesum"
        )
        self.queue_time = Histogram(
            "imgclf_queue_seconds", "time a request waited for the model", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.compute_time = Histogram(
            "imgclf_compute_seconds", "time of one forward pass", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.batch_images = Histogram(
            "imgclf_batch_images", "images in one forward pass", buckets=BATCH_BUCKETS, registry=registry
        )
        self.predictions = Counter(
            "imgclf_predictions", "images answered, by predicted class", ["label"], registry=registry
        )
        self.confidence = Histogram(
            "imgclf_confidence", "top-1 probability of each answered image", buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.unknown = Counter("imgclf_unknown", "images above the out-of-distribution threshold", registry=registry)
        self._baseline = _Baseline(None, 1.0)
        registry.register(self._baseline)

    def model_loaded(self, bundle: Any) -> None:
        """Series for every class from the start (at 0), and the model's validation baseline."""
        for name in bundle.classes:
            self.predictions.labels(label=name)
        self._baseline.baseline, self._baseline.temperature = bundle.baseline, bundle.temperature

    def observe_forward(self, queued_s: Iterable[float], compute_s: float, images: int) -> None:
        """One forward pass: how long each of its requests waited, how long it ran, how many images it held."""
        for seconds in queued_s:
            self.queue_time.observe(seconds)
        self.compute_time.observe(compute_s)
        self.batch_images.observe(images)

    def observe_answers(self, probs: np.ndarray, ood: np.ndarray, predictor: Any) -> None:
        """The answers of one forward pass: each image's top class and confidence, and whether it was unknown."""
        counts = np.bincount(probs.argmax(axis=1), minlength=len(predictor.classes))
        for index in np.flatnonzero(counts):  # one increment per class seen, not per image
            self.predictions.labels(label=predictor.classes[index]).inc(int(counts[index]))
        for confidence in probs.max(axis=1).tolist():
            self.confidence.observe(confidence)
        threshold = predictor.ood_threshold
        if threshold is not None and (unknown := int((ood > threshold.threshold).sum())):
            self.unknown.inc(unknown)

    def render(self) -> bytes:
        """The exposition text: this process's registry, or with several workers every worker's values summed."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self._baseline)
        return generate_latest(registry)


class _Baseline(Collector):
    """The validation split's answers as gauges: the fraction of images per predicted class, and the cumulative
    fraction at or below each confidence bucket (the live histogram's buckets), at the temperature the model
    answers with (a model calibrated after its baseline was taken has no confidence baseline)."""

    def __init__(self, baseline: dict[str, Any] | None, temperature: float) -> None:
        self.baseline = baseline
        self.temperature = temperature

    def collect(self) -> Iterable[Metric]:
        if not self.baseline:
            return []
        classes = GaugeMetricFamily(
            "imgclf_baseline_class_fraction", "validation images predicted as each class", labels=["label"]
        )
        for name, fraction in self.baseline["classes"].items():
            classes.add_metric([name], fraction)
        families = [classes]
        if abs(self.baseline.get("temperature", 1.0) - self.temperature) < 1e-9:
            confidence = GaugeMetricFamily(
                "imgclf_baseline_confidence_fraction",
                "validation images with top-1 probability at or below le",
                labels=["le"],
            )
            for bound, fraction in zip(self.baseline["confidence"]["le"], self.baseline["confidence"]["fraction"]):
                confidence.add_metric([str(float(bound))], fraction)
            families.append(confidence)
        return families


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route template (an unknown path counts as "other", so a
    scan of random URLs cannot grow the series) and status, with its latency and the requests in flight."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)
