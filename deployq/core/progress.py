"""Progress for long loops: a rich bar on a terminal; elsewhere (a log file, CI, a pipe) one plain
line on stderr every LINE_INTERVAL seconds, so a long job is never silent; nothing when disabled."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


LINE_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal
QUIET = False  # set by the CLI's -q: no progress at all
VERBOSE = False  # set by the CLI's -v: also the time each stage took
STARTED = time.perf_counter()  # the command's start (its entry point imports this module first)
START_UP = "start-up (imports, loading and preparing the model)"
_open: Optional[tuple[str, float]] = (START_UP, STARTED)


def stage(text: str, enabled: bool = True) -> None:
    """One line on stderr as a long job enters a stage ("export: tracing with torch.export"); under
    -v, first the time the stage before it took (before the first: the start-up, imports included)."""
    global _open
    if not enabled or QUIET:
        return
    end_stage()
    print(text, file=sys.stderr, flush=True)
    _open = (text, time.perf_counter())


def restart_clock() -> None:
    """A new command in the same process (tests, notebooks): its start-up counts from now, and
    no stage of the one before is still open."""
    global _open
    _open = (START_UP, time.perf_counter())


def end_stage() -> None:
    """Under -v, the time the stage running now has taken; it is then closed."""
    global _open
    if VERBOSE and not QUIET and _open is not None:
        print(f"  {time.perf_counter() - _open[1]:.1f} s  {_open[0]}", file=sys.stderr, flush=True)
    _open = None


def progress_bar(items: Iterable[T], description: str, total: Optional[int] = None,
                 enabled: bool = True) -> Iterator[T]:
    if not enabled or QUIET:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not sys.stderr.isatty():
        yield from _progress_lines(items, description, total)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _progress_lines(items: Iterable[T], description: str, total: Optional[int]) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LINE_INTERVAL:
            print(f"{description}: {done}/{total if total is not None else '?'} ({now - start:.0f} s)",
                  file=sys.stderr, flush=True)
            last = now


class Ticks:
    """A progress bar for work that reports from callbacks (a layer corrected inside a forward):
    :meth:`tick` once per item done, :meth:`close` when the work ends (early or not)."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self._bar = progress_bar(range(total + 1), description, total=total, enabled=enabled)
        next(self._bar, None)  # shown at 0 of total

    def tick(self) -> None:
        next(self._bar, None)

    def close(self) -> None:
        self._bar.close()
