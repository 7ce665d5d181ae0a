"""The machine's own limits: fp32 matmul throughput, memory readings and thread settings."""

from __future__ import annotations

import os
import resource
import time


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per core) and return the number in use."""
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return torch.get_num_threads()


def matmul_peak_gflops(size: int = 2048, repeats: int = 7, min_seconds: float = 0.3) -> float:
    """Best-of-`repeats` fp32 GFLOP/s of a (size × size) @ (size × size) matmul.

    A matmul of two n × n matrices is 2n³ floating-point operations. Each repetition runs the
    product until `min_seconds` have passed; the best repetition is the peak (the machine is
    shared and noisy, and the peak is what the hardware can do, not what it usually does).
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: threads, caches
    flops = 2.0 * size**3
    best = 0.0
    for _ in range(repeats):
        count, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        best = max(best, flops * count / elapsed / 1e9)
    return best


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The most resident memory this process has held so far, in MiB (getrusage high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
