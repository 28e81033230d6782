"""The report's figures (plots.py) and Grad-CAM (explain.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from torch import nn

from imgclf.config import ModelConfig
from imgclf.errors import ConfigError, ImgclfError
from imgclf.evaluation import plots
from imgclf.evaluation.explain import CamLayer, cam_layer, grad_cam, overlay, target_layer
from imgclf.models.registry import ModelSpec, build_model, model_spec

# --- figures -----------------------------------------------------------------------------------------------------


def saved(figure, tmp_path, name="figure") -> np.ndarray:
    """Write the figure as the report does (PNG, 100 dpi), decode it again and return its grey pixels."""
    path = tmp_path / f"{name}.png"
    figure.savefig(path, dpi=100)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def assert_drawn(figure, tmp_path, name="figure", min_std=12.0) -> np.ndarray:
    pixels = saved(figure, tmp_path, name)
    assert pixels.std() > min_std, f"{name} looks blank (pixel std {pixels.std():.1f})"
    width, height = figure.get_size_inches()
    assert width <= 22 and height <= 30  # what a report page can hold
    return pixels


def history(epochs: int, switch: int | None = None, as_text: bool = False) -> list[dict]:
    """Rows shaped like history.csv: frozen until `switch`, fine-tuning after; as strings when `as_text`."""
    rows = []
    for epoch in range(1, epochs + 1):
        row = {
            "epoch": epoch,
            "phase": "train" if switch is None else "frozen" if epoch < switch else "finetune",
            "train_loss": 2.0 / epoch,
            "train_acc": 1 - 0.5 / epoch,
            "val_loss": 2.2 / epoch + 0.03 * epoch,
            "val_acc": 0.9 - 0.5 / epoch,
            "lr": 1e-3 * 0.8**epoch,
            "seconds": 2.5,
            "images_per_s": 410.0,
        }
        rows.append({k: str(v) for k, v in row.items()} if as_text else row)
    return rows


def vertical_lines(axes) -> dict[str, float]:
    """Label -> x of every vertical line (axvline) drawn on the axes."""
    found = {}
    for line in axes.get_lines():
        xs = line.get_xdata()
        if len(xs) == 2 and xs[0] == xs[1]:
            found[line.get_label()] = float(xs[0])
    return found


@pytest.mark.parametrize("as_text", [False, True])
def test_learning_curves_mark_the_phase_switch_and_the_best_epoch(tmp_path, as_text):
    figure = plots.learning_curves_figure(history(10, switch=4, as_text=as_text), best_epoch=7)
    assert_drawn(figure, tmp_path)
    loss, accuracy, lr = figure.axes
    lines = vertical_lines(loss)
    assert lines["fine-tuning starts"] == 3.5  # between the last frozen epoch and the first fine-tuning one
    assert lines["best epoch (7)"] == 7
    assert {"training", "validation"} <= {line.get_label() for line in accuracy.get_lines()}
    assert lr.get_yscale() == "log"
    legend = [text.get_text() for text in loss.get_legend().get_texts()]
    assert "fine-tuning starts" in legend


def test_learning_curves_shade_the_epochs_trained_on_smaller_images(tmp_path):
    sizes = ["20"] * 5 + ["24"] * 2 + ["28"] * 3
    figure = plots.learning_curves_figure([{**row, "img_size": size} for row, size in zip(history(10), sizes)])
    assert_drawn(figure, tmp_path)
    legend = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
    assert "trained at 20-24 px" in legend
    band = next(patch for patch in figure.axes[1].patches if patch.get_label() == "trained at 20-24 px")
    assert band.get_x() == 0.5 and band.get_width() == 7  # epochs 1-7
    plain = plots.learning_curves_figure([{**row, "img_size": "28"} for row in history(4)])
    assert not plain.axes[1].patches  # one size throughout: no band


def test_learning_curves_of_one_epoch_and_without_validation(tmp_path):
    assert_drawn(plots.learning_curves_figure(history(1), best_epoch=1), tmp_path, "one")
    no_val = [{**row, "val_loss": None, "val_acc": ""} for row in history(5)]
    figure = plots.learning_curves_figure(no_val)
    assert_drawn(figure, tmp_path, "no_val")
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["training"]
    assert not vertical_lines(figure.axes[0])  # one phase, no best epoch: nothing marked


@pytest.mark.parametrize("n", [2, 50])
def test_per_class_bars(tmp_path, n):
    rng = np.random.default_rng(n)
    per_class = {
        f"class {i}": {"precision": p, "recall": r, "f1": 2 * p * r / (p + r), "support": int(s)}
        for i, (p, r, s) in enumerate(zip(rng.uniform(0.3, 1, n), rng.uniform(0.3, 1, n), rng.integers(1, 40, n)))
    }
    figure = plots.per_class_figure(per_class)
    assert_drawn(figure, tmp_path)
    axes = figure.axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert labels[0].startswith("class 0  (n=") and len(labels) == n
    assert len(axes.patches) == 3 * n
    assert min(label.get_fontsize() for label in axes.get_yticklabels()) >= 6


def reliability_curve(shift: float, bins: int = 10) -> dict:
    edges = np.linspace(0, 1, bins + 1)
    count = [0, 0, 0, 4, 6, 9, 15, 30, 60, 200]
    confidence = [None if c == 0 else (edges[i] + edges[i + 1]) / 2 for i, c in enumerate(count)]
    accuracy = [None if c is None else max(0.0, c - shift) for c in confidence]
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": confidence,
        "accuracy": accuracy,
        "count": count,
        "ece": shift * 0.9,
    }


def test_reliability_diagram_before_and_after_calibration(tmp_path):
    curves = {"before calibration": reliability_curve(0.15), "after (T=1.80)": reliability_curve(0.02)}
    figure = plots.reliability_figure(curves)
    assert_drawn(figure, tmp_path)
    diagram, counts = figure.axes
    legend = [text.get_text() for text in diagram.get_legend().get_texts()]
    assert "before calibration (ECE 0.135)" in legend and "after (T=1.80) (ECE 0.018)" in legend
    diagonal = diagram.get_lines()[0]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    assert max(bar.get_height() for bar in counts.patches) == 200
    single = plots.reliability_figure({"test": reliability_curve(0.1)})
    assert_drawn(single, tmp_path, "single")


def test_image_grid_mixes_grey_colour_and_float_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (8, 8), dtype=np.uint8),  # a digit scan
        rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
        rng.uniform(0, 1, (3, 24, 24)).astype(np.float32),  # a torchvision tensor as numpy
        rng.integers(0, 256, (20, 20, 1), dtype=np.uint8),
    ]
    figure = plots.image_grid_figure(images, ["grey", "rgb", "float", "one channel"], ncols=3, title="Mixed")
    assert_drawn(figure, tmp_path)
    drawn = figure.axes[0].get_images()
    assert len(drawn) == 4
    assert drawn[0].get_cmap().name == "gray" and drawn[1].get_array().shape == (40, 30, 3)
    assert [text.get_text() for text in figure.axes[0].texts] == ["grey", "rgb", "float", "one channel"]
    with pytest.raises(ValueError, match="captions"):
        plots.image_grid_figure(images, ["too few"])


@pytest.mark.parametrize("n", [2, 50])
def test_sample_grid_stays_readable(tmp_path, n):
    rng = np.random.default_rng(n)
    samples = {f"class_{i}": [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(6)] for i in range(n)}
    samples["class_1"] = []  # a class without training images
    figure = plots.sample_grid_figure(samples)
    assert_drawn(figure, tmp_path)
    texts = figure.axes[0].texts
    labels = [text.get_text() for text in texts if text.get_text().startswith("class_")]
    assert labels[:2] == ["class_0", "class_1"] and len(labels) == n
    assert min(text.get_fontsize() for text in texts if text.get_text().startswith("class_")) >= 6.5
    left, right, _, _ = figure.axes[0].get_images()[0].get_extent()  # the canvas axes is in inches
    assert right - left >= 0.9  # 50 classes are set in two blocks rather than shrunk to thumbnails
    assert [text.get_text() for text in texts].count("(none)") == 1
    assert len(figure.axes[0].get_images()) == 6 * (n - 1)


def test_augmentation_preview_takes_uint8_and_float_versions(tmp_path):
    rng = np.random.default_rng(1)
    originals = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    augmented = [
        [rng.uniform(0, 1, (32, 32, 3)), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)],
        [rng.uniform(-0.2, 1.3, (3, 32, 32)).astype(np.float32)],  # out of range: clipped, not an error
        [],
    ]
    figure = plots.augmentation_preview_figure(originals, augmented, title="Augmentation")
    assert_drawn(figure, tmp_path)
    captions = [text.get_text() for text in figure.axes[0].texts]
    assert captions.count("original") == 3 and "augmented 2" in captions
    assert len(figure.axes[0].get_images()) == 3 + 3


def test_mistakes_are_captioned_with_classes_probability_and_short_path(tmp_path):
    rng = np.random.default_rng(2)
    n = 7
    figure = plots.mistakes_figure(
        [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(n)],
        ["cat"] * n,
        ["dog"] * n,
        list(np.linspace(0.99, 0.6, n)),
        [f"/data/pets/test/cat/img {i}.jpg" for i in range(n)],
    )
    assert_drawn(figure, tmp_path)
    captions = [text.get_text() for text in figure.axes[0].texts]
    assert captions[0] == "true: cat\npred: dog (0.99)\ncat/img 0.jpg" and len(captions) == n
    with pytest.raises(ValueError, match="paths"):
        plots.mistakes_figure([], ["cat"], [], [], [])


def test_gradcam_figure_pairs_each_image_with_its_overlay(tmp_path):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(3)]
    yy, xx = np.mgrid[0:16, 0:16]
    heatmap = np.exp(-((xx - 4) ** 2 + (yy - 4) ** 2) / 8.0)  # smaller than the image: stretched over it
    figure = plots.gradcam_figure(images, [heatmap] * 3, ["true cat → dog (0.93)"] * 3)
    assert_drawn(figure, tmp_path)
    drawn = figure.axes[0].get_images()
    assert len(drawn) == 3 * 3  # per example: the image, then the image again under its heat map
    image, under, heat = drawn[:3]
    assert heat.get_cmap().name == "turbo" and heat.get_array().shape == (16, 16)
    assert heat.get_extent() == under.get_extent() != image.get_extent()
    assert [text.get_text() for text in figure.axes[0].texts] == ["true cat → dog (0.93)"] * 3


def test_gradcam_figure_has_a_colour_bar_under_the_tiles_and_the_note_under_it(tmp_path):
    images, batch = digit_images(28, n=5)
    model = small_cnn(in_chans=1, classes=10)
    layer = cam_layer(model, 28)
    note = layer.caption()
    figure = plots.gradcam_figure(images, list(grad_cam(model, batch)), ["true 0 → 3 (0.81)"] * 5, title="T", note=note)
    assert_drawn(figure, tmp_path)
    canvas, bar = figure.axes  # the colour bar is an axes of its own
    assert "turbo" in [mesh.get_cmap().name for mesh in bar.collections] and bar.get_xlim() == (0.0, 1.0)
    assert [label.get_text() for label in bar.get_xticklabels()] == ["0.0", "0.5", "1.0"]
    assert "each map scaled to its own maximum" in bar.get_xlabel()
    height = figure.get_size_inches()[1]
    lowest_tile = max(image.get_extent()[2] for image in canvas.get_images())  # inches from the top
    assert bar.get_position().y1 < 1 - lowest_tile / height  # below every tile
    texts = {text.get_text(): text for text in figure.texts}
    assert note in texts and texts[note].get_position()[1] < bar.get_position().y0  # the note under the bar
    assert texts["T"].get_position()[1] > 1 - 0.15 / height  # the title stays at the top
    assert len(plots.gradcam_figure(images, list(grad_cam(model, batch)), [""] * 5).texts) == 0  # no note, no text


@pytest.mark.parametrize(
    ("name", "draw"),
    [
        ("learning_curves", lambda: plots.learning_curves_figure([])),
        ("per_class", lambda: plots.per_class_figure({})),
        ("reliability", lambda: plots.reliability_figure({})),
        ("reliability_no_counts", lambda: plots.reliability_figure({"test": {**reliability_curve(0), "count": []}})),
        ("image_grid", lambda: plots.image_grid_figure([], [])),
        ("samples", lambda: plots.sample_grid_figure({"a": [], "b": []})),
        ("augmentation", lambda: plots.augmentation_preview_figure([], [])),
        ("mistakes", lambda: plots.mistakes_figure([], [], [], [], [])),
        ("gradcam", lambda: plots.gradcam_figure([], [], [])),
        ("confusion", lambda: plots.confusion_matrix_figure(np.zeros((0, 0)), [])),
    ],
)
def test_every_figure_says_when_there_is_nothing_to_draw(tmp_path, name, draw):
    figure = draw()
    assert_drawn(figure, tmp_path, name, min_std=3.0)
    messages = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert messages and messages[0].startswith("no ")


@pytest.mark.parametrize(("n", "normalize"), [(2, False), (12, True), (30, False), (30, True)])
def test_confusion_matrix_cell_text_fits_its_cell(tmp_path, n, normalize):
    matrix = np.random.default_rng(n).integers(0, 20_000, (n, n))  # five-digit counts: the widest labels
    figure = plots.confusion_matrix_figure(
        matrix, [f"a rather long class name {i}" for i in range(n)], normalize=normalize
    )
    assert_drawn(figure, tmp_path)
    axes = figure.axes[0]
    renderer = FigureCanvasAgg(figure).get_renderer()
    cell = axes.get_window_extent(renderer).width / n
    widths = [text.get_window_extent(renderer).width for text in axes.texts]
    assert len(widths) == n * n and max(widths) < 0.95 * cell  # no label runs into its neighbour
    assert min(text.get_fontsize() for text in axes.texts) >= 4
    assert min(label.get_fontsize() for label in axes.get_xticklabels()) >= 5


def test_confusion_matrix_of_50_classes_is_capped_and_labelled(tmp_path):
    figure = plots.confusion_matrix_figure(np.eye(50, dtype=int) * 9, [f"class {i}" for i in range(50)])
    assert_drawn(figure, tmp_path)
    assert tuple(figure.get_size_inches()) == (22.0, 19.8)
    assert not figure.axes[0].texts
    assert min(label.get_fontsize() for label in figure.axes[0].get_yticklabels()) >= 5


# --- Grad-CAM ----------------------------------------------------------------------------------------------------


def small_cnn(in_chans: int = 3, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(width=8, dropout=0.1, pool=1, early_pool=False, whiten=True)
    return build_model(model_spec(config, num_classes=classes, in_chans=in_chans))


def timm_cnn(name: str, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(name, num_classes=classes, in_chans=3, options={"dropout": 0.0}))


def digit_images(size: int, n: int = 4, rgb: bool = False) -> tuple[list[np.ndarray], torch.Tensor]:
    """Real handwritten digits (scikit-learn's 8x8 scans) resized to `size` px: uint8 images and a batch in [0, 1]."""
    from sklearn.datasets import load_digits

    scans = np.rint(load_digits().images[:n] * (255 / 16)).astype(np.uint8)
    images = [np.asarray(Image.fromarray(scan).resize((size, size), Image.Resampling.BILINEAR)) for scan in scans]
    batch = torch.from_numpy(np.stack(images)).float().div(255)[:, None]
    return images, batch.repeat(1, 3, 1, 1) if rgb else batch


def stage_maps(model: nn.Module, size: int) -> dict[str, tuple[int, int]]:
    """The map size of every stage a timm model lists in `feature_info`, measured with hooks at `size` px."""
    sizes = {}

    def measure(name: str):
        def hook(_module, _inputs, output) -> None:
            sizes[name] = tuple(output.shape[-2:])

        return hook

    stages = [info["module"] for info in model.feature_info]
    handles = [model.get_submodule(name).register_forward_hook(measure(name)) for name in stages]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return sizes


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("small_cnn", "features"),
        ("resnet18", "layer4"),
        ("tf_efficientnet_lite0", "bn2"),  # after the head conv's BatchNorm and activation
        ("mobilenetv3_small_100", "blocks"),  # its conv_head runs after the global pooling: 1x1, not spatial
    ],
)
def test_target_layer_is_the_last_spatial_conv_stage(name, expected):
    model = small_cnn() if name == "small_cnn" else timm_cnn(name)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert target_layer(model) is model.get_submodule(expected)
    assert model.training  # mode restored, and the dummy batch left BatchNorm statistics alone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("early_pool", [False, True])  # model.early_pool: auto picks either by the machine
def test_default_small_cnn_at_28_px_weighs_a_7x7_map_not_its_3x3_last_one(early_pool):
    # the defaults: 3 blocks, width 32
    model = build_model(
        model_spec(ModelConfig(width=32, early_pool=early_pool, whiten=True), num_classes=10, in_chans=1)
    )
    _, batch = digit_images(28)
    layer = cam_layer(model, 28)
    assert (layer.name, layer.map_size, layer.input_size) == ("features.1", (7, 7), (28, 28))
    assert layer.module is model.features[1] and not layer.coarse
    assert layer.caption() == "Grad-CAM of features.1 (7x7 map, upsampled to 28 px)"
    assert cam_layer(model, (28, 28)) == layer  # a side or (height, width)
    with torch.no_grad():
        assert model.eval().forward_features(batch).shape[-2:] == (3, 3)  # the last map, which drew bands
    heatmaps = grad_cam(model, batch)  # the default layer is chosen at the inputs' own size
    np.testing.assert_allclose(heatmaps, grad_cam(model, batch, layer=layer.module), atol=1e-6)
    assert heatmaps.shape == (4, 28, 28)


@pytest.mark.parametrize(
    ("name", "size", "expected"), [("resnet18", 64, "layer2"), ("mobilenetv3_small_050", 32, "blocks.0")]
)
def test_timm_cnn_at_a_small_size_gets_its_deepest_stage_of_7_px_or_more(name, size, expected):
    model = timm_cnn(name)
    _, batch = digit_images(size, rgb=True)
    stages = stage_maps(model, size)
    layer = cam_layer(model, size)
    assert layer.name == expected and layer.map_size == stages[expected] and min(layer.map_size) >= 7
    order = list(stages)
    deeper = order[order.index(expected) + 1 :]
    assert deeper and all(min(stages[stage]) < 7 for stage in deeper)  # the last stage (1x1 or 2x2) was too coarse
    heatmaps = grad_cam(model, batch, layer=layer.module)
    assert heatmaps.shape == (4, size, size) and all(heatmap.std() > 0.05 for heatmap in heatmaps)


def test_when_no_map_reaches_7_px_the_largest_is_taken_and_called_coarse(tmp_path):
    resnet = cam_layer(timm_cnn("resnet18"), 12)  # every stage below 7 px: the stem's 6x6 is the largest
    assert (resnet.name, resnet.map_size, resnet.coarse) == ("act1", (6, 6), True)
    assert resnet.caption().split("\n") == [
        "Grad-CAM of act1 (6x6 map, upsampled to 12 px)",
        "coarse: a 6x6 map, each cell covers ~2 px",
    ]
    patchify = nn.Sequential(  # a ConvNeXt-like stride-4 stem, then a stride-2 stage: 5x5 and 2x2 at 20 px
        nn.Sequential(nn.Conv2d(1, 8, 4, stride=4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 2, stride=2), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    layer = cam_layer(patchify, 20)
    assert (layer.name, layer.map_size, layer.cell) == ("0", (5, 5), 4)
    note = layer.caption()
    assert note.endswith("\ncoarse: a 5x5 map, each cell covers ~4 px")
    images, batch = digit_images(20)
    figure = plots.gradcam_figure(images, list(grad_cam(patchify, batch, layer=layer.module)), [""] * 4, note=note)
    assert_drawn(figure, tmp_path)
    assert [text.get_text() for text in figure.texts] == [note]
    assert "coarse" not in cam_layer(patchify, 28).caption()  # 7x7 at 28 px
    assert not CamLayer("0", patchify[0], (6, 6), (6, 6)).coarse  # a 6x6 map of a 6 px input: as fine as it


def test_the_report_names_the_layer_chosen_at_the_bundles_input_size(tmp_path, digits_source):
    from imgclf import train
    from imgclf.evaluation import report, report_figures
    from imgclf.progress import NO_PROGRESS
    from imgclf.tracking.runs import find_run

    run = train(digits_source, {"train": {"epochs": 1}}, out=tmp_path, name="cam", report=False).run_dir  # 28 px
    record = report.read_run(find_run(run))
    figure = report_figures._gradcam(record, record.readable[:3], device="cpu", progress=NO_PROGRESS)
    assert [text.get_text() for text in figure.texts] == ["Grad-CAM of features.1 (7x7 map, upsampled to 28 px)"]
    assert len(figure.axes) == 2  # tiles and colour bar


def test_model_without_convolutions_is_refused_by_name():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(ImgclfError, match=r"Sequential has no Conv2d"):
        target_layer(model)
    with pytest.raises(ImgclfError, match=r"Sequential has no Conv2d"):
        grad_cam(model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_grad_cam_returns_one_map_per_image_at_the_input_size(name):
    model = small_cnn() if name == "small_cnn" else timm_cnn(name)
    torch.manual_seed(1)
    inputs = torch.randn(2, 3, 64, 64)
    heatmaps = grad_cam(model, inputs)
    assert heatmaps.shape == (2, 64, 64) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    for heatmap in heatmaps:
        assert heatmap.max() == pytest.approx(1.0) and heatmap.std() > 0.05  # not constant
    with torch.no_grad():
        predicted = model.eval()(inputs).argmax(1).tolist()
    np.testing.assert_allclose(grad_cam(model, inputs, predicted), heatmaps, atol=1e-6)  # default: predicted class


def bar_detector() -> nn.Module:
    """A fixed CNN: channel 0 responds to horizontal bars, channel 1 to vertical ones; class k = mean of channel k.

    Grad-CAM of class 0 must light up the horizontal bar and ignore the vertical one, whatever is predicted.
    """
    horizontal = torch.full((5, 5), -0.25)
    horizontal[2] = 1.0  # zero-sum: flat regions give 0
    conv = nn.Conv2d(1, 2, 5, padding=2, bias=False)
    head = nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([horizontal, horizontal.T])[:, None])
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return nn.Sequential(nn.Sequential(conv, nn.ReLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_grad_cam_lights_up_the_region_that_decides_the_class():
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 8:10, 2:14] = 1.0  # horizontal bar, left half
    image[0, 0, 17:29, 22:24] = 1.0  # vertical bar, right half
    model = bar_detector()
    inputs = image.repeat(2, 1, 1, 1)
    horizontal, vertical = grad_cam(model, inputs, targets=[0, 1])
    assert horizontal[:, :16].mean() > 5 * horizontal[:, 16:].mean()
    assert vertical[:, 16:].mean() > 5 * vertical[:, :16].mean()
    assert np.unravel_index(horizontal.argmax(), horizontal.shape)[0] in range(6, 12)
    assert np.unravel_index(vertical.argmax(), vertical.shape)[1] in range(20, 26)


def bars(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple[slice, slice]]]:
    """Noisy grey images with one bar each: class 0 horizontal, class 1 vertical, anywhere in the image."""
    images = rng.normal(0.0, 0.25, (n, 1, size, size)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    boxes = []
    for i, label in enumerate(labels):
        long, short = rng.integers(0, size - 12), rng.integers(0, size - 3)
        box = (
            (slice(short, short + 3), slice(long, long + 12))
            if label == 0
            else (slice(long, long + 12), slice(short, short + 3))
        )
        images[i, 0][box] += 2.0
        boxes.append(box)
    return torch.from_numpy(images), torch.from_numpy(labels), boxes


@pytest.mark.slow
def test_grad_cam_of_a_trained_small_cnn_points_at_the_object():
    rng = np.random.default_rng(0)
    size = 40
    x, y, _ = bars(384, size, rng)
    model = small_cnn(in_chans=1, classes=2, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32]).backward()
            optimizer.step()
    test_x, test_y, boxes = bars(48, size, rng)
    with torch.no_grad():
        assert (model.eval()(test_x).argmax(1) == test_y).float().mean() >= 0.9  # it learnt the task
    heatmaps = grad_cam(model, test_x, test_y.tolist())
    hits, ratios = 0, []
    for heatmap, (rows, cols) in zip(heatmaps, boxes):
        near = np.zeros_like(heatmap, dtype=bool)
        near[max(0, rows.start - 4) : rows.stop + 4, max(0, cols.start - 4) : cols.stop + 4] = True
        row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
        hits += bool(near[row, col])
        ratios.append(heatmap[near].mean() / max(heatmap[~near].mean(), 1e-6))
    assert hits >= 0.7 * len(boxes)  # the pointing game (a random point lands near the bar ~15 % of the time)
    assert np.median(ratios) > 2.0


def test_grad_cam_restores_modes_and_leaves_weights_untouched():
    model = timm_cnn("resnet18")
    model.train()
    model.bn1.eval()  # as fine-tuning keeps frozen BatchNorm layers in eval mode inside a training model
    model.layer1.requires_grad_(False)
    modes = {name: module.training for name, module in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grad_cam(model, torch.randn(2, 3, 32, 32))
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no BatchNorm update


def test_grad_cam_works_on_a_frozen_model_under_inference_mode():
    model = small_cnn()
    model.requires_grad_(False)
    inputs = torch.randn(2, 3, 32, 32)
    expected = grad_cam(model, inputs)
    with torch.inference_mode():
        heatmaps = grad_cam(model, torch.randn(2, 3, 32, 32).copy_(inputs))
    np.testing.assert_allclose(heatmaps, expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())
    assert expected.std() > 0.05


def test_grad_cam_on_a_channels_last_model_matches_contiguous():
    model = timm_cnn("resnet18")
    inputs = torch.randn(2, 3, 48, 48)
    expected = grad_cam(model, inputs)
    model = model.to(memory_format=torch.channels_last)
    heatmaps = grad_cam(model, inputs.to(memory_format=torch.channels_last))
    np.testing.assert_allclose(heatmaps, expected, atol=1e-4)


def test_grad_cam_hooks_are_removed_even_on_error():
    model = small_cnn()
    layer = target_layer(model)
    with pytest.raises(ConfigError, match=r"targets: expected 2 class indices in \[0, 3\)"):
        grad_cam(model, torch.randn(2, 3, 32, 32), targets=[0, 3], layer=layer)
    with pytest.raises(ConfigError, match="targets"):
        grad_cam(model, torch.randn(2, 3, 32, 32), targets=[0])
    with pytest.raises(ConfigError, match=r"inputs: expected a batch"):
        grad_cam(model, torch.randn(3, 32, 32))
    assert not layer._forward_hooks
    assert not any(module._forward_hooks for module in model.modules())


def test_overlay_colours_the_hot_region_on_grey_and_colour_images():
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[:, :4] = 1.0  # hot on the left
    grey = np.full((30, 40), 128, dtype=np.uint8)  # a different size from the heat map
    blended = overlay(grey, heatmap)
    assert blended.shape == (30, 40, 3) and blended.dtype == np.uint8
    left, right = blended[:, :15].reshape(-1, 3).mean(0), blended[:, 25:].reshape(-1, 3).mean(0)
    assert left[0] > left[2] and right[2] > right[0]  # turbo: red is hot, blue is cold
    colour = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(colour, heatmap, alpha=0.0), colour)
    assert overlay(colour[:, :, :1], heatmap).shape == (30, 40, 3)
    with pytest.raises(ConfigError, match="image"):
        overlay(np.zeros((4, 4, 2), dtype=np.uint8), heatmap)
