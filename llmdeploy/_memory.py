"""Process-memory helpers shared by the export and merge passes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Iterator


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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (nested blocks leave it to the outermost).

    Parsing a large tokenizer (a 262k-token tokenizer.json: millions of dicts, lists and strings)
    triggers a collection every few hundred allocations, each walking every container made so
    far: half of the parse time, and as much again inside ``AutoTokenizer``. Nothing parsed there
    forms reference cycles, so the block frees everything by reference counting; put the block
    around the whole life of the parsed objects, so the collector never has to walk them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
