"""The settings whose `auto` the hardware decides (`device.resolve_auto_settings`): the whole decision table, and
the workflow recording and logging what it decided."""

from __future__ import annotations

import logging

import pytest
import torch

from imgclf.config import build_config
from imgclf.device import AutoSettings, Compute, auto_early_pool, resolve_auto_settings

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("compute", "on"),
    [
        (Compute(CPU, None), True),  # AVX2: FLOP-bound, half the FLOPs pay
        (Compute(CPU, torch.bfloat16), False),  # native bf16
        (Compute(CUDA, torch.bfloat16), False),
        (Compute(CUDA, torch.float16), False),
        (Compute(CUDA, None), False),
    ],
)
def test_early_pooling_is_on_for_fp32_on_a_cpu_only(compute, on):
    assert auto_early_pool(compute) is on


@pytest.mark.parametrize(
    ("compute", "precision", "early_pool", "has_early_pool", "expected"),
    [
        # both auto, small_cnn: the precision computed in, and early pooling by it
        (Compute(CPU, None), "auto", "auto", True, AutoSettings("fp32", True, "fp32 on a CPU, half the FLOPs")),
        (Compute(CPU, torch.bfloat16), "auto", "auto", True, AutoSettings("bf16", False, "bf16 on cpu")),
        (Compute(CUDA, torch.bfloat16), "auto", "auto", True, AutoSettings("bf16", False, "bf16 on cuda")),
        (Compute(CUDA, torch.float16), "auto", "auto", True, AutoSettings("fp16", False, "fp16 on cuda")),
        # a given precision stays as given; early pooling still follows the compute
        (Compute(CPU, None), "fp32", "auto", True, AutoSettings(None, True, "fp32 on a CPU, half the FLOPs")),
        (Compute(CPU, torch.bfloat16), "bf16", "auto", True, AutoSettings(None, False, "bf16 on cpu")),
        # given early pooling stays as given, either way
        (Compute(CPU, None), "auto", True, True, AutoSettings("fp32")),
        (Compute(CPU, None), "auto", False, True, AutoSettings("fp32")),
        (Compute(CPU, None), "fp32", False, True, AutoSettings()),
        # a model without early pooling (a timm backbone): only the precision
        (Compute(CPU, None), "auto", "auto", False, AutoSettings("fp32")),
        (Compute(CUDA, torch.bfloat16), "bf16", "auto", False, AutoSettings()),
    ],
)
def test_the_auto_settings_decision_table(compute, precision, early_pool, has_early_pool, expected):
    assert (
        resolve_auto_settings(compute, precision=precision, early_pool=early_pool, has_early_pool=has_early_pool)
        == expected
    )


def test_the_overrides_name_only_what_auto_decided():
    assert AutoSettings("bf16", False, "bf16 on cpu").overrides() == {
        "train.precision": "bf16",
        "model.early_pool": False,
    }
    assert AutoSettings(None, True, "fp32 on a CPU, half the FLOPs").overrides() == {"model.early_pool": True}
    assert AutoSettings().overrides() == {}


@pytest.mark.parametrize(
    ("compute", "line"),
    [
        (Compute(CPU, None), "early pooling: on (auto: fp32 on a CPU, half the FLOPs)"),
        (Compute(CPU, torch.bfloat16), "early pooling: off (auto: bf16 on cpu)"),
    ],
)
def test_the_workflow_records_the_decision_and_logs_it(compute, line, caplog):
    from imgclf.workflow.run import _resolve_for_compute

    with caplog.at_level(logging.INFO, logger="imgclf"):
        resolved = _resolve_for_compute(build_config(None), compute)
    assert (resolved.train.precision, resolved.model.early_pool) == (compute.precision, compute.dtype is None)
    assert [r.getMessage() for r in caplog.records if "early pooling" in r.getMessage()] == [line]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imgclf"):
        timm = _resolve_for_compute(build_config(None, {"model.name": "resnet18"}), compute)
    assert timm.model.early_pool == "auto" and not [r for r in caplog.records if "early pooling" in r.getMessage()]
