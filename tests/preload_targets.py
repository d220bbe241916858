"""Light stand-ins for the command line's pair of functions, for the preload server's tests: without
torch a server starts in a fraction of a second. ``run(argv)`` is what a forked child runs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def warm() -> None:
    """Nothing to import."""


def run(argv: list[str]) -> int:
    """``touch PATH`` (write this process's uid into PATH), ``sleep SECONDS PIDFILE`` or ``exit CODE``."""
    what, *args = argv
    if what == "touch":
        Path(args[0]).write_text(f"{os.getuid()}\n")
        return 0
    if what == "sleep":
        Path(args[1]).write_text(f"{os.getpid()}\n")
        time.sleep(float(args[0]))
        return 0
    if what == "exit":
        return int(args[0])
    print(f"unknown {what!r}", file=sys.stderr)
    return 2
