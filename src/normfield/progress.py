"""A dependency-free progress bar on stderr, for multi-configuration runs.

Usage::

    from normfield.progress import progress

    for arch in progress(archs, total=len(archs), label="probe"):
        measure_grad_norms(arch)

``progress(iterable, total=None, label="", stream=None, enabled=None)`` yields the items of
`iterable` unchanged and draws ``label [#####.....] 3/8 12s`` on `stream` (default
``sys.stderr``):

* `total`: number of items; defaults to ``len(iterable)`` when it has one, otherwise only a
  counter is shown.
* `label`: short text in front of the bar (e.g. the placement being run).
* `stream`: a text stream; default ``sys.stderr`` (stdout stays clean for results).
* `enabled`: force the bar on/off; by default it is off when the environment variable
  ``NORMFIELD_PROGRESS=0`` is set.  On a terminal the bar is redrawn in place; on a non-terminal
  (CI logs, files) one line is written at the start, at every 10% step and at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
WIDTH = 30

__all__ = ["progress"]


def _line(label: str, done: int, total: int | None, elapsed: float) -> str:
    head = f"{label} " if label else ""
    if total:
        filled = int(WIDTH * min(done, total) / total)
        bar = "#" * filled + "." * (WIDTH - filled)
        return f"{head}[{bar}] {done}/{total} {elapsed:.0f}s"
    return f"{head}{done} done {elapsed:.0f}s"


def progress(iterable: Iterable[T], total: int | None = None, label: str = "",
             stream=None, enabled: bool | None = None) -> Iterator[T]:
    """Yield the items of `iterable`, drawing a progress bar on `stream` (default stderr).

    See the module docstring for the arguments.  The bar is finished with a newline even when
    the loop is left early (break or exception).
    """
    if enabled is None:
        enabled = os.environ.get("NORMFIELD_PROGRESS", "1") != "0"
    if not enabled:
        yield from iterable
        return
    stream = sys.stderr if stream is None else stream
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    start = time.perf_counter()
    done = 0
    last_decile = -1

    def draw(final: bool = False) -> None:
        nonlocal last_decile
        text = _line(label, done, total, time.perf_counter() - start)
        if tty:
            stream.write("\r" + text + ("\n" if final else ""))
        else:
            decile = int(10 * done / total) if total else done
            if not (final or decile != last_decile):
                return
            last_decile = decile
            stream.write(text + "\n")
        stream.flush()

    draw()
    try:
        for item in iterable:
            yield item
            done += 1
            if not (total and done == total):
                draw()
    finally:
        draw(final=True)
