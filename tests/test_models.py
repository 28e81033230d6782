"""Model registry and the from-scratch CNN."""

from __future__ import annotations

import pytest
import torch

from imgclf.errors import ConfigError
from imgclf.models.registry import ModelSpec, build_model, check_model_name, model_spec


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_small_cnn_shapes(depth, in_chans):
    model = build_model(model_spec("small_cnn", num_classes=7, in_chans=in_chans, depth=depth, width=8, dropout=0.2))
    assert len(model.features) == depth
    out = model(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, 7)
    assert model.features[-1][0].out_channels == 8 * 2 ** (depth - 1)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"])
def test_timm_models_get_our_head_and_channels(name):
    model = build_model(ModelSpec(name, num_classes=4, in_chans=1, options={"dropout": 0.0}))
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match=r"Did you mean: .*resnet18"):
        check_model_name("resnet-18")
    with pytest.raises(ConfigError, match=r"timm\.list_models"):
        check_model_name("zzzzzz")


def test_spec_round_trips():
    spec = model_spec("small_cnn", num_classes=3, in_chans=1, depth=4, width=16, dropout=0.1)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.options == {"dropout": 0.1, "depth": 4, "width": 16, "pool": 1}


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_small_cnn_pools_to_a_grid_for_its_head(pool):
    spec = model_spec("small_cnn", num_classes=4, in_chans=1, depth=3, width=8, dropout=0.0, pool=pool)
    model = build_model(spec)
    assert model.head.in_features == 32 * pool * pool
    for size in (16, 28, 40):  # any input size: the pooling adapts
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 4)
    assert build_model(ModelSpec.from_dict(spec.to_dict())).head.in_features == 32 * pool * pool
