"""`imgclf evaluate`, `predict`, `export` and `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from imgclf.cli.app import app
from imgclf.cli.console import RichProgress, console, handles_errors, out_console, rank
from imgclf.cli.options import (
    TTAOption,
    examples,
)
from imgclf.cli.output import print_metrics, show_predictions
from imgclf.errors import ImgclfError

__all__ = ["evaluate", "export", "predict", "serve"]


@app.command(
    epilog=examples(
        "imgclf evaluate runs/small_cnn-20261128-120000",
        "imgclf evaluate runs/small_cnn-20261128-120000 --data other/ --split test",
        "imgclf evaluate runs/small_cnn-20261128-120000 --tta",
        "imgclf evaluate runs/small_cnn-20261128-120000 --calibrate",
    )
)
@handles_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="runs/<name>")],
    data: Annotated[Path | None, typer.Option(help="evaluate on another labelled folder")] = None,
    split: Annotated[
        str | None, typer.Option(help="train | val | test of the run, or of --data (default test; a flat --data: all)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    out: Annotated[Path | None, typer.Option(help="folder for metrics.json etc.")] = None,
    tta: TTAOption = False,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="first fit a temperature on the run's val split (saved in model/)")
    ] = False,
    force_calibration: Annotated[
        bool,
        typer.Option(
            "--force-calibration", help="keep the temperature even if fitted on < 100 val images or raising val ECE"
        ),
    ] = False,
    ood: Annotated[
        bool,
        typer.Option("--ood", help="first choose the out-of-distribution threshold on the val split (saved in model/)"),
    ] = False,
) -> None:
    """Metrics of the run's best model on its test split (or another folder): accuracy, top-k, per-class
    precision/recall/F1, balanced accuracy, confusion matrix, predictions.csv (with each image's ood_score), and the
    share of images the model would answer 'unknown' for."""
    from imgclf import workflow

    result = workflow.evaluate(
        run,
        data=data,
        split=split,
        batch_size=batch_size,
        device=device,
        out=out,
        tta=tta,
        calibrate=calibrate,
        force_calibration=force_calibration,
        ood=ood,
        progress=RichProgress(),
    )
    print_metrics(result.metrics)
    out_console.print(f"written to [bold]{escape(str(result.out_dir))}[/]")


@app.command(
    epilog=examples(
        "imgclf predict runs/<name> photos/ --out preds.csv --top-k 3",
        "imgclf predict runs/<name>/model/model.onnx photos/ --out preds.csv   # ONNX Runtime, no torch",
        "imgclf predict runs/<name> 'inbox/**/*.jpg' --out preds.jsonl --format jsonl",
        "imgclf predict runs/<name> photos/ --tta",
        "imgclf predict runs/<name> photos/ --abstain --out preds.csv   # 'unknown' for images unlike training's",
        "torchrun --nproc_per_node 4 -m imgclf predict runs/<name> big/folder --out preds.csv   # sharded",
    )
)
@handles_errors
def predict(
    run: Annotated[Path, typer.Argument(help="runs/<name>, its model/ folder, or an exported .onnx file")],
    inputs: Annotated[list[str], typer.Argument(help="image files, folders (recursive) or glob patterns")],
    out: Annotated[
        Path | None, typer.Option(help="file to write, - for standard output (default: print a table)")
    ] = None,
    format_: Annotated[str, typer.Option("--format", help="csv | jsonl (for --out)")] = "csv",
    top_k: Annotated[int, typer.Option(min=1, help="classes per image")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps (PyTorch models)")] = "auto",
    tta: TTAOption = False,
    abstain: Annotated[
        bool,
        typer.Option(
            "--abstain", help="label images unlike the training data 'unknown' (the model's stored OOD threshold)"
        ),
    ] = False,
) -> None:
    """Predict images; unreadable files get a row with the error instead of stopping the run. Every row carries its
    ood_score (how unlike the training data the image is: the energy of the logits, higher = more unusual); with
    --abstain, images above the threshold chosen on validation are labelled 'unknown'. Exits 1 when no input could
    be read at all."""

    from imgclf import workflow

    to_stdout = out is not None and str(out) == "-"
    predictions = workflow.predict(
        run,
        inputs,
        top_k=top_k,
        batch_size=batch_size,
        device=device,
        tta=tta,
        abstain=abstain,
        out=None if to_stdout else out,
        out_format=format_,
        progress=RichProgress(),
    )
    failed = [p for p in predictions if p.error]
    if rank() == 0:  # under torchrun, rank 0 wrote or shows every row
        show_predictions(predictions, out=out, to_stdout=to_stdout, format_=format_, top_k=top_k)
    if failed and len(failed) == len(predictions):
        raise ImgclfError(f"none of the {len(predictions)} input(s) could be read; first: {failed[0].error}")
    if failed and rank() == 0:
        console.print(f"[yellow]{len(failed)} file(s) could not be read; see the error column[/]")


@app.command(
    epilog=examples(
        "imgclf export runs/<name>                       # -> runs/<name>/model/model.onnx",
        "imgclf export runs/<name> --format torchscript  # -> model.ts",
        "imgclf export runs/<name> --format tflite       # -> model.tflite (pip install 'imgclf[tflite]')",
        "imgclf export runs/<name> --int8                # -> model.onnx and model.int8.onnx",
    )
)
@handles_errors
def export(
    run: Annotated[Path, typer.Argument(help="runs/<name> (its images check the export)")],
    format_: Annotated[str, typer.Option("--format", help="onnx | torchscript | tflite")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="file to write (default: runs/<name>/model/model.<ext>)")] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="also quantize to model.int8.onnx (ONNX Runtime; prints accuracy)")
    ] = False,
    int8_max_drop: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="most test accuracy int8 may lose (0.01 = 1 point)")
    ] = 0.01,
    tflite_batch: Annotated[int, typer.Option(min=1, help="the TFLite model's fixed batch size")] = 1,
) -> None:
    """Export the run's model and check it: eager PyTorch and the exported runtime must give the same top-1 class
    on up to 256 of the run's validation images, at batch 1 and 7 (TFLite: its --tflite-batch), with logits
    within a thousandth of the largest; otherwise nothing is written (exit 1). The figures go to model.json under
    `exports`."""
    from imgclf import workflow

    results = workflow.export(
        run,
        format=format_,
        out=out,
        int8=int8,
        tflite_batch=tflite_batch,
        max_accuracy_drop=int8_max_drop,
        progress=RichProgress(),
    )
    for result in results:
        check = result.check
        out_console.print(
            f"[bold]{escape(str(result.path))}[/] ({result.size_bytes / 1e6:.2f} MB, {result.format}): top-1 agreement "
            f"{check.top1_agreement:.4f}, max |Δlogit| {check.max_abs_logit_diff:.2e}"
            + (f" (tolerance {check.tolerance:.1e})" if check.tolerance is not None else "")
            + f" on {check.images} {check.split} images at batch {', '.join(map(str, check.batch_sizes))}"
        )
        if result.quantization:
            q = result.quantization
            out_console.print(
                f"int8 ({escape(q['method'])}): {q['accuracy_split']} accuracy {q['fp32_accuracy']:.4f} -> "
                f"{q['int8_accuracy']:.4f}; size {q['fp32_bytes'] / 1e6:.2f} MB -> {q['int8_bytes'] / 1e6:.2f} MB"
            )


@app.command(
    epilog=examples(
        "imgclf serve runs/<name> --port 8000                  # then open http://127.0.0.1:8000/",
        "imgclf serve runs/<name>/model/model.onnx --threads 2  # ONNX Runtime",
        "curl -F files=@cat.jpg -F files=@dog.png 'http://127.0.0.1:8000/predict?top_k=3'",
    )
)
@handles_errors
def serve(
    model: Annotated[Path, typer.Argument(help="runs/<name>, its model/ folder, or an exported .onnx file")],
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps (PyTorch models)")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="intra-op threads per worker (default: the usable cores / --workers)")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="images per forward pass when batching")] = 32,
    max_delay_ms: Annotated[float, typer.Option(min=0, help="wait this long for more requests to batch")] = 5.0,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="group concurrent requests")] = True,
    queue_size: Annotated[int, typer.Option(min=1, help="requests waiting for the model before 503")] = 64,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="largest request body (413 above)")] = 20.0,
    max_files: Annotated[int, typer.Option(min=1, help="files per request (413 above)")] = 16,
    max_pixels: Annotated[int | None, typer.Option(min=1, help="pixels per image (default: the run's)")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds per request (504 after)")] = 30.0,
    top_k: Annotated[int, typer.Option(min=1, help="classes per image unless ?top_k= says")] = 5,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="log every request")] = True,
    workers: Annotated[
        int, typer.Option(min=1, help="processes sharing the port; each gets its share of the cores as threads")
    ] = 1,
    drain_timeout: Annotated[
        float, typer.Option(min=0, help="after SIGTERM, seconds the accepted requests may take to finish")
    ] = 30.0,
    model_name: Annotated[str, typer.Option(help="the model's name in the /v2 routes (Open Inference Protocol)")] = (
        "imgclf"
    ),
) -> None:
    """Serve the model over HTTP (FastAPI + uvicorn): POST /predict, GET /health, /ready, /metadata, OpenAPI at
    /docs, and at / a page to drop images on; the Open Inference Protocol (KServe v2: /v2/models/NAME/infer, as
    Triton's clients speak it); Prometheus metrics at /metrics. SIGTERM drains: readiness turns 503, accepted
    requests finish, then it exits 0. A model that cannot be loaded stops here, before listening."""
    from imgclf import workflow
    from imgclf.deploy.serve import ServeSettings

    settings = ServeSettings(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        batching=batching,
        queue_size=queue_size,
        max_body_bytes=int(max_body_mb * 2**20),
        max_files=max_files,
        timeout_s=timeout,
        top_k=top_k,
        drain_timeout_s=drain_timeout,
        model_name=model_name,
        **({"max_pixels": max_pixels} if max_pixels else {}),
    )

    def loaded() -> None:  # the model loaded: the port opens next
        console.print(
            f"serving {escape(str(model))} on http://{host}:{port}/ as '{escape(model_name)}' (/v2), "
            f"{workers} worker{'s' * (workers > 1)} (Ctrl-C stops)"
        )

    workflow.serve(
        model,
        settings,
        host=host,
        port=port,
        workers=workers,
        device=device,
        threads=threads,
        access_log=access_log,
        on_loaded=loaded,
    )
