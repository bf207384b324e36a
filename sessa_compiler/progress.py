"""Say what a step that may take seconds is doing: a line with the elapsed time on stderr, on a terminal only.

Used around first calls of serving methods, exports and the command line's steps, so that no wait is silent;
pipes and logs stay clean (nothing is printed when stderr is not a terminal).
"""
from __future__ import annotations

import contextlib
import sys
import threading


@contextlib.contextmanager
def progress(what: str, show: bool = True):
    if not show or not sys.stderr.isatty():
        yield
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional where only torch, triton and numpy are installed
        print(f"{what} ...", file=sys.stderr, flush=True)
        yield
        return
    with tqdm(total=1, desc=what, bar_format="{desc}: {elapsed}", leave=False) as bar:
        stop = threading.Event()

        def tick():
            while not stop.wait(0.5):
                bar.refresh()
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            bar.update(1)
