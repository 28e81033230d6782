"""Weight averaging: an exponential moving average (EMA) of the weights, updated after every optimizer step,
validated every epoch beside the weights themselves; the run ships whichever validates better (`Checkpointer`).

timm's `ModelEmaV3` does the averaging: parameters and BatchNorm's running statistics alike (the averaged
weights are evaluated with averaged statistics, which track them closely when the decay is high), with the decay
warmed up from 0 (decay_t = min(decay, 1 - (1 + t)^(-2/3))), so the first hundreds of steps are not averaged into a
run that has barely started.
"""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of `model`'s weights and the number of steps averaged (for the decay's warmup and
    resume)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.average = ModelEmaV3(model, decay=decay, use_warmup=True)
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model (evaluate it, save its state dict)."""
        return self.average.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average `model` (unwrapped: no DDP) in after one more optimizer step."""
        self.steps += 1
        self.average.update(model, step=self.steps)

    def load(self, weights: dict[str, torch.Tensor], steps: int) -> None:
        self.module.load_state_dict(weights)
        self.steps = steps
