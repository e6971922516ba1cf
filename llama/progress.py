"""Progress of a long step on stderr: one line rewritten in place on a terminal, a few plain lines elsewhere.

    bar = Progress("loading consolidated.00.pth", total=16_060_522_496)
    for block in blocks:
        ...
        bar.update(len(block))          # "  loading consolidated.00.pth:  45% (7.2 GB of 16.1 GB, 850.0 MB/s)"
    bar.close()

On a terminal the line is redrawn (carriage return) at most ten times a second. When stderr is a
file or a pipe (CI logs, ``2> log``) carriage returns would glue every update into one line, so
the bar prints a plain line at 25%, 50%, 75% and 100% instead. ``unit="B"`` shows sizes in
kB/MB/GB and a rate; any other unit shows counts (``272/272 tensors``).

Our own ~60 lines rather than tqdm: tqdm is not a runtime dependency (it reaches the test
environment only through transformers), and what we need is one line format in two places.
"""

import sys
import time
from typing import Optional, TextIO

REDRAW_S = 0.1  # at most ten redraws a second on a terminal
PLAIN_STEPS = 4  # plain lines at 25%, 50%, 75%, 100%
RATE_AFTER_S = 0.5  # show a rate once the step has run this long


def format_bytes(n: float) -> str:
    """Decimal units, as disks and download tools count: 1.2 GB, 850 MB, 12 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class Progress:
    """A progress line for ``total`` units of work; ``update`` adds done work, ``close`` ends the line."""

    def __init__(self, label: str, total: int, unit: str = "B", stream: Optional[TextIO] = None):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = float("-inf")  # the first update draws at once
        self.plain_printed = 0  # plain lines printed so far (non-terminal output)
        self.closed = False

    def text(self) -> str:
        """The current line: label, percentage, amount and (for bytes) rate."""
        pct = 100 * self.done // self.total if self.total else 100
        if self.unit == "B":
            elapsed = time.perf_counter() - self.start
            amount = f"{format_bytes(self.done)} of {format_bytes(self.total)}"
            if elapsed >= RATE_AFTER_S:  # a rate over a few milliseconds (memory-mapped files) means nothing
                amount += f", {format_bytes(self.done / elapsed)}/s"
        else:
            amount = f"{self.done}/{self.total} {self.unit}"
        return f"  {self.label}: {pct:3d}% ({amount})"

    def update(self, n: int) -> None:
        """Record ``n`` more units done and redraw when due."""
        self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
        if self.tty:
            now = time.perf_counter()
            if now - self.last_draw >= REDRAW_S or self.done >= self.total:
                self.last_draw = now
                print("\r" + self.text(), end="", file=self.stream, flush=True)
        else:
            due = PLAIN_STEPS * self.done // self.total if self.total else PLAIN_STEPS
            if due > self.plain_printed and due < PLAIN_STEPS:  # 100% is printed by close()
                self.plain_printed = due
                print(self.text(), file=self.stream, flush=True)

    def close(self) -> None:
        """Print the final state (100% when all work was recorded) and end the line."""
        if self.closed:
            return
        self.closed = True
        print(("\r" if self.tty else "") + self.text(), file=self.stream, flush=True)
