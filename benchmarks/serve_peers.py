"""The same ONNX model served by imgclf and by LitServe, side by side, under the same load on loopback.

    python benchmarks/serve_peers.py [--clients 50] [--seconds 30] [--max-requests 60000] [--work DIR]
                                     [--json out.json]

Servers, one after the other, each on a free 127.0.0.1 port:
- `imgclf serve model.onnx` (the defaults: batching up to 32 images within 5 ms), one worker;
- `imgclf serve model.onnx --workers 2` (each worker 1 ONNX Runtime thread on 2 cores);
- LitServe: a `LitAPI` with `max_batch_size=32, batch_timeout=0.005` (the same batching) whose `setup` loads the
  same file into imgclf's `Predictor` (ONNX Runtime, all cores) and whose `decode_request` runs the same
  decoding and preprocessing (`load_image` + `eval_array`), so the servers differ in serving only.
The model is `deploy_model.benchmark_run`'s (small_cnn on Fashion-MNIST, 28 px). The load is load_test.py's: N
aiohttp clients, one connection each, POSTing one real test PNG per request as multipart/form-data to /predict
back to back, a 3-s warm-up and then T seconds (or --max-requests in all) measured. Reported per server:
images/s, latency p50/p95/p99, errors (anything but 200 and 503 with Retry-After); then imgclf / LitServe.

Traffic goes to 127.0.0.1 only, each run is bounded in requests and time, and every server is stopped at the end.
The clients share the machine with the servers, so the figures are lower bounds of what a server does alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_model import benchmark_run, test_images
from load_test import free_port, load, start_server, wait_for

MAX_BATCH, BATCH_TIMEOUT_S = 32, 0.005  # imgclf serve's defaults (--max-batch 32, --max-delay-ms 5)


import litserve as ls  # noqa: E402 (a module-level LitAPI: LitServe pickles it into its worker process)


class ImgclfAPI(ls.LitAPI):
    """imgclf's Predictor (ONNX Runtime) and preprocessing behind LitServe's batching."""

    def __init__(self, model: str, **options) -> None:
        super().__init__(**options)
        self.model = model

    def setup(self, device):
        from imgclf.deploy.predict import Predictor

        self.predictor = Predictor.load(self.model)
        self.pre = self.predictor.bundle.preprocessing

    def decode_request(self, request):
        from imgclf.data.images import load_image
        from imgclf.data.preprocessing import eval_array

        data = request["files"].file.read()
        image = load_image(data, color=self.pre.color, max_pixels=self.predictor.max_pixels, name="upload")
        return eval_array(image, self.pre)

    def batch(self, inputs):
        import numpy as np

        return np.stack(inputs)

    def predict(self, x):
        return self.predictor.infer(x)[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        prediction = self.predictor.top_k("upload", output, 5)
        return {"label": prediction.label, "classes": list(prediction.classes)}


def litserve_main(model: str, port: int) -> None:
    """The LitServe server (run in its own process by `start_litserve`)."""
    api = ImgclfAPI(model, max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_S)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def start_litserve(model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, __file__, "--litserve-child", str(model), str(port)]
    return wait_for(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "/health")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=60000, help="in all, per server")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgclf-bench-deploy")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--litserve-child", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.litserve_child:
        litserve_main(args.litserve_child[0], int(args.litserve_child[1]))
        return

    run = benchmark_run(args.work)
    model = run / "model" / "model.onnx"
    bodies = [path.read_bytes() for path, _ in test_images(run)[:500]]
    servers = {
        "imgclf": lambda: start_server(model, True),
        "imgclf --workers 2": lambda: start_server(model, True, ("--workers", "2")),
        "LitServe": lambda: start_litserve(model),
    }
    report: dict = {"model": str(model), "clients": args.clients, "seconds": args.seconds}
    print("| server | images/s | p50 ms | p95 ms | p99 ms | errors | statuses |\n|---|---|---|---|---|---|---|")
    for name, start in servers.items():
        process, url = start()
        try:
            asyncio.run(load(url, bodies, args.clients, 3.0, args.max_requests))  # warm-up, not counted
            result = asyncio.run(load(url, bodies, args.clients, args.seconds, args.max_requests))
        finally:
            process.terminate()
            process.wait(timeout=60)
        report[name] = result
        latency = result["latency_ms"]
        print(
            f"| {name} | {result['images_per_s']:.0f} | {latency['p50']:.0f} | {latency['p95']:.0f} | "
            f"{latency['p99']:.0f} | {result['errors']} | {result['statuses']} |",
            flush=True,
        )
    ours, peer = report["imgclf"], report["LitServe"]
    report["throughput_ratio"] = ours["images_per_s"] / peer["images_per_s"]
    report["p99_ratio"] = ours["latency_ms"]["p99"] / peer["latency_ms"]["p99"]
    report["workers_scaling"] = report["imgclf --workers 2"]["images_per_s"] / ours["images_per_s"]
    print(
        f"imgclf / LitServe: {report['throughput_ratio']:.2f}x images/s at {report['p99_ratio']:.2f}x the p99 latency; "
        f"2 workers / 1: {report['workers_scaling']:.2f}x ({args.clients} clients, {args.seconds:.0f} s each)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
