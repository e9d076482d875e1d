"""Timed steps: what the compose test is doing now, and how long each step took."""

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def report(line: str) -> None:
    """One line for the operator watching the run (pytest -s shows it as it happens)."""
    print(f"[compose] {line}", file=sys.stdout, flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Report `what`, then its duration, or that it failed and after how long."""
    started = time.monotonic()
    report(f"{what} ...")
    try:
        yield
    except BaseException:
        report(f"{what}: FAILED after {time.monotonic() - started:.1f} s")
        raise
    report(f"{what}: {time.monotonic() - started:.1f} s")
