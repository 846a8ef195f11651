"""Progress reporting: the pipeline reports through one callback; each entry point decides where it goes.

A callback is any ``Callable[[ProgressEvent], None]``. Stages: ``prepare``, ``train``, ``crf``, ``select``,
``predict``, ``pick``, ``done``; ``done``/``total`` count work items within a stage (epochs, micrographs), and
``message`` is a human sentence (``total == 0`` means a plain log line).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    metrics: dict = field(default_factory=dict)

    def line(self) -> str:
        """One log line, e.g. ``[predict 3/16] micrograph mic003: 412 picks``."""
        where = f"{self.stage} {self.done}/{self.total}" if self.total else self.stage
        extra = "  ".join(f"{k}={_fmt(v)}" for k, v in self.metrics.items())
        return f"[{where}] {self.message}" + (f"  {extra}" if extra else "")


ProgressCallback = Callable[[ProgressEvent], None]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def silent(event: ProgressEvent) -> None:
    """A callback that discards everything."""


class LinePrinter:
    """Prints every event as a flushed line (RELION's run.out, plain logs)."""

    def __init__(self, stream: TextIO | None = None, timestamps: bool = True):
        self.stream = stream or sys.stdout
        self.timestamps = timestamps

    def __call__(self, event: ProgressEvent) -> None:
        prefix = time.strftime("%H:%M:%S ") if self.timestamps else ""
        print(prefix + event.line(), file=self.stream, flush=True)


class TqdmReporter:
    """Progress bars in a terminal: one bar per stage with a total, plain lines for the rest."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._bar = None
        self._stage = None

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        if event.total:
            if self._bar is None or self._stage != event.stage or self._bar.total != event.total:
                self.close()
                self._bar = tqdm(total=event.total, desc=event.stage, file=self.stream, leave=True,
                                 dynamic_ncols=True)
                self._stage = event.stage
            self._bar.n = event.done
            if event.metrics:
                self._bar.set_postfix({k: _fmt(v) for k, v in event.metrics.items()}, refresh=False)
            self._bar.refresh()
            if event.done >= event.total:
                self.close()
        else:
            if self._bar is not None:
                self._bar.write(event.line(), file=self.stream)
            else:
                print(event.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None


class RunLog:
    """Appends every event, and any line given to :meth:`write`, with date and time to a log file that is kept
    across runs (the standalone command's ``OUT/crisp-ext.log``)."""

    def __init__(self, path, header: str | None = None):
        from pathlib import Path

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if header:
            self.write(header)

    def __call__(self, event: ProgressEvent) -> None:
        self.write(event.line())

    def write(self, text: str) -> None:
        if self._file.closed:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        self._file.write("".join(stamp + line + "\n" for line in str(text).splitlines() or [""]))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def fanout(*callbacks: ProgressCallback | None) -> ProgressCallback:
    """One callback that forwards to several (``None`` entries are skipped)."""
    cbs = [c for c in callbacks if c is not None]

    def _call(event: ProgressEvent) -> None:
        for c in cbs:
            c(event)

    return _call
