"""One line describing the machine a benchmark ran on (recorded beside every table in docs/)."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """CPU model, logical CPUs, RAM, OS and the versions that decide the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f"; {kb / 1024**2:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    versions = []
    for module in ("numpy", "torch"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs{mem}; {platform.system()}; Python {platform.python_version()}; "
        + "; ".join(versions)
    )
