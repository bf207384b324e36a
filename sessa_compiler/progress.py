"""What a long compile is doing, on a terminal: a one-line tqdm status ("sessa_compiler: tracing Decoder:
recognising [00:03]") that appears once a step has run for ``DELAY`` seconds, only when stderr is a tty, and
never when ``SESSA_COMPILER_PROGRESS=0`` or ``compile(..., progress=False)``. ``stage(text)`` (any layer)
names the part of the step now running, ``stage(text, i, n)`` counts (building kernels: 3 of 8)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

DELAY = 2.0  # seconds: shorter steps show nothing
_LOCAL = threading.local()


def wanted(show: bool | None = None) -> bool:
    """Whether to show progress: not turned off (argument, SESSA_COMPILER_PROGRESS=0) and stderr a terminal."""
    if show is False or os.environ.get("SESSA_COMPILER_PROGRESS", "1").lower() in ("0", "false", "off", "no"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Status:
    def __init__(self, what: str):
        self.what, self.detail, self.start, self.bar = what, "", time.time(), None  # tqdm clocks with time.time
        self.lock = threading.Lock()

    def text(self) -> str:
        return f"{self.what}: {self.detail}" if self.detail else self.what

    def tick(self) -> None:
        with self.lock:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=None, desc=self.text(), bar_format="{desc} [{elapsed}]", leave=False,
                                initial=0)
                self.bar.start_t = self.start  # elapsed since the step began, not since the bar appeared
            self.bar.set_description_str(self.text(), refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()


@contextlib.contextmanager
def shown(what: str, show: bool | None = True):
    """Show ``what`` (and its stages) while the block runs, once it has run for DELAY seconds."""
    if not wanted(show):
        yield
        return
    status = _Status(what)
    stack = _LOCAL.__dict__.setdefault("stack", [])
    stack.append(status)
    stop = threading.Event()

    def ticker():
        if stop.wait(DELAY):
            return
        while True:
            status.tick()
            if stop.wait(0.5):
                return
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        stack.remove(status)
        status.close()


def stage(text: str, i: int | None = None, n: int | None = None) -> None:
    """Name what the step shown by this thread is doing now (nothing when none is shown)."""
    stack = getattr(_LOCAL, "stack", None)
    if stack:
        status = stack[-1]
        status.detail = f"{text}: {i} of {n}" if i is not None and n is not None else text
        if time.time() - status.start >= DELAY:   # already shown: show the new stage now, not at the next tick
            status.tick()


# the name the serving methods, exports and command line use for a whole step
progress = shown
