"""The one way library code reports progress: a tqdm bar on stderr that callers can silence."""
from __future__ import annotations

from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Optional[Iterable[T]] = None, *, desc: str, total: Optional[float] = None,
                 enabled: bool = True, unit: str = "it", unit_scale: bool = False) -> tqdm:
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, unit=unit, unit_scale=unit_scale,
                leave=False, dynamic_ncols=True)
