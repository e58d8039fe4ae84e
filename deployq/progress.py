"""Progress bars for long loops (rich), silent when output is not a terminal or when disabled."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, total: Optional[int] = None,
                 enabled: bool = True) -> Iterator[T]:
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
