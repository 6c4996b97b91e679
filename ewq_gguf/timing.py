"""Where a conversion's time goes: seconds per stage, collected without printing (results carry them)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class StageTimes(dict[str, float]):
    """Stage name -> seconds spent in it. Stages on different threads (reading and quantizing the next tensor while
    this one is written) overlap, so their sum can exceed the wall time. Each stage is timed from one thread only."""

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - started
