"""Every `>>>` example in imgclf's docstrings runs, for real, and prints what the docstring shows.

One test per module. Each docstring's examples run in a fresh copy of a small world holding what they name: the
flat image folders `data/` and `photos/` (3 digit classes of 30 scans), the pictures `cat.jpg`, `photo.jpg` and
`a.png`, a decoded-image cache `cache/` of data/, and the run `runs/small_cnn-20261128-120000` (the shared
`trained_run`, copied, with its checked ONNX export). Examples that train use a few epochs of the tiny data. Only
an example that cannot run in a test (it serves until stopped, or needs a GPU or a Jupyter kernel) carries
`# doctest: +SKIP`, with its reason beside it.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import logging
import pkgutil
import shutil
from pathlib import Path

import pytest
from PIL import Image

import imgclf

RUN = "runs/small_cnn-20261128-120000"  # the run folder the examples name
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
NOT_IMPORTED = {"imgclf.__main__": "importing it runs the CLI"}  # read, not imported: it must hold no examples
MIN_EXAMPLES = 150  # run, not skipped, over all modules: 179 of 183 when this was written


def _no_silent_skip(name: str) -> None:
    raise ImportError(f"pkgutil.walk_packages could not import {name}")


MODULES = ["imgclf", *sorted(m.name for m in pkgutil.walk_packages(imgclf.__path__, "imgclf.", _no_silent_skip))]


def _example_lines(name: str) -> int:
    """The `>>>` lines in a module's source file."""
    source = Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")
    return sum(line.lstrip().startswith(">>>") for line in source.splitlines())


def _doctests(name: str) -> list[doctest.DocTest]:
    return [test for test in doctest.DocTestFinder().find(importlib.import_module(name), name) if test.examples]


@pytest.fixture(scope="session")
def world(tmp_path_factory, digits_source, trained_run) -> Path:
    """The folder the examples see as their working directory (each docstring gets its own copy)."""
    from imgclf.data.cache import decoded_images
    from imgclf.data.preprocessing import Preprocessing
    from imgclf.data.scan import scan_folder

    folder = tmp_path_factory.mktemp("doctest-world")
    for name in ("data", "photos"):
        shutil.copytree(digits_source, folder / name)
    shutil.copytree(trained_run, folder / RUN, symlinks=True)
    imgclf.export(folder / RUN)  # model/model.onnx, which the predict and serve examples load
    import skimage.data

    Image.fromarray(skimage.data.chelsea()).resize((150, 100)).save(folder / "cat.jpg", quality=90)
    Image.fromarray(skimage.data.astronaut()).resize((128, 128)).save(folder / "photo.jpg", quality=90)
    shutil.copyfile(folder / "data" / "digit0" / "0000.png", folder / "a.png")
    records = scan_folder(folder / "data").records
    pre = Preprocessing.default_for(28, "gray")
    paths, hashes = [r.path for r in records], [r.sha256 for r in records]
    decoded_images(paths, hashes, pre, mode="disk", cache_dir=folder / "cache", max_pixels=50_000_000)
    return folder


@pytest.fixture
def fresh_world(world, tmp_path, monkeypatch):
    """Call it to get a new copy of the world as the working directory. Torch's and logging's process-wide state
    is put back afterwards (an example that trains sets threads, deterministic mode, the random generators)."""
    from imgclf.device import preserved_torch_state

    copies = iter(range(1_000_000))

    def fresh() -> Path:
        here = Path(shutil.copytree(world, tmp_path / f"world{next(copies)}", symlinks=True))
        monkeypatch.chdir(here)
        return here

    loggers = [logging.getLogger(), logging.getLogger("imgclf")]
    saved = [(logger, logger.level, list(logger.handlers), logger.propagate) for logger in loggers]
    with preserved_torch_state():
        yield fresh
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


@pytest.mark.parametrize("name", MODULES)
def test_examples_in_docstrings_print_what_they_show(name, request):
    if name in NOT_IMPORTED:
        assert _example_lines(name) == 0, f"{name} has examples, but it is not imported: {NOT_IMPORTED[name]}"
        return
    tests = _doctests(name)
    found = sum(len(test.examples) for test in tests)
    assert found == _example_lines(name), (
        f"{name} has {_example_lines(name)} `>>>` lines but doctest finds {found} examples in its docstrings "
        "(one in a nested function, or in a string that is not a docstring?)"
    )
    if not tests:
        return
    fresh = request.getfixturevalue("fresh_world")
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    for test in tests:
        fresh()  # each docstring starts from the same world: examples never depend on another's files
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed:\n" + "".join(report)


def test_the_examples_are_many_and_few_are_skipped():
    examples = [
        example for name in MODULES if name not in NOT_IMPORTED for test in _doctests(name) for example in test.examples
    ]
    skipped = [example.source.strip() for example in examples if example.options.get(doctest.SKIP)]
    assert len(examples) - len(skipped) >= MIN_EXAMPLES, f"only {len(examples) - len(skipped)} examples run"
    assert len(skipped) <= 5, f"{len(skipped)} examples skipped: {skipped}"
