"""Process-memory helpers shared by the export and merge passes."""

from __future__ import annotations

import ctypes
import sys


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Parsing a large tokenizer (a 10-30 MB tokenizer.json into Python objects, or into the Rust
    tokenizer behind ``AutoTokenizer``) leaves a few hundred MB of freed heap that glibc keeps
    mapped, and resident, for later. Python's small objects come from their own mmap'd arenas,
    so that heap would not even be reused by what follows.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass
