"""docs/results.md is assembled from sections that benchmark scripts write; each script owns its own sections."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from ewq_gguf.devenv import REPOSITORY, dev_models_dir


def cpu_name() -> str:
    """The processor's model name, for the machine line under a table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def shown(path: str | Path) -> str:
    """A path as results.md quotes it, never a folder of one machine: relative to the repository where inside it
    (models/smollm2, out/...), `$EWQ_DEV_MODELS/NAME` for a development model kept elsewhere, unchanged under /usr
    (files of the system's packages, the same on every such machine: Debian's reference manual), else its name alone
    (a temporary folder, a user's own folder). A relative path stays as it was given."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    for base, prefix in ((REPOSITORY, ""), (dev_models_dir().resolve(), "$EWQ_DEV_MODELS/")):
        for candidate in (Path(os.path.abspath(path)), path.resolve()):     # as given, then with links resolved
            if candidate != base and candidate.is_relative_to(base):
                return prefix + candidate.relative_to(base).as_posix()
    if path.parts[1:2] == ("usr",):
        return str(path)
    return path.name


def shown_arguments(arguments: list[str | Path]) -> str:
    """A command line for results.md: every absolute path among the arguments (alone or as `--option=PATH`) shown as
    shown() does, so that a command quoted there names no folder of the machine it ran on."""
    def one(argument: str | Path) -> str:
        argument = str(argument)
        option, equals, value = argument.partition("=")
        if equals and option.startswith("-") and value.startswith("/"):
            return f"{option}={shown(value)}"
        return shown(argument) if argument.startswith("/") else argument
    return " ".join(one(argument) for argument in arguments)


def update_section(path: Path, title: str, body: str, command: str) -> None:
    """Replace (or append) the `## title` section of a markdown file with body and the command that made it."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Measured results\n\nEvery table here is written by a script; " \
                                                  "the command under each heading reproduces it.\n"
    section = f"## {title}\n\n`{command}`\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    # A table made on another machine (the device machine's scripts print theirs) into docs/results.md:
    #   python -m scripts.common.results_file TITLE BODY_FILE "COMMAND THAT MADE IT"
    import sys

    title, body_file, command = sys.argv[1:4]
    update_section(REPOSITORY / "docs" / "results.md", title, Path(body_file).read_text(), command)
