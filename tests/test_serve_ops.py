"""What operators expect of the server, against real processes on loopback: Prometheus /metrics summed over two
workers, the Open Inference Protocol through Triton's own client (`tritonclient.http`), the limits and error
bodies of the new routes, and SIGTERM's drain (counted requests, exit 0)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_cli
from imgclf.deploy.predict import Predictor
from imgclf.deploy.serve import ServeSettings, create_app
from imgclf.files import read_csv
from test_serve import (
    GatedRuntime,
    InProcessServer,
    bomb_png,
    free_port,
    known_image,
    post_image,
    wait_ready,
)

tritonclient_http = pytest.importorskip("tritonclient.http")

MODEL = "digits"


def start_server(model: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "imgclf", "serve", str(model), "--port", str(port), "--no-access-log", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return process, url


@pytest.fixture(scope="module")
def two_workers(serve_run) -> Iterator[str]:
    """`imgclf serve --workers 2` on the ONNX model, named for the /v2 routes, with limits the tests can reach."""
    options = ["--workers", "2", "--model-name", MODEL, "--max-body-mb", "0.25", "--max-files", "4"]
    process, url = start_server(serve_run / "model" / "model.onnx", *options, "--max-pixels", "4000000")
    try:
        yield url
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser: {(name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_and_move_with_traffic_summed_over_two_workers(two_workers, serve_run):
    path, label = known_image(serve_run)
    before = scrape(two_workers)
    requests = 12
    for _ in range(requests):
        assert post_image(two_workers, path.read_bytes()).status_code == 200
    assert httpx.post(f"{two_workers}/predict", content=b"not an image").status_code == 415
    after = scrape(two_workers)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # counted in whichever of the two processes answered, summed by the multiprocess collector
    assert moved("imgclf_requests_total", route="/predict", status="200") == requests
    assert moved("imgclf_requests_total", route="/predict", status="415") == 1
    assert moved("imgclf_request_duration_seconds_count", route="/predict") == requests + 1
    assert moved("imgclf_predictions_total", label=label) == requests
    assert moved("imgclf_confidence_count") == requests
    assert moved("imgclf_batch_images_sum") == requests
    assert moved("imgclf_queue_seconds_count") == requests and moved("imgclf_compute_seconds_count") >= 1
    assert ("imgclf_requests_in_flight", ()) in after
    classes = {"digit0", "digit1", "digit2"}
    assert {dict(labels)["label"] for name, labels in after if name == "imgclf_predictions_total"} == classes
    baseline = {dict(labels)["label"]: v for (name, labels), v in after.items() if "baseline_class" in name}
    assert set(baseline) == classes and abs(sum(baseline.values()) - 1) < 1e-3  # validation's answers
    cumulative = [v for (name, _), v in sorted(after.items()) if name == "imgclf_baseline_confidence_fraction"]
    assert cumulative and max(cumulative) == pytest.approx(1.0)


def cli_predictions(run: Path, images: list[Path], tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i}.png").write_bytes(image.read_bytes())
    out = tmp_path / "predictions.csv"
    result = run_cli("predict", str(run), str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    return {Path(row["path"]).name: row["label"] for row in read_csv(out)}


def test_tritonclient_gets_the_top_1_of_imgclf_predict(two_workers, serve_run, tmp_path):
    rows = read_csv(serve_run / "predictions.csv")
    images = [Path(row["path"]) for row in rows[:4]]  # --max-files 4
    expected = cli_predictions(serve_run, images, tmp_path)
    client = tritonclient_http.InferenceServerClient(two_workers.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    classes = metadata["parameters"]["classes"]
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["image", "input"]

    files = tritonclient_http.InferInput("image", [len(images)], "BYTES")
    files.set_data_from_numpy(np.array([image.read_bytes() for image in images], dtype=object))  # binary extension
    result = client.infer(MODEL, [files])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(images), 3) and result.as_numpy("ood_score").shape == (len(images),)
    assert [classes[i] for i in probs.argmax(axis=1)] == [expected[f"{i}.png"] for i in range(len(images))]

    # the classification extension, and the same images preprocessed by the client as FP32 in JSON
    top = client.infer(MODEL, [files], outputs=[tritonclient_http.InferRequestedOutput("probabilities", class_count=1)])
    assert [item[0].decode().split(":")[2] for item in top.as_numpy("probabilities")] == list(expected.values())
    predictor = Predictor.load(serve_run / "model" / "model.onnx")
    batch = np.stack([predictor.prepare(image) for image in images])
    tensor = tritonclient_http.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=False)
    as_json = client.infer(MODEL, [tensor], outputs=[tritonclient_http.InferRequestedOutput("probabilities", False)])
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), probs, atol=1e-5)

    with pytest.raises(tritonclient_http.InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")


def v2(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", content=content, headers=headers, timeout=30)


def image_request(*files: bytes) -> dict:
    data = [base64.b64encode(file).decode() for file in files]
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}]}


def test_the_limits_hold_on_the_v2_routes_and_no_error_leaks_a_path(two_workers, serve_run):
    good = known_image(serve_run)[0].read_bytes()
    big = os.urandom(300_000)
    cases = {
        "body over the limit": (v2(two_workers, big), 413),
        "chunked body over the limit": (
            httpx.post(f"{two_workers}/v2/models/{MODEL}/infer", content=iter([big[:150_000], big[150_000:]])),
            413,
        ),
        "pixel bomb": (v2(two_workers, image_request(bomb_png(5000, 5000))), 413),
        "not an image": (v2(two_workers, image_request(b"#!/bin/sh\nrm -rf /tmp/x\n")), 415),
        "corrupt image": (v2(two_workers, image_request(good[: len(good) // 2])), 422),
        "too many images": (v2(two_workers, image_request(*[good] * 5)), 413),
        "not JSON": (v2(two_workers, b"\x00\xff{"), 400),
        "bad header length": (v2(two_workers, image_request(good), {"Inference-Header-Content-Length": "99999"}), 400),
        "wrong tensor shape": (
            v2(two_workers, {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0]}]}),
            400,
        ),
        "NaN in the tensor": (
            v2(
                two_workers,
                {
                    "inputs": [
                        {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [float("nan")] * 784}
                    ]
                },
            ),
            400,
        ),
        "unknown model": (httpx.post(f"{two_workers}/v2/models/other/infer", json=image_request(good)), 404),
        "unknown output": (v2(two_workers, {**image_request(good), "outputs": [{"name": "logits"}]}), 400),
    }
    for what, (response, status) in cases.items():
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert "Traceback" not in error and "/tmp" not in error and "site-packages" not in error, (what, error)
    assert v2(two_workers, image_request(good)).status_code == 200  # and the server still answers


def test_a_drain_refuses_new_requests_and_stops_only_after_the_accepted_ones(serve_run):
    """In this process with the model held: SIGTERM (sent to this very process, our handler in front of a stand-in
    for uvicorn's) turns readiness 503 on both protocols and refuses new requests with Retry-After, while the
    accepted request finishes with 200; only then is the server's own stop called."""
    gate = threading.Event()
    gate.set()
    predictor = Predictor.load(serve_run / "model" / "model.onnx")
    held = Predictor(predictor.bundle, GatedRuntime(predictor.runtime, gate))
    app = create_app(held, ServeSettings(drain_timeout_s=60))
    body = known_image(serve_run)[0].read_bytes()
    stopped: list[float] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(time.monotonic()))
    try:
        with InProcessServer(app) as server:
            wait_ready(server.url)
            app.state.drain.install()  # what the lifespan does in uvicorn's main thread
            gate.clear()
            accepted: list[httpx.Response] = []
            sender = threading.Thread(target=lambda: accepted.append(post_image(server.url, body)))
            sender.start()
            deadline = time.monotonic() + 30
            while httpx.get(f"{server.url}/stats").json()["running"] < 1:
                assert time.monotonic() < deadline, "the request never reached the model"
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)
            for ready in ("/ready", "/readyz", "/v2/health/ready", "/v2/models/imgclf/ready"):
                assert httpx.get(f"{server.url}{ready}").status_code == 503, ready
            for route in ("rest", "v2"):
                refused = post_image(server.url, body, route)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert httpx.get(f"{server.url}/health").status_code == 200  # alive while it drains
            time.sleep(0.3)
            assert not stopped  # the accepted request still runs: the stop waits
            gate.set()
            sender.join(timeout=60)
            released = time.monotonic()
            assert accepted[0].status_code == 200
            deadline = time.monotonic() + 30
            while not stopped:
                assert time.monotonic() < deadline, "the drain never handed over to the server's stop"
                time.sleep(0.02)
            assert stopped[0] >= released - 0.05
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_under_load_loses_no_accepted_request_and_exits_0(serve_run):
    """8 clients post without pause; SIGTERM. The N requests the server had accepted when the signal came (its log
    counts them) all finish with 200, as does every request answered before; requests that reach it after the
    signal get 503 with Retry-After, or find the port closed; nothing else, and the process exits 0."""
    process, url = start_server(serve_run / "model" / "model.onnx", "--drain-timeout", "20")
    body = known_image(serve_run)[0].read_bytes()
    sent: list[tuple[float, float, int | str, str | None]] = []  # started, finished, status, Retry-After
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set() and len(sent) < 5000:
                started = time.monotonic()
                try:
                    response = http.post(f"{url}/predict", files={"f": ("x.png", body)})
                    status, retry = response.status_code, response.headers.get("retry-after")
                except httpx.TransportError as exc:  # after the stop: refused or closed, never accepted
                    status, retry = type(exc).__name__, None
                sent.append((started, time.monotonic(), status, retry))

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    while len(sent) < 40:
        time.sleep(0.05)
    term = time.monotonic()
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=60)
    stop.set()
    for thread in clients:
        thread.join(timeout=60)
    log = process.stderr.read()
    assert returncode == 0, log
    in_flight = int(re.search(r"draining \((\d+) requests in flight", log).group(1))
    assert {status for _, finished, status, _ in sent if finished < term} == {200}
    spanning = Counter(status for started, finished, status, _ in sent if started < term <= finished)
    assert set(spanning) <= {200, 503}, spanning  # sent before the signal: answered or refused, never cut off
    answered_after = sum(1 for _, finished, status, _ in sent if finished >= term and status == 200)
    assert answered_after >= in_flight  # every request accepted when the signal came was answered
    assert all(retry == "1" for _, _, status, retry in sent if status == 503)
    late = Counter(status for started, _, status, _ in sent if started >= term)
    assert set(late) <= {200, 503, "ConnectError", "ReadError", "RemoteProtocolError"}, late
