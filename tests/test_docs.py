"""The documentation agrees with the code: docs/cli.md and docs/config.md are what scripts/generate_docs.py makes
of the typer app and the config models today, on any machine; every `imgclf ...` command in docs/guide.md parses."""

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


def _imgclf_commands(line: str) -> list[tuple[str, ...]]:
    """The `imgclf ...` command lines in one line of shell (`a && imgclf x > f | less` -> [("imgclf", "x")]);
    comments, redirections, `VAR=value` prefixes and loop keywords are left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in [*lexer, ";"]:
        if token and set(token) <= set("|&;"):
            while current and (current[0] in SHELL_WORDS or re.fullmatch(r"\w+=.*", current[0])):
                current.pop(0)
            redirect = next((i for i, word in enumerate(current) if re.fullmatch(r"\d?(>>?|<).*", word)), None)
            current = current[:redirect]
            if current and current[0] == "imgclf":
                commands.append(tuple(current))
            current = []
        else:
            current.append(token)
    return commands


def guide_commands(document: Path = GUIDE) -> list[tuple[str, ...]]:
    """Every `imgclf ...` command of docs/guide.md (or another document): in shell code blocks, and in inline code
    outside them."""
    if not document.is_file():
        return []
    commands, fence, pending = [], None, ""
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
                commands += _imgclf_commands(pending)
                pending = ""
            continue
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", line):
            if span.startswith("imgclf "):
                commands += _imgclf_commands(span)
    return list(dict.fromkeys(commands))  # each command once, in the guide's order


def test_the_guide_has_commands_to_check():
    commands = guide_commands()
    assert len(commands) >= 30, f"found only {len(commands)} imgclf commands in {GUIDE}"
    named = {command[1] for command in commands if len(command) > 1}
    assert {"init", "inspect", "split", "train", "report", "evaluate", "export", "predict", "serve"} <= named


@pytest.mark.parametrize("command", guide_commands(), ids=" ".join)
def test_guide_command_parses(command):
    result = run_cli(*command[1:], "--help")
    assert result.exit_code == 0, (
        f"docs/guide.md: `{shlex.join(command)}` is not a real command (with --help appended: exit "
        f"{result.exit_code}):\n{result.output}"
    )


@pytest.mark.parametrize("command", guide_commands(REPOSITORY / "README.md"), ids=" ".join)
def test_readme_command_parses(command):
    result = run_cli(*command[1:], "--help")
    assert result.exit_code == 0, (
        f"README.md: `{shlex.join(command)}` is not a real command (with --help appended: exit "
        f"{result.exit_code}):\n{result.output}"
    )


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
    assert _imgclf_commands("for x in a b; do imgclf predict runs/<name> 'in/**/*.jpg' --out - | less; done") == [
        ("imgclf", "predict", "runs/<name>", "in/**/*.jpg", "--out", "-")
    ]


def test_the_guide_states_the_defaults_and_flags_the_code_has():
    """The guide's hyperparameter table (`| key | default | flag | ... |`) agrees with config.py and cli.py."""
    gen = generator()
    documented = gen.config_table()
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \| (`[^`]*`|—) \|", GUIDE.read_text(encoding="utf-8"), re.M)
    assert len(rows) >= 8, "the guide's table of hyperparameters is gone"
    for key, default, flag in rows:
        assert key in documented, f"docs/guide.md names a config key that does not exist: {key}"
        assert (default, flag.strip("`")) == documented[key], f"docs/guide.md: {key} is {documented[key]} in the code"
