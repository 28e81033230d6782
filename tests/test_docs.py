"""The documentation agrees with the code: docs/cli.md and docs/config.md are what scripts/generate_docs.py makes
of the typer app and the config models today, on any machine; every `imgclf ...` command in the README, the guide and
the other hand-written pages parses, options, values and arguments alike."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import REPOSITORY, run_cli

DOCS = REPOSITORY / "docs"
GUIDE = DOCS / "guide.md"
STALE = "run `make docs` (python scripts/generate_docs.py) and commit docs/cli.md and docs/config.md"


@functools.cache
def generator():
    """scripts/generate_docs.py as a module (scripts/ is not a package), without writing a __pycache__ there."""
    spec = importlib.util.spec_from_file_location("generate_docs", REPOSITORY / "scripts" / "generate_docs.py")
    module = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module


# --- generated reference docs -------------------------------------------------------------------------------------


def test_committed_reference_docs_are_what_the_code_generates(tmp_path):
    gen = generator()
    written = gen.write(tmp_path)
    assert sorted(path.name for path in written) == ["cli.md", "config.md"]
    problems = gen.stale(DOCS, rendered={path.name: path.read_text(encoding="utf-8") for path in written})
    assert not problems, f"the reference docs are out of date: {STALE}\n\n" + "\n\n".join(problems)


def test_generation_is_the_same_on_every_run_home_folder_terminal_width_and_working_directory(tmp_path, monkeypatch):
    gen = generator()
    first = gen.render()
    assert gen.render() == first

    home = tmp_path / "home" / "someone else"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.chdir(tmp_path)
    assert gen.render() == first

    # a fresh interpreter: nothing imported earlier with the old HOME or width can hide a difference
    env = {**os.environ, "HOME": str(home), "COLUMNS": "251", "LINES": "7", "TERM": "dumb"}
    out = tmp_path / "fresh"
    command = [sys.executable, str(REPOSITORY / "scripts" / "generate_docs.py"), "--out", str(out)]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    for name, text in first.items():
        assert (out / name).read_text(encoding="utf-8") == text, f"{name} differs in a fresh process"


def test_check_exits_1_naming_make_docs_when_a_file_is_stale(tmp_path, capsys):
    gen = generator()
    gen.write(tmp_path)
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / "config.md"
    stale.write_text(stale.read_text(encoding="utf-8").replace("`train.epochs`", "`train.epoch`"), encoding="utf-8")
    (tmp_path / "cli.md").unlink()
    capsys.readouterr()
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert "docs/config.md is stale" in message and "docs/cli.md is missing" in message
    assert "make docs" in message and "+| `train.epochs`" in message


def _sections(text: str, level: str = "## ") -> dict[str, str]:
    """Heading -> the text below it, up to the next heading of the same level."""
    parts = re.split(rf"^{level}(.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_command_and_each_of_its_options_has_a_section_in_cli_md():
    gen = generator()
    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    group, context = gen.root_context()
    paths = []
    for command, command_context in gen.iter_commands(group, context):
        path = command_context.command_path
        paths.append(path)
        assert f"`{path}`" in sections, f"docs/cli.md has no section for {path}: {STALE}"
        body = sections[f"`{path}`"]
        for param in command.params:
            names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else [param.name]
            for name in names:
                assert f"`{name}`" in body, f"docs/cli.md does not document {path} {name}: {STALE}"
    assert {"imgclf train", "imgclf cache", "imgclf cache list", "imgclf cache clear"} <= set(paths)


def test_every_config_field_is_in_config_md():
    from imgclf.config import all_keys

    gen = generator()
    assert sorted(gen.config_keys()) == sorted(all_keys())
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    missing = [key for key in all_keys() if f"| `{key}` |" not in text]
    assert not missing, f"docs/config.md lacks {', '.join(missing)}: {STALE}"
    for section in ("data", "augment", "model", "train", "train.early_stopping"):
        assert f"`{section}`" in _sections(text, "#+ ")


# --- every command in the guide is real ---------------------------------------------------------------------------

SHELL_BLOCKS = ("bash", "sh", "shell", "console")  # a block without a language is not shell (a folder tree)


SHELL_WORDS = ("do", "then", "else", "time", "!")
LAUNCHERS = ("torchrun", "srun", "python", "python3")


def _imgclf_commands(line: str) -> list[tuple[str, ...]]:
    """The `imgclf ...` command lines in one line of shell (`a && imgclf x > f | less` -> [("imgclf", "x")]), also
    as launched by `torchrun ... -m imgclf x`; comments, redirections, `VAR=value` prefixes and loop keywords are
    left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in [*lexer, ";"]:
        if token and set(token) <= set("|&;"):
            while current and (current[0] in SHELL_WORDS or re.fullmatch(r"\w+=.*", current[0])):
                current.pop(0)
            redirect = next((i for i, word in enumerate(current) if re.fullmatch(r"\d?(>>?|<).*", word)), None)
            current = current[:redirect]
            launched = next((i + 1 for i in range(len(current) - 1) if current[i : i + 2] == ["-m", "imgclf"]), None)
            if launched is not None and current[0] in LAUNCHERS:  # torchrun ... -m imgclf train ...
                current = current[launched:]
            if current and current[0] == "imgclf":
                commands.append(tuple(current))
            current = []
        else:
            current.append(token)
    return commands


def guide_commands(document: Path = GUIDE) -> list[tuple[str, ...]]:
    """Every `imgclf ...` command of docs/guide.md (or another document): in shell code blocks, and in inline code
    outside them."""
    return list(document_commands(document))


def document_commands(document: Path) -> dict[tuple[str, ...], bool]:
    """Each `imgclf ...` command of a document, once, in its order -> whether it is a whole command line (in a shell
    block) rather than a mention in prose (`imgclf export --int8`, whose run folder the sentence names)."""
    if not document.is_file():
        return {}
    commands: dict[tuple[str, ...], bool] = {}
    fence, pending = None, ""
    for line in document.read_text(encoding="utf-8").splitlines():
        opening = re.match(r"^\s*(```+|~~~+)\s*(\S*)", line)
        if fence is None and opening:
            fence = (opening.group(1), opening.group(2).lower())
            continue
        if fence is not None:
            if line.strip().startswith(fence[0]):
                fence = None
            elif fence[1] in SHELL_BLOCKS:
                pending += line.removeprefix("$ ")
                if pending.endswith("\\"):
                    pending = pending[:-1] + " "
                    continue
                for command in _imgclf_commands(pending):
                    commands[command] = True
                pending = ""
            continue
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", line):
            if span.startswith("imgclf "):
                for command in _imgclf_commands(span):
                    commands.setdefault(command, False)
    return commands


def test_the_guide_has_commands_to_check():
    commands = guide_commands()
    assert len(commands) >= 30, f"found only {len(commands)} imgclf commands in {GUIDE}"
    named = {command[1] for command in commands if len(command) > 1}
    assert {"init", "inspect", "split", "train", "report", "evaluate", "export", "predict", "serve"} <= named


def parse_command(words: tuple[str, ...], *, mention: bool = False) -> None:
    """Parse `imgclf WORDS...` as the CLI would, down to the last subcommand, without running it: every option must
    exist, every value must convert to its type, no extra argument may be left. Raises click's UsageError (or
    BadParameter, NoSuchOption) when the line is not a real command. Eager options (`--version`) exit with 0.
    A `mention` (inline code in prose) may leave out required arguments: each is given a placeholder, and the rest
    is checked all the same.

    Appending `--help` checks nothing: click answers it before it converts or counts the other arguments
    (`imgclf train data --epochs lots --help` exits 0)."""
    import typer.main

    from imgclf.cli import app

    command = typer.main.get_command(app)
    name, args, parent = "imgclf", list(words[1:]), None
    try:
        while True:
            try:
                ctx = command.make_context(name, list(args), parent=parent)  # click consumes the list it parses
            except UsageError as error:
                param = getattr(error, "param", None)
                if not (mention and type(error).__name__ == "MissingParameter" and param.param_type_name == "argument"):
                    raise
                args = [*args, "placeholder"]
                continue
            if not hasattr(command, "resolve_command"):  # a command, not a group of them
                return
            protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
            rest = [*protected, *ctx.args]
            if not rest:
                return
            name, command, args = command.resolve_command(ctx, rest)
            parent = ctx
    except typer.Exit as stop:
        if stop.exit_code != 0:
            raise


# click's UsageError (BadParameter, NoSuchOption, MissingParameter are ones), typer's own copy of click since 0.25
UsageError = typer.BadParameter.__bases__[0]
PLACEHOLDER = re.compile(r"[^-*$=:\s][^*$=:\s]*")  # a word that may be a path: not an option, glob, variable or URL


def make_placeholders(words: tuple[str, ...], root: Path) -> None:
    """Every word of a command that could be a path, made under `root` (a folder for `x/` or a name without a
    suffix, an empty file for `x.yaml`), so that a path argument that must exist does."""
    for word in words[1:]:
        if not PLACEHOLDER.fullmatch(word) or word.startswith("/") or ".." in Path(word).parts:
            continue
        path = root / word
        if word.endswith("/") or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


DOCUMENTS = (
    "README.md",
    "docs/guide.md",
    "docs/deploy.md",
    "docs/experiments.md",
    "docs/scale-out.md",
    "docs/benchmarks.md",
    "CONTRIBUTING.md",
)
DOCUMENTED_COMMANDS = [
    (name, command, whole) for name in DOCUMENTS for command, whole in document_commands(REPOSITORY / name).items()
]


def test_every_document_has_commands_to_check():
    for name in DOCUMENTS:
        assert (REPOSITORY / name).is_file(), f"{name} is gone: the README links to it"
    assert len(DOCUMENTED_COMMANDS) >= 80, f"found only {len(DOCUMENTED_COMMANDS)} imgclf commands in {DOCUMENTS}"


@pytest.mark.parametrize(
    ("document", "command", "whole"),
    DOCUMENTED_COMMANDS,
    ids=[f"{name}: {shlex.join(command)}" for name, command, _ in DOCUMENTED_COMMANDS],
)
def test_documented_command_parses(document, command, whole, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_placeholders(command, tmp_path)
    try:
        parse_command(command, mention=not whole)
    except UsageError as error:
        pytest.fail(f"{document}: `{shlex.join(command)}` is not a real command: {error.format_message()}")


@pytest.mark.parametrize(
    ("line", "help_exit"),
    [
        ("imgclf train data --epochs lots", 0),  # a bad value: `--help` passed it
        ("imgclf evaluate runs/x extra words", 0),  # extra arguments: `--help` passed them
        ("imgclf train [--batch-size 64]", 0),  # a placeholder written as an argument
        ("imgclf train data --img-size big", 0),
        ("imgclf train data --epoch 3", 2),  # an unknown option
        ("imgclf runs compare --sort nope runs/a", 2),  # an unknown option of a group's subcommand
        ("imgclf predict runs/x in/ --top-k", 2),  # an option without its value
        ("imgclf trian data", 2),  # an unknown command
    ],
)
def test_a_broken_command_line_does_not_parse(line, help_exit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = tuple(shlex.split(line))
    make_placeholders(words, tmp_path)
    assert run_cli(*words[1:], "--help").exit_code == help_exit  # why appending `--help` checked too little
    with pytest.raises(UsageError):
        parse_command(words)


def test_real_command_lines_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ("imgclf --version", "imgclf", "imgclf runs compare runs/a runs/b", "imgclf cache clear --older-than 30")
    for line in lines:
        words = tuple(shlex.split(line))
        make_placeholders(words, tmp_path)
        parse_command(words)


def test_the_readme_links_the_notebook_the_guide_the_scaffold_and_the_references():
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(([^)#\s]+)\)", readme))
    wanted = {"notebooks/Lab10_image_classification.ipynb", "docs/guide.md", "docs/cli.md", "docs/config.md"}
    assert wanted <= links
    missing = [link for link in links if "://" not in link and not (REPOSITORY / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    assert ("imgclf", "init", "lab", "--from", "photos/") in guide_commands(REPOSITORY / "README.md")


def test_the_shell_parsing_of_guide_lines():
    line = "cd lab && X=1 imgclf train data --out models --lr $lr  # a comment"
    assert _imgclf_commands(line) == [("imgclf", "train", "data", "--out", "models", "--lr", "$lr")]
    assert _imgclf_commands("imgclf config > recipe.yaml") == [("imgclf", "config")]
    assert _imgclf_commands("torchrun --nproc_per_node 4 -m imgclf predict runs/x in/") == [
        ("imgclf", "predict", "runs/x", "in/")
    ]
    assert _imgclf_commands("for x in a b; do imgclf predict runs/<name> 'in/**/*.jpg' --out - | less; done") == [
        ("imgclf", "predict", "runs/<name>", "in/**/*.jpg", "--out", "-")
    ]


def test_the_guide_states_the_defaults_and_flags_the_code_has():
    """The guide's hyperparameter table (`| key | default | flag | ... |`) agrees with the config and the flag table."""
    gen = generator()
    documented = gen.config_table()
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \| (`[^`]*`|—) \|", GUIDE.read_text(encoding="utf-8"), re.M)
    assert len(rows) >= 8, "the guide's table of hyperparameters is gone"
    for key, default, flag in rows:
        assert key in documented, f"docs/guide.md names a config key that does not exist: {key}"
        assert (default, flag.strip("`")) == documented[key], f"docs/guide.md: {key} is {documented[key]} in the code"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_reach_a_file_and_a_heading_that_exist():
    """The README is the front door: each moved section must stay reachable, anchors included."""
    for name in DOCUMENTS:
        page = REPOSITORY / name
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            linked = (page.parent / target).resolve() if target else page
            assert linked.exists(), f"{name} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{name}: {target} has no heading #{anchor}"
