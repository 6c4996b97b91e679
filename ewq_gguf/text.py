"""The evaluation text: a file the user names, or real English text already installed on the machine.

No text ships with ewq-gguf (licences), so without --text we look for documentation that Debian-family systems carry.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ewq_gguf.errors import InputError

# Debian's reference manual (package debian-reference-en): the benchmarks' calibration and evaluation text
DEBIAN_REFERENCE = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
# Tried in order; the first that exists is used, and reports name it.
DEFAULT_TEXT_CANDIDATES = (
    DEBIAN_REFERENCE,
    Path("/usr/share/common-licenses/GPL-3"),
)


@dataclass(frozen=True)
class EvalText:
    """A text to score, where it came from, and a digest that identifies its content (for the logits cache)."""

    content: str
    source: Path
    sha256: str


def load_text(path: str | Path | None = None) -> EvalText:
    """Read `path` (plain or .gz, UTF-8), or the first default text present when `path` is None."""
    if path is None:
        source = next((candidate for candidate in DEFAULT_TEXT_CANDIDATES if candidate.is_file()), None)
        if source is None:
            names = ", ".join(str(candidate) for candidate in DEFAULT_TEXT_CANDIDATES)
            raise InputError(
                f"no evaluation text given and none of the default texts exists ({names}); "
                "pass --text FILE with a few hundred KB of real text "
                "(on Debian/Ubuntu: apt-get install debian-reference-en)"
            )
    else:
        source = Path(path)
        if not source.is_file():
            raise InputError(f"{source}: text file not found")
    try:
        raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
        content = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{source}: cannot read text ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 text ({exc})") from exc
    if not content.strip():
        raise InputError(f"{source}: the text is empty")
    return EvalText(content=content, source=source, sha256=hashlib.sha256(raw).hexdigest())
