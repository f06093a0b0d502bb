"""What machine a benchmark ran on, in one line or as a dict, for every script in this folder."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_name", "cores", "ram_gib", "describe", "git_commit"]


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return kb / 2**20
    return None


def describe(cpu_extra: str = "") -> str:
    """``"<cpu> (<cpu_extra>), <n> cores, <m> GiB RAM, <os> <release>"``."""
    ram = ram_gib()
    mem = f", {ram:.0f} GiB RAM" if ram is not None else ""
    cpu = f"{cpu_name()} ({cpu_extra})" if cpu_extra else cpu_name()
    return f"{cpu}, {cores()} cores{mem}, {platform.system()} {platform.release()}"


def git_commit() -> str:
    """The checkout's short commit, ``+changes`` when tracked files other than results differ from it (a run
    that rewrites ``benchmarks/results/`` measured the committed code); ``unknown`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")
