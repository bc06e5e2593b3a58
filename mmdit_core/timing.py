"""Where the wall time goes: seconds summed by phase over every block timed under that phase's name."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Phases:
    """`with phases("sampling"): ...` adds the block's wall seconds to `phases.seconds["sampling"]`.
    On CUDA the caller synchronises where a phase must not absorb another's queued kernels."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_metrics(self, prefix: str = "seconds_") -> dict[str, float]:
        return {f"{prefix}{name}": round(seconds, 3) for name, seconds in self.seconds.items()}
