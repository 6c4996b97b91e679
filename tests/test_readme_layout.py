"""README's Layout section lists exactly the modules and packages of ewq_gguf/, and the top-level folders it names."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def layout_entries() -> tuple[set[str], set[str]]:
    """(entries listed under ewq_gguf/, top-level folders listed) from the README's Layout block."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^## Layout\n+```\n(.*?)^```", readme, re.S | re.M).group(1)
    package = {match.group(1) for match in re.finditer(r"^  (\S+)\s", block, re.M)}
    top = {match.group(1) for match in re.finditer(r"^(\S+/)", block, re.M)}
    return package, top


def test_layout_lists_every_module_and_package_of_ewq_gguf():
    listed, _ = layout_entries()
    present = {path.name + "/" if path.is_dir() else path.name for path in (REPO / "ewq_gguf").iterdir()
               if path.name != "__pycache__" and (path.is_dir() or path.suffix == ".py")}
    assert listed == present


def test_layout_names_existing_folders():
    _, top = layout_entries()
    assert all((REPO / name).is_dir() for name in top), top
