"""Model registry and the from-scratch CNN."""

from __future__ import annotations

import pytest
import torch

from imgclf.config import ModelConfig
from imgclf.errors import ConfigError
from imgclf.models.registry import ModelSpec, build_model, check_model_name, model_spec
from imgclf.models.small_cnn import SmallCNN


def small_cnn_spec(num_classes: int, in_chans: int, **options) -> ModelSpec:
    return model_spec(
        ModelConfig(**{"width": 8, "early_pool": False, "whiten": True, **options}),
        num_classes=num_classes,
        in_chans=in_chans,
    )


@pytest.mark.parametrize("early_pool", [False, True])
@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_small_cnn_shapes(depth, in_chans, early_pool):
    model = build_model(small_cnn_spec(7, in_chans, depth=depth, dropout=0.2, early_pool=early_pool))
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
    with pytest.raises(ConfigError, match=r"imgclf models"):
        check_model_name("zzzzzz")


def test_spec_round_trips():
    spec = small_cnn_spec(3, 1, depth=4, width=16, dropout=0.1, pool=1, early_pool=False)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.options == {"dropout": 0.1, "depth": 4, "width": 16, "pool": 1, "early_pool": False, "whiten": True}
    assert model_spec(ModelConfig(name="resnet18"), num_classes=3, in_chans=1).options == {"dropout": 0.0}


def test_small_cnn_early_pool_halves_the_flops():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model: torch.nn.Module) -> int:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, 28, 28))
        return counter.get_total_flops()

    classic, early = SmallCNN(10, in_chans=1, pool=2), SmallCNN(10, in_chans=1, pool=2, early_pool=True)
    assert 0.4 < flops(early) / flops(classic) < 0.6
    # the same parameters and the same last feature map (28 -> 14 -> 7 -> 3 px): only the pooling moved
    assert [p.shape for p in early.parameters()] == [p.shape for p in classic.parameters()]
    image = torch.zeros(1, 1, 28, 28)
    assert early.forward_features(image).shape == classic.forward_features(image).shape


def test_bundles_without_early_pool_rebuild_the_classic_layout():
    """Bundles written before the option existed have no `early_pool` in their spec: they must load as before."""
    old = ModelSpec("small_cnn", num_classes=3, in_chans=1, options={"depth": 3, "width": 8, "dropout": 0.0})
    model = build_model(old)
    assert isinstance(model.features[1][-1], torch.nn.MaxPool2d)
    # conv, BatchNorm, conv of the second block: the names under which old bundles stored their weights
    assert {"features.1.0.weight", "features.1.1.running_mean", "features.1.3.weight"} <= set(model.state_dict())
    model.load_state_dict(SmallCNN(3, in_chans=1, width=8, early_pool=False).state_dict())


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_small_cnn_pools_to_a_grid_for_its_head(pool):
    spec = small_cnn_spec(4, 1, dropout=0.0, pool=pool)
    model = build_model(spec)
    assert model.head.in_features == 32 * pool * pool
    for size in (16, 28, 40):  # any input size: the pooling adapts
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 4)
    assert build_model(ModelSpec.from_dict(spec.to_dict())).head.in_features == 32 * pool * pool


def test_early_pool_auto_must_be_resolved_before_a_build():
    # what auto resolves to is device.resolve_auto_settings' decision (tests/test_device.py)
    assert ModelConfig().early_pool == "auto"
    with pytest.raises(ConfigError, match="early_pool must be resolved"):
        model_spec(ModelConfig(), num_classes=3, in_chans=1)
    with pytest.raises(ConfigError, match="whiten must be resolved"):  # the data decide it (test_data_settings)
        model_spec(ModelConfig(early_pool=False), num_classes=3, in_chans=1)
    with pytest.raises(ConfigError, match="width must be resolved"):  # the budget decides it (test_budget)
        model_spec(ModelConfig(early_pool=False, whiten=False), num_classes=3, in_chans=1)
    assert model_spec(ModelConfig(name="resnet18"), num_classes=3, in_chans=1).options == {"dropout": 0.0}


def test_patch_whitening_decorrelates_patches_and_stays_frozen():
    torch.manual_seed(0)
    images = torch.randn(200, 1, 16, 16).cumsum(-1) / 4  # neighbouring pixels strongly correlated
    model = SmallCNN(3, in_chans=1, whiten=True)
    assert "whiten.weight" in model.state_dict()
    assert "whiten.weight" not in dict(model.named_parameters())  # a buffer: no optimizer moves it
    model.whiten.fit(images)
    outputs = torch.nn.functional.conv2d(images, model.whiten.weight)  # the valid windows
    flat = outputs[:, :4].permute(0, 2, 3, 1).reshape(-1, 4)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(4), atol=0.05)
    assert torch.equal(outputs[:, 4:], -outputs[:, :4])
    assert model(images[:2]).shape == (2, 3)
    spec = model_spec(ModelConfig(width=32, whiten=True, early_pool=False), num_classes=3, in_chans=1)
    assert spec.options["whiten"] is True
    assert isinstance(build_model(spec).whiten, torch.nn.Module)


def test_whiten_auto_follows_the_weights_else_the_number_of_training_images():
    from imgclf.data.settings import WHITEN_FROM_IMAGES, auto_whiten
    from imgclf.models.weights import PretrainedWeights

    assert not auto_whiten(WHITEN_FROM_IMAGES - 1, None) and auto_whiten(WHITEN_FROM_IMAGES, None)
    whitened = SmallCNN(3, in_chans=1, whiten=True).state_dict()
    classic = SmallCNN(3, in_chans=1).state_dict()
    assert auto_whiten(10, PretrainedWeights(whitened, "file a")) is True  # few images, but the weights need it
    assert auto_whiten(10**6, PretrainedWeights(classic, "file b")) is False


def test_small_cnn_weights_tell_their_width_and_whitening():
    from imgclf.models.weights import PretrainedWeights, has_whitening, small_cnn_width, whitening_fits

    whitened = PretrainedWeights(SmallCNN(3, in_chans=1, width=48, whiten=True).state_dict(), "file a")
    classic = PretrainedWeights(SmallCNN(3, in_chans=3, width=32).state_dict(), "file b")
    assert (small_cnn_width(whitened), small_cnn_width(classic)) == (48, 32)
    assert small_cnn_width(PretrainedWeights({}, "file c")) is None
    assert has_whitening(whitened) and not has_whitening(classic) and not has_whitening(None)
    assert whitening_fits(whitened, 1) and not whitening_fits(whitened, 3) and not whitening_fits(classic, 3)
