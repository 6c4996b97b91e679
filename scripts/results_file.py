"""docs/results.md is assembled from sections that benchmark scripts write; each script owns its own sections."""
from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name, for the machine line under a table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
