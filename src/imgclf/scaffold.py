"""`imgclf init DIR`: the lab's project layout, ready to work in.

DIR/data/{train,val,test}/<class>/   the images: split from --from by `workflow.split` (seeded, stratified,
                                     identical images kept in one split; hard links by default)
DIR/notebooks/Lab10_image_classification.ipynb
                                     the lab notebook (a package resource), reading DIR/data, writing to
                                     DIR/models
DIR/models/                          run folders: `imgclf train data --out models` (run from DIR) writes each run
                                     here, with its model/ bundle and exported files; models/latest is the newest
DIR/README.md                        what is where and the next commands
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from imgclf.data.split import LinkMode
from imgclf.errors import DataError, ImgclfError
from imgclf.files import write_text_atomic
from imgclf.progress import NO_PROGRESS, Progress

__all__ = ["Project", "init_project", "project_notebook"]

NOTEBOOK = "Lab10_image_classification.ipynb"


@dataclass(frozen=True)
class Project:
    """What `init_project` made."""

    root: Path
    counts: dict[str, int]  # images per split ({} without a source folder)
    notebook: Path


def init_project(
    target: Path | str,
    *,
    source: Path | str | None = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    mode: LinkMode = "hardlink",
    groups: str | None = None,
    groups_csv: Path | str | None = None,
    progress: Progress = NO_PROGRESS,
) -> Project:
    """Create the lab's project layout in `target` (new or empty), splitting `source` into its data/ if given.

    Args:
        target: the project folder; must not exist or be empty.
        source: a flat folder of class folders (or an already split one) to split into target/data.
        ratios: train/val/test fractions of the split.
        seed: the split's seed.
        mode: hardlink (default), copy or symlink the images.
        groups: a regular expression naming each image's group (one patient, one video): a group never spans two
            splits (as `data.groups`); identical files and near-duplicates are kept together in any case.
        groups_csv: a CSV of path, group (as `data.groups_csv`).
        progress: progress reporter.

    Raises:
        DataError: `target` exists and is not empty (nothing is written), or `source` cannot be used.

    Example:
        >>> init_project("lab", source="photos/").counts
        {'train': 72, 'val': 9, 'test': 9}
    """
    from imgclf import workflow

    root = Path(target)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not empty; imgclf init makes a new project in a new or empty folder")
    counts: dict[str, int] = {}
    if source is not None:
        counts = workflow.split(
            source,
            root / "data",
            ratios=ratios,
            seed=seed,
            mode=mode,
            groups=groups,
            groups_csv=groups_csv,
            progress=progress,
        ).counts
    else:
        for split in ("train", "val", "test"):
            (root / "data" / split).mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    notebook = root / "notebooks" / NOTEBOOK
    write_text_atomic(notebook, project_notebook(root))
    write_text_atomic(root / "README.md", _readme(root, counts, source))
    return Project(root, counts, notebook)


def project_notebook(root: Path) -> str:
    """The lab notebook with its parameters cell pointed at `root`/data and `root`/models."""
    text = resources.files("imgclf.lab").joinpath(NOTEBOOK).read_text(encoding="utf-8")
    notebook = json.loads(text)
    cell = next((c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ImgclfError(f"the packaged {NOTEBOOK} has no cell tagged 'parameters' (a broken installation)")
    source = "".join(cell["source"])
    for name, value in (("DATA", root.resolve() / "data"), ("RUNS", root.resolve() / "models")):
        source, replaced = re.subn(rf"(?m)^{name} = None\b.*$", f"{name} = {str(value)!r}", source)
        if not replaced:
            raise ImgclfError(f"the packaged {NOTEBOOK}'s parameters cell has no `{name} = None` line")
    cell["source"] = source.splitlines(keepends=True)
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


_MODELS_ROW = (
    "| `models/` | run folders: every `imgclf train data --out models` (from this folder) writes one here, with its "
    "`model/` bundle and exported files; `models/latest` is the newest |"
)


def _readme(root: Path, counts: dict[str, int], source: Path | str | None) -> str:
    made = (
        f"split from `{source}` ({', '.join(f'{name} {count}' for name, count in counts.items())} images)"
        if source is not None
        else "empty: put each class's images in data/train/<class>/ (and val/, test/, or let imgclf split train/)"
    )
    return f"""# {root.resolve().name}

An image classification lab project, made by `imgclf init`.

| folder | what it holds |
|---|---|
| `data/train/<class>/`, `data/val/<class>/`, `data/test/<class>/` | the images, {made} |
| `notebooks/{NOTEBOOK}` | the lab: organise, augment, train from scratch and fine-tune, diagnose, evaluate, export |
{_MODELS_ROW}

Next, from this folder:

```bash
imgclf inspect data                              # counts, sizes, problems, leaks: look before you train
imgclf train data --fast-dev-run --out models    # the whole pipeline on a sliver of the data, in seconds
imgclf train data --subset 20 --out models       # start small: 20 images per class and split
imgclf train data --out models                   # train; open models/<run>/report.html
imgclf export models/latest                      # a checked ONNX model in models/<run>/model/
jupyter lab notebooks/{NOTEBOOK}
```
"""
