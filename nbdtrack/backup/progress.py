"""Progress of long work: a bar with rate and ETA on a terminal, JSON lines for machines.

``--progress=auto`` (the default) shows a bar when stderr is a terminal and nothing
otherwise; ``--progress=json`` prints one JSON object per line on stdout, e.g.
``{"event": "progress", "phase": "copy", "done": 1048576, "total": 4194304,
"rate": 52428800.0, "eta": 0.1}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO

PROGRESS_MODES = ("auto", "bar", "json", "none")


class Progress:
    """Silent progress; the base of the others."""

    def start(self, phase: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        """A line for the user (a decision, a warning)."""
        print(f"nbdtrack: {text}", file=sys.stderr)

    def result(self, data: dict) -> None:
        """The final outcome, for machines."""


class BarProgress(Progress):
    def __init__(self) -> None:
        self._bar = None

    def start(self, phase: str, total: int) -> None:
        from tqdm import tqdm

        self.finish()
        self._bar = tqdm(
            total=total, desc=phase, unit="B", unit_scale=True, unit_divisor=1024, leave=True
        )

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(f"nbdtrack: {text}", file=sys.stderr)
        else:
            super().message(text)


class JSONProgress(Progress):
    """One JSON object per line; progress at most every ``interval`` seconds."""

    def __init__(self, out: IO[str] | None = None, interval: float = 0.5) -> None:
        self.out = out or sys.stdout
        self.interval = interval
        self.phase = ""
        self.total = 0
        self.done = 0
        self._started = 0.0
        self._last = 0.0

    def _emit(self, data: dict) -> None:
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

    def start(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self._started = self._last = time.monotonic()
        self._report()

    def _report(self) -> None:
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        self._emit(
            {
                "event": "progress",
                "phase": self.phase,
                "done": self.done,
                "total": self.total,
                "rate": round(rate, 1),
                "eta": round(eta, 1) if eta is not None else None,
            }
        )

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._report()

    def finish(self) -> None:
        if self.phase:
            self._report()
            self.phase = ""

    def message(self, text: str) -> None:
        self._emit({"event": "message", "text": text})

    def result(self, data: dict) -> None:
        self._emit({"event": "result", **data})


def make_progress(mode: str) -> Progress:
    if mode == "json":
        return JSONProgress()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarProgress()
    return Progress()
