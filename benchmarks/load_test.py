"""Load test of `imgclf serve` on loopback: N concurrent clients for T seconds, batching on and then off.

    python benchmarks/load_test.py [--clients 50] [--seconds 30] [--max-requests 60000] [--model onnx|torch]
                                   [--work DIR] [--json out.json]

For each mode (batching on: the default settings; off: `--no-batching`, one request = one forward pass) the
script starts `imgclf serve` on a free 127.0.0.1 port serving `deploy_model.benchmark_run` (its ONNX file, or the
run folder for eager PyTorch), waits for /ready, and runs N asyncio clients (aiohttp, one connection each), each
POSTing one real Fashion-MNIST test PNG per request as multipart/form-data, back to back, until T seconds or
--max-requests in all have passed. Alongside, a separate process asks GET /health every 50 ms (in its own
process, so that the clients' busy event loop does not inflate its timings). Reported per mode: requests/s and
images/s, latency p50/p95/p99, errors by HTTP status (503 with Retry-After counted apart: it is the server's
back-pressure), the /health p99 during the load, and the server's RSS: at /ready, after a 3-s warm-up load (thread
pool, ONNX Runtime's arena for the batch sizes it meets), and after the measured load, whose growth over the
warmed-up figure is the one that would show a leak; then images/s on / off.

Traffic goes to 127.0.0.1 only, each run is bounded in requests and time, and the server is stopped at the end.
The clients share the machine with the server (on 2 cores they take about one of them), so the figures are
lower bounds of what the server does alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_model import benchmark_run, test_images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: Path, batching: bool, options: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`imgclf serve MODEL` on a free loopback port, once /ready answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "imgclf", "serve", str(model), "--port", str(port), "--no-access-log", *options]
    if not batching:
        command.append("--no-batching")
    return wait_for(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "/ready")


def wait_for(process: subprocess.Popen, port: int, route: str) -> tuple[subprocess.Popen, str]:
    """The server process and its URL once GET `route` answers 200 (within 120 s, else the script stops)."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{process.args[:4]} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}{route}", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit(f"{process.args[:4]} was not ready within 120 s")


def multipart(body: bytes, boundary: str = "imgclf-load-test") -> tuple[bytes, str]:
    """One PNG as a multipart/form-data body (encoded once per image, so the clients spend their time sending)."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def probe_health(url: str, seconds: float, out: Path) -> None:
    """In its own process, so that its timings are the server's and not the load clients' event loop: GET /health
    every 50 ms on one keep-alive connection; the latencies (s) go to `out` as JSON."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    latencies = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        connection.request("GET", "/health")
        connection.getresponse().read()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    out.write_text(json.dumps(latencies))


async def load(url: str, bodies: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` concurrent aiohttp clients (one connection each) POSTing back to back."""
    import aiohttp

    encoded = [multipart(body) for body in bodies]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    sent = 0
    stop_at = time.monotonic() + seconds
    rng = random.Random(0)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.monotonic() < stop_at and sent < max_requests:
            sent += 1
            data, content_type = encoded[rng.randrange(len(encoded))]
            started = time.perf_counter()
            retry = None
            try:
                async with session.post(f"{url}/predict", data=data, headers={"Content-Type": content_type}) as r:
                    await r.read()
                    status, retry = str(r.status), r.headers.get("Retry-After")
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
            latencies.append(time.perf_counter() - started)
            if status == "503" and retry:
                status = "503 Retry-After"
                await asyncio.sleep(float(retry))
            statuses[status] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    ms = np.array(latencies) * 1000
    return {
        "seconds": elapsed,
        "requests": len(latencies),
        "ok": ok,
        "requests_per_s": ok / elapsed,
        "images_per_s": ok / elapsed,  # one image per request
        "latency_ms": {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
        "statuses": dict(statuses),
        "errors": sum(count for status, count in statuses.items() if status not in ("200", "503 Retry-After")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=60000, help="in all, per mode")
    parser.add_argument("--model", choices=("onnx", "torch"), default="onnx")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgclf-bench-deploy")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    run = benchmark_run(args.work)
    model = run / "model" / "model.onnx" if args.model == "onnx" else run
    bodies = [path.read_bytes() for path, _ in test_images(run)[:500]]
    report: dict = {"model": str(model), "clients": args.clients, "cpus": os.cpu_count()}
    for mode, batching in (("batching on", True), ("batching off", False)):
        process, url = start_server(model, batching)
        try:
            at_ready = rss_mb(process.pid)
            asyncio.run(load(url, bodies, args.clients, 3.0, args.max_requests))  # warm-up, not counted
            before = rss_mb(process.pid)
            health_file = args.work / "health.json"
            prober = multiprocessing.get_context("spawn").Process(
                target=probe_health, args=(url, args.seconds, health_file)
            )
            prober.start()
            result = asyncio.run(load(url, bodies, args.clients, args.seconds, args.max_requests))
            prober.join(timeout=args.seconds + 30)
            health = np.array(json.loads(health_file.read_text())) * 1000
            result.update(health_p99_ms=float(np.percentile(health, 99)), health_probes=len(health))
            after = rss_mb(process.pid)
            import httpx

            result["server_stats"] = httpx.get(f"{url}/stats").json()
        finally:
            process.terminate()
            process.wait(timeout=30)
        result.update(
            rss_at_ready_mb=at_ready, rss_before_mb=before, rss_after_mb=after, rss_growth=(after - before) / before
        )
        report[mode] = result
        latency = result["latency_ms"]
        stats = result["server_stats"]
        print(
            f"{mode}: {result['ok']} ok of {result['requests']} requests in {result['seconds']:.1f} s = "
            f"{result['images_per_s']:.0f} images/s; latency p50 {latency['p50']:.0f} / p95 {latency['p95']:.0f} / "
            f"p99 {latency['p99']:.0f} ms; statuses {result['statuses']}; errors {result['errors']}; /health p99 "
            f"{result['health_p99_ms']:.1f} ms over {result['health_probes']} probes; RSS {at_ready:.0f} at /ready, "
            f"{before:.0f} warmed up -> "
            f"{after:.0f} MB ({100 * result['rss_growth']:+.1f} %); {stats['images'] / max(1, stats['batches']):.1f} "
            "images per forward pass",
            flush=True,
        )
    ratio = report["batching on"]["images_per_s"] / report["batching off"]["images_per_s"]
    report["batching_gain"] = ratio
    print(f"batching on / off: {ratio:.2f}x images/s ({args.clients} clients, {args.model})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
