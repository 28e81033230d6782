"""Training and prediction on two CPU processes with Gloo, started as torchrun starts them (its environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), and once by torchrun itself as two nodes joined by the c10d rendezvous on
loopback. Each test launches real processes and reads back the run folder they wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from conftest import run_cli, write_digits
from imgclf.files import read_csv
from imgclf.training.checkpoint import load_checkpoint

DRIVER = Path(__file__).parent / "distributed_driver.py"
RECIPE = {
    "data": {"img_size": 16},
    "model": {"width": 8},
    "augment": {"preset": "light", "hflip": False},
    "train": {"epochs": 3, "batch_size": 8},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], processes: int = 2, *, stdout=subprocess.PIPE) -> list[subprocess.Popen]:
    """`command` once per rank, with the environment torchrun gives its workers (one node, `processes` per node)."""
    port = str(free_port())
    ranks = []
    for rank in range(processes):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(processes)}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(processes), OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True))
    return ranks


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> tuple[list[int], list[str]]:
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [p.returncode for p in processes], outputs


def driver(**args) -> list[str]:
    return [sys.executable, str(DRIVER), json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in args.items()})]


def runs_in(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink())


def rank_records(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def digits_ten(tmp_path_factory) -> Path:
    """All ten digit classes, 120 images each: enough validation images (180) to compare two runs' accuracy."""
    return write_digits(tmp_path_factory.mktemp("digits10") / "flat", classes=tuple(range(10)), per_class=120)


@pytest.mark.slow
def test_two_processes_write_one_run_folder_with_identical_weights(tmp_path, digits_source):
    record = tmp_path / "record"
    record.mkdir()
    command = driver(data=digits_source, out=tmp_path / "runs", name="ddp", config=RECIPE, record=record)
    codes, outputs = finish(launch(command))
    assert codes == [0, 0], outputs
    assert runs_in(tmp_path / "runs") == ["ddp"]  # one folder, named by rank 0
    first, second = rank_records(record)
    assert first["after_first_step"] == second["after_first_step"]  # DDP averaged the gradients of both slices
    assert first["final"] == second["final"]
    assert first["history"] == second["history"]  # sums added over both processes: one history
    run = tmp_path / "runs" / "ddp"
    history = read_csv(run / "history.csv")
    assert len(history) == 3 and int(history[0]["train_images"]) == len(
        [r for r in read_csv(run / "manifest.csv") if r["split"] == "train"]
    )
    env = json.loads((run / "env.json").read_text())
    assert env["distributed"]["world_size"] == 2 and env["distributed"]["global_batch_size"] == 16
    for weights in (run / "checkpoints" / "last.safetensors", run / "model" / "weights.safetensors"):
        with safe_open(str(weights), "pt") as tensors:
            assert not any(key.startswith("module.") for key in tensors.keys()), weights  # noqa: SIM118
    assert (run / "metrics.json").is_file()
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    # --reproduce under torchrun: rank 0 checks the files, one new folder, the same training
    codes, outputs = finish(launch(driver(reproduce=run, name="again")))
    assert codes == [0, 0], outputs
    assert runs_in(tmp_path / "runs") == ["again", "ddp"]
    again = tmp_path / "runs" / "again"
    assert json.loads((again / "env.json").read_text())["reproduces"] == str(run.resolve())
    times = ("seconds", "images_per_s")
    assert [{k: v for k, v in row.items() if k not in times} for row in read_csv(again / "history.csv")] == [
        {k: v for k, v in row.items() if k not in times} for row in history
    ]


@pytest.mark.slow
def test_streaming_ddp_changes_phase_and_stops_early_on_both_ranks_together(tmp_path, digits_source):
    """The streaming loaders (cache off) under two processes, a frozen first epoch then fine-tuning (DDP rebuilt
    for the new trainable set), and early stopping decided on rank 0 for both: no improvement of 10 in val loss
    after epoch 1 with patience 1 ends the run after epoch 2 of 6 on both ranks, with the same weights."""
    record = tmp_path / "record"
    record.mkdir()
    config = {
        **RECIPE,
        "data": {**RECIPE["data"], "cache": "off"},
        "train": {**RECIPE["train"], "epochs": 6, "freeze_epochs": 1},
    }
    config["train"]["early_stopping"] = {"patience": 1, "min_delta": 10}
    command = driver(data=digits_source, out=tmp_path / "runs", name="es", config=config, record=record)
    codes, outputs = finish(launch(command))
    assert codes == [0, 0], outputs
    first, second = rank_records(record)
    # the same steps and decisions on both (rank 0 alone then restores the best epoch's weights to ship them)
    assert first["after_first_step"] == second["after_first_step"]
    assert first["history"] == second["history"] and len(first["history"]) == 2
    run = tmp_path / "runs" / "es"
    history = read_csv(run / "history.csv")
    assert [row["phase"] for row in history] == ["frozen", "fine-tune"]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["reason"].startswith("early stopping:"), status
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["cache"] == "off"


@pytest.mark.slow
def test_two_processes_reach_the_accuracy_of_one_with_the_same_global_batch(tmp_path, digits_ten):
    config = {**RECIPE, "train": {**RECIPE["train"], "epochs": 4}}
    one = subprocess.run(
        driver(
            data=digits_ten, out=tmp_path, name="one", config={**config, "train": {**config["train"], "batch_size": 16}}
        ),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert one.returncode == 0, one.stderr[-2000:]
    codes, outputs = finish(launch(driver(data=digits_ten, out=tmp_path, name="two", config=config)))
    assert codes == [0, 0], outputs
    single = float(read_csv(tmp_path / "one" / "history.csv")[-1]["val_acc"])
    double = float(read_csv(tmp_path / "two" / "history.csv")[-1]["val_acc"])
    val_images = int(read_csv(tmp_path / "two" / "history.csv")[-1]["val_images"])
    assert val_images == 120  # every validation image counted once over the two processes
    assert abs(single - double) <= 0.02, (single, double)


@pytest.mark.slow
def test_sigint_to_one_rank_stops_both_after_the_same_step_and_resume_repeats_the_run(tmp_path, digits_source):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for folder in (straight, stopped):
        folder.mkdir()
    codes, outputs = finish(
        launch(driver(data=digits_source, out=tmp_path, name="straight", config=RECIPE, record=straight))
    )
    assert codes == [0, 0], outputs
    trouble = {"rank": 1, "epoch": 2, "batch": 2, "kind": "sigint"}
    command = driver(data=digits_source, out=tmp_path, name="stopped", config=RECIPE, record=stopped, trouble=trouble)
    codes, outputs = finish(launch(command))
    assert codes == [130, 130], outputs
    first, second = rank_records(stopped)
    assert first["stopped_at"] == second["stopped_at"] == [2, 3]  # after batch index 2 of epoch 2, on both
    checkpoint = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.safetensors").meta
    assert checkpoint["progress"]["step"] == 3 and len(checkpoint["progress"]["rng_by_rank"]) == 2
    status = json.loads((tmp_path / "stopped" / "status.json").read_text())
    assert status["status"] == "stopped" and status["reason"].startswith("SIGINT")
    alone = run_cli("train", "--resume", tmp_path / "stopped")  # each process's slice: not with one process
    assert alone.exit_code == 2 and "resumes only with 2 (received 1)" in " ".join(alone.output.split())
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    codes, outputs = finish(launch(driver(resume=tmp_path / "stopped", record=resumed)))
    assert codes == [0, 0], outputs
    times = ("seconds", "images_per_s")
    expected = [
        {k: v for k, v in row.items() if k not in times} for row in read_csv(tmp_path / "straight" / "history.csv")
    ]
    got = [{k: v for k, v in row.items() if k not in times} for row in read_csv(tmp_path / "stopped" / "history.csv")]
    assert got == expected


@pytest.mark.slow
def test_an_exception_in_rank_1_ends_both_processes_with_failure_within_60_s(tmp_path, digits_source):
    trouble = {"rank": 1, "epoch": 1, "batch": 1, "kind": "error"}
    config = {**RECIPE, "train": {**RECIPE["train"], "epochs": 50}}
    started = time.monotonic()
    processes = launch(driver(data=digits_source, out=tmp_path, name="boom", config=config, trouble=trouble))
    try:
        codes, outputs = finish(processes, timeout=60)
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail("a process was still running 60 s after rank 1 failed")
    assert all(code != 0 for code in codes), (codes, outputs)
    assert "on purpose" in outputs[1]
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_two_nodes_join_through_the_c10d_rendezvous_on_loopback(tmp_path, digits_source):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for _ in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "imgclf-test"]
        command += ["-m", "imgclf", "train", str(digits_source), "--epochs", "2", "--img-size", "16"]
        command += [
            "--batch-size",
            "8",
            "--set",
            "model.width=8",
            "--out",
            str(tmp_path),
            "--name",
            "nodes",
            "--no-report",
        ]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, outputs = finish(nodes)
    assert codes == [0, 0], outputs
    assert runs_in(tmp_path) == ["nodes"]
    env = json.loads((tmp_path / "nodes" / "env.json").read_text())
    assert env["distributed"]["world_size"] == 2 and env["distributed"]["processes_per_node"] == 1
    assert sum("run folder: " in output for output in outputs) == 1  # rank 0 prints the result


@pytest.mark.slow
def test_sharded_prediction_gives_the_rows_of_one_process_in_the_same_order(tmp_path, trained_run, digits_source):
    inputs = tmp_path / "inputs"
    shutil.copytree(digits_source, inputs)
    (inputs / "digit1" / "broken.png").write_bytes(b"not an image")
    command = [sys.executable, "-m", "imgclf", "predict", str(trained_run), str(inputs), "--top-k", "2"]
    single = subprocess.run([*command, "--out", str(tmp_path / "one.csv")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    codes, outputs = finish(launch([*command, "--out", str(tmp_path / "two.csv")]))
    assert codes == [0, 0], outputs
    one, two = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    assert len(one) == 91 and any(row["error"] for row in one)
    assert two == one


@pytest.mark.slow
def test_devices_starts_torchrun_and_records_the_global_batch(tmp_path, digits_source):
    command = [sys.executable, "-m", "imgclf", "train", str(digits_source), "--devices", "2", "--epochs", "1"]
    command += ["--img-size", "16", "--batch-size", "8", "--set", "model.width=8", "--set", "train.lr_scaling=linear"]
    command += ["--out", str(tmp_path), "--name", "dev", "--no-report"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    env = json.loads((tmp_path / "dev" / "env.json").read_text())["distributed"]
    assert env == {
        "world_size": 2,
        "processes_per_node": 2,
        "backend": "gloo",
        "batch_size_per_process": 8,
        "global_batch_size": 16,
        "lr_scaling": "linear",
        "lr": 0.004,
    }
    assert runs_in(tmp_path) == ["dev"]


def test_streaming_shards_count_their_own_images_and_draw_their_own_augmentation_seeds():
    """The streaming loader under torchrun: each process's share of the images, the same order on every process
    (DistributedSampler from the seed and epoch) but worker seeds of its own, so that processes do not crop and
    flip alike; one process's loader keeps drawing its order from its generator."""
    import torch

    from imgclf.data.loaders import make_loader
    from imgclf.training.engine import seed_epoch

    dataset = list(range(11))
    ranks = [make_loader(dataset, batch_size=2, shuffle=True, num_workers=0, shard=(r, 2)) for r in (0, 1)]
    assert [loader.num_images for loader in ranks] == [6, 6] and [len(loader) for loader in ranks] == [3, 3]
    evaluation = make_loader(dataset, batch_size=2, shuffle=False, num_workers=0, shard=(1, 2))
    assert evaluation.num_images == 5  # unpadded: no image counted twice
    for rank, loader in enumerate(ranks):
        seed_epoch(7, 3, loader, rank=rank)
    orders = [list(loader.sampler) for loader in ranks]
    assert set(orders[0] + orders[1]) == set(range(11)) and orders[0] != orders[1]
    worker_seeds = [torch.randint(0, 2**62, (1,), generator=loader.generator).item() for loader in ranks]
    assert worker_seeds[0] != worker_seeds[1]
    single, again = (make_loader(dataset, batch_size=2, shuffle=True, num_workers=0) for _ in range(2))
    seed_epoch(7, 3, single, rank=0)
    seed_epoch(7, 3, again, rank=0)
    assert single.num_images == 11 and list(single.sampler) == list(again.sampler)


def test_a_streaming_shard_whose_batch_failed_whole_still_takes_every_step(tmp_path):
    """Under torchrun a batch whose images all fail to load on one process must not cost it a step (the others
    would wait at DDP's all-reduce): the next good batch is repeated; one process just skips the batch."""
    import numpy as np
    import torch
    from PIL import Image

    from imgclf.data.loaders import ImageDataset, make_loader

    paths = []
    for index in range(8):
        path = tmp_path / f"{index}.png"
        Image.new("L", (4, 4), index * 30).save(path)
        paths.append(path)
    dataset = ImageDataset(
        paths,
        [0] * 8,
        transform=lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32)),
        color="gray",
        max_pixels=10**6,
    )
    sharded = make_loader(dataset, batch_size=2, shuffle=True, num_workers=0, shard=(0, 2))
    sharded.sampler.set_epoch(0)
    for index in list(sharded.sampler)[:2]:  # this process's first batch
        paths[index].write_bytes(b"not an image")
    batches = list(sharded)
    assert len(batches) == len(sharded) == 2 and len(sharded.bad_images) == 2
    assert torch.equal(batches[0][0], batches[1][0])  # the good batch taken twice
    single = make_loader(dataset, batch_size=2, shuffle=False, num_workers=0)
    assert sum(len(images) for images, _ in single) == 6 and len(single.bad_images) == 2
