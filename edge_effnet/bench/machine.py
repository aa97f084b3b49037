"""Machine facts for benchmark records (CPU, load, memory) and CPU pinning. Standard library only."""
from __future__ import annotations

import os
import platform
import resource
import sys

from .. import __version__
from ..errors import UserError

MB = 1e6  # sizes are in megabytes of 10^6 bytes


def cpu_model() -> str:
    """The CPU's name: x86 'model name', a Raspberry Pi's 'Model', else the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        for key in ("model name", "model", "hardware", "cpu model"):
            if fields.get(key):
                return fields[key]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    import numpy as np

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "edge_effnet": __version__}


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, because ru_maxrss starts from the
    parent's size at fork (a benchmark launched by a big process would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def set_affinity(cpus: set[int]) -> None:
    """Let every thread of this process run on `cpus` only; threads started later inherit it."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # a thread that just ended


def pin_to_cpu(cpu: int) -> None:
    """Pin every thread of this process to `cpu`."""
    set_affinity({cpu})
    if os.sched_getaffinity(0) != {cpu}:
        raise UserError(f"could not pin to CPU {cpu}")


def applied_affinity() -> list[int] | None:
    """The CPUs any thread of this process may run on (read back, not assumed)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = set(os.sched_getaffinity(0))
    if os.path.isdir("/proc/self/task"):
        for tid in os.listdir("/proc/self/task"):
            try:
                cpus |= os.sched_getaffinity(int(tid))
            except OSError:
                pass
    return sorted(cpus)
