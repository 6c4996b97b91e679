"""README's Layout section lists exactly the modules and packages of ewq_gguf/ and the groups of scripts/, and the
top-level folders it names exist."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def layout_entries() -> dict[str, set[str]]:
    """Each top-level folder the README's Layout block lists (`scripts/`), with the entries listed under it."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^## Layout\n+```\n(.*?)^```", readme, re.S | re.M).group(1)
    entries: dict[str, set[str]] = {}
    for line in block.splitlines():
        if top := re.match(r"(\S+/)", line):
            folder = entries.setdefault(top.group(1), set())
        elif entry := re.match(r"  (\S+)\s", line):
            folder.add(entry.group(1))
    return entries


def present(folder: Path, kinds: tuple[str, ...]) -> set[str]:
    """The sub-folders (as `name/`) and the files of the given suffixes in a folder, caches left out."""
    return {path.name + "/" if path.is_dir() else path.name for path in folder.iterdir()
            if path.name != "__pycache__" and (path.is_dir() or path.suffix in kinds)}


def test_layout_lists_every_module_and_package_of_ewq_gguf():
    assert layout_entries()["ewq_gguf/"] == present(REPO / "ewq_gguf", (".py",))


def test_layout_lists_every_group_and_entry_script_of_scripts():
    """scripts/ is grouped by purpose: its sub-folders and its top-level shell scripts, nothing else at its top
    (scripts/__init__.py makes it the package `python -m scripts...` runs)."""
    assert layout_entries()["scripts/"] == present(REPO / "scripts", (".py", ".sh")) - {"__init__.py"}


def test_layout_names_existing_folders():
    top = set(layout_entries())
    assert all((REPO / name).is_dir() for name in top), top


def test_scripts_are_packages_that_patch_no_import_path():
    """Every Python script sits in a package (so `python -m scripts.GROUP.NAME` runs it from the repository root) and
    imports what it shares as packages (scripts.common, testkit), never by editing sys.path."""
    for folder in (REPO / "scripts", REPO / "testkit"):
        for path in folder.rglob("*.py"):
            assert (path.parent / "__init__.py").is_file(), f"{path.relative_to(REPO)} is in no package"
        for path in [*folder.rglob("*.py"), *folder.rglob("*.sh")]:
            assert not re.search(r"sys\.path\s*(?:\.(?:insert|append|extend)|\[|\+?=)", path.read_text()), \
                f"{path.relative_to(REPO)} patches sys.path"
