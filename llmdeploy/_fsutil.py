"""Small filesystem helpers shared by the readers and writers."""

from __future__ import annotations

import mmap
import os
import pathlib
import sys

import numpy as np


def fsync_dir(folder: pathlib.Path) -> None:
    """Make renames inside ``folder`` durable (a no-op on Windows, where folders cannot be fsync'd)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardMaps:
    """Memory maps of the shards that hold at most one tensor's pages in the resident set.

    Pages of a mapped file that the process has touched count in its RSS until they are
    unmapped, so reading a checkpoint tensor by tensor through one long-lived map would
    grow the RSS to the whole checkpoint. Before each new view, the byte range of the
    previous one is handed back with ``MADV_DONTNEED``: the pages stay in the page cache
    (a view that is read again faults them back in, with the same bytes), but no longer
    count for this process.
    """

    def __init__(self) -> None:
        self._maps: dict[pathlib.Path, mmap.mmap] = {}
        self._last: tuple[mmap.mmap, int, int] | None = None

    def view(self, shard: pathlib.Path, begin: int, end: int) -> np.ndarray:
        """Bytes ``begin:end`` of ``shard`` as a uint8 array over its memory map (mapped on first use).

        The previous view's pages leave the resident set first (see the class docstring).
        """
        self.release()
        if shard not in self._maps:
            with open(shard, "rb") as f:
                # A private (copy-on-write) writable mapping, because torch wants writable
                # buffers; nothing writes to it, so no page is ever copied or written back.
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        m = self._maps[shard]
        self._last = (m, begin, end)
        return np.frombuffer(m, dtype=np.uint8, count=end - begin, offset=begin)

    def release(self) -> None:
        """Drop the pages of the last view from the resident set."""
        if self._last is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        m, begin, end = self._last
        self._last = None
        start = begin - begin % mmap.PAGESIZE
        if end > start:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)
