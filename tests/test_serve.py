"""The REST server as a real uvicorn process on a free loopback port (and, where a test must hold the model
still, a real uvicorn server in this process), and its web page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from imgclf.deploy.predict import Predictor
from imgclf.deploy.serve import ServeSettings, create_app
from imgclf.files import read_csv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def server(serve_run) -> Iterator[str]:
    """`imgclf serve` on the exported ONNX model, with small limits the tests can reach."""
    port = free_port()
    command = [sys.executable, "-m", "imgclf", "serve", serve_run / "model" / "model.onnx", "--port", port]
    command += ["--max-body-mb", "0.25", "--max-files", "4", "--max-pixels", "4000000", "--no-access-log"]
    process = subprocess.Popen(
        [str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def known_image(run: Path) -> tuple[Path, str]:
    """A test image of the run that the model gets right (from predictions.csv)."""
    row = next(r for r in read_csv(run / "predictions.csv") if r["correct"] == "1" and r["true"] == "digit2")
    return Path(row["path"]), row["true"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_known_image_gets_its_class_and_the_cli_top_k(server, serve_run, tmp_path):
    path, label = known_image(serve_run)
    response = httpx.post(f"{server}/predict?top_k=3", files={"files": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    (item,) = response.json()["predictions"]
    assert item["classes"][0] == label and item["error"] is None
    assert run_cli("predict", serve_run, path, "--top-k", "3", "--out", tmp_path / "p.csv").exit_code == 0
    (row,) = read_csv(tmp_path / "p.csv")
    assert item["classes"] == [row["class_1"], row["class_2"], row["class_3"]]
    cli_probabilities = [float(row[f"probability_{i}"]) for i in (1, 2, 3)]
    np.testing.assert_allclose(item["probabilities"], cli_probabilities, atol=1e-5)


def test_several_files_with_a_bad_one_get_one_entry_each(server, serve_run):
    path, label = known_image(serve_run)
    files = [
        ("files", ("a.png", path.read_bytes(), "image/png")),
        ("files", ("notes.jpg", b"plain text, not a picture", "image/jpeg")),
        ("other", ("b.png", path.read_bytes(), "application/octet-stream")),
    ]
    response = httpx.post(f"{server}/predict", files=files)
    assert response.status_code == 200
    items = response.json()["predictions"]
    assert [i["filename"] for i in items] == ["a.png", "notes.jpg", "b.png"]
    assert items[0]["classes"][0] == label == items[2]["classes"][0]
    assert items[1]["classes"] == [] and "not an image" in items[1]["error"]


def test_text_declared_as_jpeg_is_415_and_png_as_octet_stream_is_accepted(server, serve_run):
    text = httpx.post(f"{server}/predict", files={"files": ("x.jpg", b"hello, I am text", "image/jpeg")})
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    path, label = known_image(serve_run)
    octet = httpx.post(f"{server}/predict", files={"files": ("x.bin", path.read_bytes(), "application/octet-stream")})
    assert octet.status_code == 200 and octet.json()["predictions"][0]["classes"][0] == label
    raw = httpx.post(f"{server}/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["classes"][0] == label


def test_oversized_bodies_are_413_with_and_without_content_length(server):
    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    body = png_bytes(Image.fromarray(big))
    assert len(body) > 0.25 * 2**20
    declared = httpx.post(f"{server}/predict", files={"files": ("big.png", body, "image/png")})
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # a generator body goes out chunked, without Content-Length
        for start in range(0, len(body), 16384):
            yield body[start : start + 16384]

    chunked = httpx.post(f"{server}/predict", content=chunks(), headers={"content-type": "image/png"})
    assert chunked.status_code == 413
    assert "exceeds" in chunked.json()["detail"]


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (its data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [5000, 30000])  # above the server's 4 Mpx limit; above Pillow's own guard too
def test_a_pixel_bomb_is_rejected_from_its_header(server, side):
    """The bomb's pixel data is 64 bytes: decoding it would fail as corrupt (422), so a 413 that names the declared
    size shows that the header was read and nothing decoded; no image reaches the model, and the server lives."""
    before = httpx.get(f"{server}/stats").json()
    response = httpx.post(f"{server}/predict", files={"files": ("bomb.png", bomb_png(side, side), "image/png")})
    assert response.status_code == 413 and "exceeds the limit of 4,000,000" in response.json()["detail"]
    declared = f"{side}x{side} = {side * side:,} pixels" if side == 5000 else "rejected before decoding"
    assert declared in response.json()["detail"]
    assert httpx.get(f"{server}/stats").json()["images"] == before["images"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_too_many_files_is_413(server, serve_run):
    path, _ = known_image(serve_run)
    files = [("files", (f"{i}.png", path.read_bytes(), "image/png")) for i in range(5)]
    assert httpx.post(f"{server}/predict", files=files).status_code == 413


def test_an_exif_rotated_jpeg_is_predicted_as_its_upright_version(server, serve_run):
    path, _ = known_image(serve_run)
    upright = Image.open(path).convert("L").resize((64, 64), Image.Resampling.BICUBIC)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the pixels a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display, which undoes ROTATE_90
    encoded = {}
    for name, image, extra in (("upright", upright, {}), ("rotated", stored, {"exif": exif}), ("raw", stored, {})):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=100, subsampling=0, **extra)
        encoded[name] = buffer.getvalue()
    answers = {}
    for name, data in encoded.items():
        response = httpx.post(f"{server}/predict?top_k=3", files={"files": (f"{name}.jpg", data, "image/jpeg")})
        assert response.status_code == 200
        item = response.json()["predictions"][0]
        answers[name] = dict(zip(item["classes"], item["probabilities"]))
    assert max(answers["rotated"], key=answers["rotated"].get) == max(answers["upright"], key=answers["upright"].get)
    close = max(abs(answers["rotated"].get(c, 0) - p) for c, p in answers["upright"].items())
    far = max(abs(answers["raw"].get(c, 0) - p) for c, p in answers["upright"].items())
    assert close < 0.05 and close < far  # the EXIF flag was applied; without it the sideways pixels differ


def test_health_metadata_docs_and_stats(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    metadata = httpx.get(f"{server}/metadata").json()
    assert metadata["classes"] == ["digit0", "digit1", "digit2"]
    assert metadata["backend"] == "onnxruntime" and metadata["preprocessing"]["img_size"] == 28
    assert metadata["limits"]["max_files"] == 4
    assert httpx.get(f"{server}/docs").status_code == 200
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(httpx.get(f"{server}/stats").json()) == {"batches", "requests", "images", "queued", "running"}


def test_stats_count_the_requests_and_images_the_model_answered(server, serve_run):
    """Three requests of 1, 2 and 1 images move the counters by 3 requests and 4 images in 1-3 forward passes; a
    request with no usable image never reaches the model and counts nowhere."""
    path, _ = known_image(serve_run)
    image = ("x.png", path.read_bytes(), "image/png")
    before = httpx.get(f"{server}/stats").json()
    for files in ([("files", image)], [("files", image), ("files", image)], [("files", image)]):
        assert httpx.post(f"{server}/predict", files=files).status_code == 200
    assert httpx.post(f"{server}/predict", files={"files": ("x.jpg", b"text", "image/jpeg")}).status_code == 415
    after = httpx.get(f"{server}/stats").json()
    assert after["requests"] - before["requests"] == 3 and after["images"] - before["images"] == 4
    assert 1 <= after["batches"] - before["batches"] <= 3
    assert after["queued"] == 0 and after["running"] == 0


def test_a_corrupt_or_missing_model_exits_before_listening(tmp_path):
    """While the process runs, its port is tried again and again: it must never accept a connection, and the
    process must stop before it announces the address or uvicorn starts (a model loaded only after listening would
    leave a server up, answering 503)."""
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    for model in (garbage, tmp_path / "missing-run"):
        port = free_port()
        out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with out.open("w") as stdout, err.open("w") as stderr:  # files, not pipes: a full pipe would block it
            process = subprocess.Popen(
                [sys.executable, "-m", "imgclf", "serve", str(model), "--port", str(port)], stdout=stdout, stderr=stderr
            )
            accepted = 0
            deadline = time.monotonic() + 120
            while process.poll() is None:
                assert time.monotonic() < deadline, "the server neither failed nor exited"
                accepted += _accepts("127.0.0.1", port)
                time.sleep(0.01)
        assert process.returncode == 1, err.read_text()
        assert accepted == 0  # nothing listened while it ran
        assert "error" in err.read_text()
        assert "serving" not in out.read_text() and "Uvicorn running" not in err.read_text()


def test_by_default_it_binds_loopback_with_the_runs_pixel_limit(serve_run, tmp_path):
    """No --host, no --max-pixels: the server listens on 127.0.0.1 only (not on this machine's other address), and
    the run's data.max_pixels (lowered to 500 here) is the limit: a 30x30 image (900 px) gets 413, a 20x20 one
    (400 px) its classes."""
    import yaml

    run = Path(shutil.copytree(serve_run, tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["max_pixels"] = 500
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "serve", str(run), "--port", str(port), "--no-access-log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        assert httpx.get(f"{url}/metadata").json()["limits"]["max_pixels"] == 500
        small, large = io.BytesIO(), io.BytesIO()
        Image.new("L", (20, 20)).save(small, format="PNG")  # 400 px
        Image.new("L", (30, 30)).save(large, format="PNG")  # 900 px
        answers = [
            httpx.post(f"{url}/predict", files={"files": ("x.png", body.getvalue(), "image/png")}, timeout=30)
            for body in (small, large)
        ]
        assert [a.status_code for a in answers] == [200, 413]
        listening = [address for address in _local_addresses() if _accepts(address, port)]
        assert listening == ["127.0.0.1"], listening
    finally:
        process.terminate()
        process.wait(timeout=30)


def _local_addresses() -> list[str]:
    """This machine's IPv4 addresses: loopback and the interfaces' (from the routing table's view)."""
    addresses = {"127.0.0.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    return sorted(addresses)


def _accepts(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) == 0


# --- the model held still: a real uvicorn server in this process ---------------------------------------------


class GatedRuntime:
    """The real ONNX Runtime session, which waits for `gate` before each forward pass."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate, self.name = inner, gate, "gated"

    def logits(self, batch):
        assert self.gate.wait(timeout=60)
        return self.inner.logits(batch)


class InProcessServer:
    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_ready_is_503_until_the_model_is_loaded_and_warmed_up(serve_run):
    loaded = threading.Event()

    def load() -> Predictor:
        assert loaded.wait(timeout=60)
        return Predictor.load(serve_run / "model" / "model.onnx")

    with InProcessServer(create_app(load)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200  # alive while loading
        not_ready = httpx.get(f"{server.url}/ready")
        assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "1"
        assert httpx.post(f"{server.url}/predict", content=b"x").status_code == 503
        loaded.set()
        wait_ready(server.url, timeout=30)
        assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"


def held_predictor(serve_run: Path, gate: threading.Event) -> Predictor:
    predictor = Predictor.load(serve_run / "model" / "model.onnx")
    return Predictor(predictor.bundle, GatedRuntime(predictor.runtime, gate))


async def post_many(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/predict", files={"files": ("x.png", body, "image/png")}) for body in bodies)
        )


def test_concurrent_requests_share_forward_passes_and_health_answers_meanwhile(serve_run):
    gate = threading.Event()
    gate.set()  # the warm-up batch passes
    path, label = known_image(serve_run)
    settings = ServeSettings(max_batch=32, max_delay_ms=50)
    with InProcessServer(create_app(held_predictor(serve_run, gate), settings)) as server:
        wait_ready(server.url)
        gate.clear()  # the first batch now waits in the model: the others queue up behind it
        results: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: results.extend(asyncio.run(post_many(server.url, [path.read_bytes()] * 8)))
        )
        sender.start()
        deadline = time.monotonic() + 30  # all 8 wait: in the held forward pass or in the queue behind it

        def waiting() -> int:
            stats = httpx.get(f"{server.url}/stats").json()
            return stats["queued"] + stats["running"]

        while waiting() < 8:
            assert time.monotonic() < deadline, "the requests never queued up"
            time.sleep(0.05)
        # the gate stays closed until /health has answered: were inference on the event loop, it could not answer
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        assert waiting() == 8  # and the model is still held
        gate.set()
        sender.join(timeout=60)
        assert [r.status_code for r in results] == [200] * 8
        assert {r.json()["predictions"][0]["classes"][0] for r in results} == {label}
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["requests"] == 8 and stats["images"] == 8
        assert stats["batches"] <= 2  # the held forward pass, then all that queued behind it in one more


def post_image(url: str, body: bytes, route: str = "rest", timeout: float = 30) -> httpx.Response:
    """POST one image to the REST route, or to the Open Inference Protocol's (a base64 BYTES element in JSON)."""
    if route == "rest":
        return httpx.post(f"{url}/predict", files={"files": ("x.png", body, "image/png")}, timeout=timeout)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(body).decode()]}
    return httpx.post(f"{url}/v2/models/imgclf/infer", json={"inputs": [tensor]}, timeout=timeout)


def error_of(response: httpx.Response) -> str:
    """The error message of either protocol: {"detail": ...} (REST) or {"error": ...} (v2)."""
    body = response.json()
    return body.get("detail") or body["error"]


@pytest.mark.parametrize("route", ["rest", "v2"])
def test_a_full_queue_answers_503_with_retry_after_and_a_slow_model_504(serve_run, route):
    """One request held in the model, one in the queue behind it (queue_size=1): a third finds the queue full (503
    with Retry-After), and the first two answer 504 at their deadline, since the gate holds the model until both
    have answered; once the gate opens, the server answers again. The same on /predict and on /v2/.../infer."""
    gate = threading.Event()
    gate.set()
    path, _ = known_image(serve_run)
    settings = ServeSettings(batching=False, queue_size=1, timeout_s=2.0)
    with InProcessServer(create_app(held_predictor(serve_run, gate), settings)) as server:
        wait_ready(server.url)
        gate.clear()
        body = path.read_bytes()

        def stats() -> dict[str, int]:
            return httpx.get(f"{server.url}/stats").json()

        def until(condition, what: str) -> None:
            deadline = time.monotonic() + 30
            while not condition():
                assert time.monotonic() < deadline, what
                time.sleep(0.01)

        held = BackgroundPost(server.url, body, route)
        until(lambda: stats()["running"] == 1, "the first request never reached the model")
        queued = BackgroundPost(server.url, body, route)
        until(lambda: stats()["queued"] == 1, "the second request never queued")
        full = post_image(server.url, body, route)
        assert full.status_code == 503 and full.headers.get("retry-after") == "1", full.text
        for sender in (held, queued):
            sender.join(timeout=60)
        assert [sender.response.status_code for sender in (held, queued)] == [504, 504]
        assert all("longer than 2.0 s" in error_of(sender.response) for sender in (held, queued))
        gate.set()
        assert post_image(server.url, body, route).status_code == 200


class BackgroundPost(threading.Thread):
    """POST one image from a thread, started at once; `response` once `join` returns."""

    def __init__(self, url: str, body: bytes, route: str = "rest") -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.route, self.response = url, body, route, None
        self.start()

    def run(self) -> None:
        self.response = post_image(self.url, self.body, self.route)


# --- the web page --------------------------------------------------------------------------------------------


def test_the_web_page_classifies_an_uploaded_image_in_chromium(server, serve_run, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("IMGCLF_REQUIRE_BROWSER"):
            pytest.fail("Chromium and chromedriver are required here (IMGCLF_REQUIRE_BROWSER is set)")
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    path, label = known_image(serve_run)
    upload = tmp_path / "my digit.png"
    shutil.copy(path, upload)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{server}/")
        wait = WebDriverWait(driver, 30)
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "model"), "small_cnn"))
        driver.find_element(By.ID, "file-input").send_keys(str(upload))
        top = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, ".result .top-class")))
        assert top.text == label
        bars = driver.find_elements(By.CSS_SELECTOR, ".result .row")
        assert len(bars) == 3  # the page asks for the top 3
        assert driver.find_element(By.CSS_SELECTOR, ".result .name").text == "my digit.png"
    finally:
        driver.quit()


def test_an_explicit_pixel_limit_equal_to_the_default_is_kept(serve_run, tmp_path):
    """`serve --max-pixels 50000000` (the default's value) is an answer: before, a limit equal to the default was
    taken as "not given" and replaced by the run's data.max_pixels."""
    import yaml
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeSettings
    from imgclf.workflow import serve_app

    run = Path(shutil.copytree(serve_run, tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["max_pixels"] = 500
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for settings, expected in ((ServeSettings(max_pixels=50_000_000), 50_000_000), (None, 500)):
        with TestClient(serve_app(run, settings, device="cpu")) as client:
            assert client.get("/metadata").json()["limits"]["max_pixels"] == expected
