"""Peak memory of this process, as a run reports it (edge clients care about the peak, not the average).

CPU: the peak resident set size from the OS (``getrusage``; it never goes down, so compare runs in
separate processes, as ``benchmarks/fwd_memory.py`` does). CUDA: ``torch.cuda.max_memory_allocated``.

>>> stats = peak_memory_mb()
>>> stats["cpu_peak_rss_mb"] > 0
True
"""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb() -> dict[str, float]:
    """{'cpu_peak_rss_mb': ..., and 'cuda_peak_allocated_mb' when CUDA was used}."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    out = {"cpu_peak_rss_mb": round(rss * scale, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
