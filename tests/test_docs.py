"""What the documentation names exists: every command, --method and flag of README's Usage lines, every file path
that README.md and docs/*.md mention."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ewq_gguf.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a path inside the repository: a top-level folder of it, then anything up to a space, quote or bracket
PATH_MENTION = re.compile(r"\b(?:ewq_gguf|scripts|tests|vendor|docs)/[\w./*-]*[\w*]")


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


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_mentioned_paths_exist(document):
    for mention in sorted(set(PATH_MENTION.findall(document.read_text()))):
        path = REPO / mention
        found = any(REPO.glob(mention)) if "*" in mention else path.exists() or path.with_suffix(".py").exists()
        assert found, f"{document.name} mentions {mention}, which is not in the repository"
