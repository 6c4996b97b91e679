"""The exceptions a user can cause. The CLI turns each into one line on stderr and a non-zero exit."""
from __future__ import annotations


class EwqGgufError(Exception):
    """Base class of every error ewq-gguf raises on purpose."""

    exit_code = 1


class InputError(EwqGgufError):
    """The model folder, a GGUF, a text or a plan given to us is missing, unreadable or malformed."""

    exit_code = 2


class UnsupportedArchitectureError(InputError):
    """config.json names an architecture that has no adapter."""


class OutputError(EwqGgufError):
    """The output cannot be written (exists without --force, unwritable folder, disk full, interrupted)."""

    exit_code = 3
