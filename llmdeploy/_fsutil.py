"""Small filesystem helpers shared by the writers."""

from __future__ import annotations

import os
import pathlib
import sys


def fsync_dir(folder: pathlib.Path) -> None:
    """Make renames inside ``folder`` durable (a no-op on Windows, where folders cannot be fsync'd)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
