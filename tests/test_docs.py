"""What the documentation names exists: every command, --method and flag of README's Usage lines, every file path
and every `python -m` module that README.md and docs/*.md mention (the commands quoted in docs/results.md among them),
and the same for the usage lines and comments of the scripts themselves."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ewq_gguf.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# the scripts' own text (usage lines in docstrings, comments of the shell scripts), CI's entry point and the fixtures
SCRIPT_FILES = sorted(path for folder in ("scripts", "testkit") for path in (REPO / folder).rglob("*")
                      if path.suffix in (".py", ".sh")) + [REPO / ".ci" / "run"]
# a path inside the repository: a top-level folder of it, then anything up to a space, quote or bracket
PATH_MENTION = re.compile(r"(?<![\w./$-])(?:ewq_gguf|scripts|testkit|tests|vendor|docs)/[\w./*-]*[\w*]")
# a module of the repository run as `python -m NAME` (python3, .venv/bin/python too)
MODULE_MENTION = re.compile(r"\bpython3? -m ((?:ewq_gguf|scripts|testkit)(?:\.\w+)*)")
# a placeholder in a path or module name (scripts/gpu/NAME.sh, scripts.GROUP.NAME): any name there
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]*[A-Z]\b")


def usage_lines() -> list[str]:
    """The `ewq-gguf ...` lines of README's Usage code block, comments cut off."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Usage", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("ewq-gguf ")]


def command_of(words: list[str]) -> tuple[click.Command, str]:
    """The click command a command line names (subcommands of groups followed), and its name."""
    command, names = main, []
    for word in words:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command = command.commands[word]
        names.append(word)
    return command, " ".join(names)


def test_usage_names_only_existing_commands_methods_and_flags():
    lines = usage_lines()
    assert len(lines) > 10 and any("--method" in line for line in lines)
    for line in lines:
        words = line.split()[1:]
        command, name = command_of(words)
        assert name, f"README names no ewq-gguf command: {line}"
        with click.Context(command) as context:
            params = command.get_params(context)      # the planner options are made on first use
        flags = {flag: param for param in params for flag in param.opts}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            assert flag in flags, f"`ewq-gguf {name}` has no {flag} (README: {line})"
        for method in re.findall(r"--method (\S+)", line):
            assert method in flags["--method"].type.choices, f"no method {method} (README: {line})"


def path_exists(mention: str) -> bool:
    if PLACEHOLDER.search(mention.rsplit(".", 1)[0]):
        mention = PLACEHOLDER.sub("*", mention)
    path = REPO / mention
    return any(REPO.glob(mention)) if "*" in mention else path.exists() or path.with_suffix(".py").exists()


def module_runs(name: str) -> bool:
    """`python -m name` finds a module file, or a package with a __main__.py, under the repository root; with
    placeholders (scripts.GROUP.NAME), some module of that shape."""
    pattern = "/".join(PLACEHOLDER.sub("*", part) for part in name.split("."))
    return any(REPO.glob(pattern + ".py")) or any(REPO.glob(pattern + "/__main__.py"))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_mentioned_paths_exist(document):
    for mention in sorted(set(PATH_MENTION.findall(document.read_text()))):
        assert path_exists(mention), f"{document.name} mentions {mention}, which is not in the repository"


@pytest.mark.parametrize("document", DOCUMENTS + SCRIPT_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_mentioned_modules_run(document):
    """Every `python -m MODULE` a document or script quotes names a module of the repository (a script that moved
    leaves its old commands failing here, the ones quoted in docs/results.md included)."""
    for name in sorted(set(MODULE_MENTION.findall(document.read_text()))):
        assert module_runs(name), f"{document.relative_to(REPO)} runs python -m {name}, which is not in the repository"


def test_scripts_mention_existing_scripts():
    """The scripts' usage lines and comments name scripts and fixtures that exist (other paths they mention may lie
    outside the repository: vendor/llama.cpp inside llama-cpp-python's sdist)."""
    for script in SCRIPT_FILES:
        for mention in sorted(set(PATH_MENTION.findall(script.read_text()))):
            if mention.startswith(("scripts/", "testkit/")):
                assert path_exists(mention), f"{script.relative_to(REPO)} mentions {mention}, not in the repository"
