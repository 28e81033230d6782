"""One process of a multi-process training in tests/test_distributed.py: `imgclf.train` from Python with callbacks
that record what each rank saw, or stop one rank on purpose. Exits like `imgclf train` would (0, 1, 130).

    python tests/distributed_driver.py '{"data": ..., "out": ..., "name": ..., "config": {...}, "record": ...}'
    python tests/distributed_driver.py '{"resume": RUN}'      # or {"reproduce": RUN, "name": ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

import imgclf
from imgclf.errors import ImgclfError
from imgclf.training.state import Callback


def digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order: equal on two ranks only if the weights are bit for bit equal.
    (Buffers such as BatchNorm's running statistics are each rank's own until DDP broadcasts rank 0's at the next
    forward pass.)"""
    sha = hashlib.sha256()
    for tensor in model.parameters():
        sha.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


class Record(Callback):
    """Writes `<record>/rank<R>.json`: the weights' digest after the first step and at the end, the step a stop
    happened at, the per-epoch history rows this rank computed."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"rank{os.environ.get('RANK', '0')}.json"
        self.seen: dict = {"history": []}

    def on_batch_end(self, state, index, loss, batch_size):
        if "after_first_step" not in self.seen:
            self.seen["after_first_step"] = digest(state.model)
            self._write()

    def on_epoch_end(self, state, row):
        self.seen["history"].append({k: v for k, v in row.items() if k not in ("seconds", "images_per_s")})
        self._write()

    def on_interrupt(self, state):
        self.seen["stopped_at"] = [state.epoch + 1, state.progress.step]
        self._write()

    def on_fit_end(self, state):
        self.seen["final"] = digest(state.model)
        self._write()

    def _write(self) -> None:
        self.path.write_text(json.dumps(self.seen))


class Trouble(Callback):
    """On rank `rank`, at `epoch` and batch index `batch`: a real SIGINT to this process, or an exception."""

    def __init__(self, rank: int, epoch: int, batch: int, kind: str) -> None:
        self.rank, self.epoch, self.batch, self.kind = rank, epoch, batch, kind

    def on_batch_end(self, state, index, loss, batch_size):
        here = int(os.environ.get("RANK", "0")) == self.rank
        if here and state.epoch + 1 == self.epoch and index == self.batch:
            if self.kind == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError(f"a failure on rank {self.rank}, on purpose")


def main() -> int:
    args = json.loads(sys.argv[1])
    callbacks = []
    if args.get("record"):
        callbacks.append(Record(Path(args["record"])))
    if args.get("trouble"):
        callbacks.append(Trouble(**args["trouble"]))
    try:
        if args.get("resume"):
            imgclf.train(None, resume=args["resume"], report=False, callbacks=callbacks)
        elif args.get("reproduce"):
            imgclf.reproduce(args["reproduce"], name=args["name"], report=False, callbacks=callbacks)
        else:
            imgclf.train(
                args["data"], args["config"], out=args["out"], name=args["name"], report=False, callbacks=callbacks
            )
    except ImgclfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
