"""A checkpoint put back into a fit built afresh (`builders.make_fit_state`), so that training goes on from the
point where `checkpoints/last.safetensors` was written."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgclf.training.callbacks import Phases
    from imgclf.training.checkpoint import Checkpoint
    from imgclf.training.state import FitState

__all__ = ["restore_fit"]


def restore_fit(state: FitState, phases: Phases, checkpoint: Checkpoint) -> None:
    """Restore `checkpoint` (a `load_checkpoint` result) into `state`, in this order:

    1. the counters (epoch, history, best metrics, stop reason, loss scaler, a stopped epoch's progress, budget);
    2. the model's weights, and their moving average with its step count (`train.ema`);
    3. the phase the checkpoint was written in: that of the epoch it stopped in, or of the last finished one
       (entering it sets the trainable layers, the optimizer's learning rates and the LR schedule);
    4. the optimizer's and the schedule's saved state, over those of the phase just entered.

    Args:
        state: the fresh fit state of the same model and optimizer.
        phases: the run's `Phases` callback.
        checkpoint: what `load_checkpoint` read.
    """
    state.restore_counters(checkpoint.meta)
    state.model.load_state_dict(checkpoint.model)
    if state.ema is not None and checkpoint.ema:
        state.ema.load(checkpoint.ema, int(checkpoint.meta.get("ema_steps", 0)))
    phases.enter(state, state.epoch + 1 if state.progress is not None else max(state.epoch, 1))
    state.optimizer.load_state_dict(checkpoint.optimizer)
    state.schedule.load_state_dict(checkpoint.schedule)
