"""The training progress bar, and log lines that coexist with it.

While the bar is shown, ``sys.stdout`` and ``sys.stderr`` (``print``, warnings) go through
:class:`BarSafeStream`: each complete line is written with the bar cleared and the bar redrawn
under it, so a log line never splits the bar (the stray ``[`` of a line printed mid-bar).
"""
from __future__ import annotations

import sys
from typing import Optional

__all__ = ["BarSafeStream", "progress_bar"]


class BarSafeStream:
    """A text stream that writes whole lines above a tqdm bar (clear, write, redraw)."""

    def __init__(self, bar, stream):
        self.bar, self.stream, self.pending = bar, stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, self.pending = self.pending.rsplit("\n", 1)
            with self.bar.get_lock():
                self.bar.clear(nolock=True)
                self.stream.write(lines + "\n")
                self.stream.flush()
                self.bar.refresh(nolock=True)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.write("\n")
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the wrapped stream's
        return getattr(self.stream, name)


def progress_bar(total: int, initial: int, file=None):
    """A tqdm bar (None when tqdm is missing; disabled without a terminal) that routes stdout and
    stderr through :class:`BarSafeStream` until it is closed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None

    class Bar(tqdm):
        saved: Optional[tuple] = None

        def close(self):
            if self.saved is not None:
                for stream in (sys.stdout, sys.stderr):
                    if isinstance(stream, BarSafeStream):
                        stream.flush()
                sys.stdout, sys.stderr = self.saved
                self.saved = None
            super().close()

    bar = Bar(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None,
              file=file if file is not None else sys.stderr)
    if not bar.disable:
        bar.saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = BarSafeStream(bar, sys.stdout), BarSafeStream(bar, sys.stderr)
    return bar
