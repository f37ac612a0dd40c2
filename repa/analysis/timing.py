"""Timing tools for CPU/GPU benchmarks: the matmul peak, interleaved medians, peak memory, profiles.

Benchmarks on shared machines are noisy, so the tools here are built for comparisons made in one
run: `interleaved_timings` runs the variants round-robin (each round in a rotated order) so a
change in load hits all of them alike, and `measure_matmul_peak` is meant to be called in every
round so utilisation is computed against a peak taken at the same time as the steps.

Peak memory: torch's CPU allocator keeps no statistics and tracemalloc does not see it, and
`getrusage` gives one high-water mark per process (useless once several variants share one). So
`PeakRSS` polls the resident set size (psutil when installed, else /proc/self/statm) from a
background thread, after asking glibc to return freed heap pages (malloc_trim), and reports the
highest value seen and its increase over the value at entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# Matrix-multiply peak


def measure_matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) product over `repeats` tries.

    Counts 2 * size^3 FLOPs per product (a multiply-add is two FLOPs: the convention of hardware
    peak figures). On CPU a bf16 product runs through oneDNN's AMX/AVX512-BF16 kernels.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # first call picks kernels and allocates workspaces
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


# ---------------------------------------------------------------------------------------------
# Interleaved timing


@dataclass
class TimingResult:
    times: dict[str, list[float]]  # wall seconds of each timed call
    cpu_times: dict[str, list[float]]  # CPU seconds of this process (all threads) of each timed call
    warmup_times: dict[str, list[float]]  # wall seconds of each warm-up call
    memory: dict[str, dict[str, float]]  # PeakRSS.summary() of the first warm-up call


def cpu_share(wall: float, cpu: float, threads: int | None = None) -> float:
    """The fraction of `threads` cores this process had during a call: cpu / (wall x threads).

    On a shared machine this is how much of the cores the step actually got; 1 means all.
    (OpenMP threads spin briefly while waiting, so a busy-waiting idle core counts as used.)
    """
    threads = threads or torch.get_num_threads()
    return cpu / (wall * threads) if wall > 0 else float("nan")


def interleaved_timings(
    variants: dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    before_round: Callable[[int], None] | None = None,
    measure_memory_in_warmup: bool = True,
    before_each: Callable[[str], None] | None = None,
) -> TimingResult:
    """Seconds per call of each variant, measured round-robin.

    Runs `warmup + repeats` rounds; in each round every variant is called once, in an order
    rotated by one each round. Warm-up rounds are not timed; when `measure_memory_in_warmup`,
    the first warm-up call of each variant runs under `PeakRSS` (timed calls never do, so the
    polling thread cannot slow them). `before_round(round_index)` runs at the start of each round
    (e.g. to measure the matmul peak at the same time as the steps); `before_each(name)` runs,
    untimed, right before each timed call (e.g. to probe the peak the load leaves at that moment).

    Returns a TimingResult: per variant the wall seconds and the process CPU seconds of each
    timed call, the seconds of each warm-up call (first-call costs such as compilation) and the
    warm-up memory summary.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    warmup_times: dict[str, list[float]] = {name: [] for name in names}
    memory: dict[str, dict[str, float]] = {}
    for round_index in range(warmup + repeats):
        if before_round is not None:
            before_round(round_index)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if round_index < warmup:
                start = time.perf_counter()
                if measure_memory_in_warmup and name not in memory:
                    with PeakRSS() as peak:
                        variants[name]()
                    memory[name] = peak.summary()
                else:
                    variants[name]()
                warmup_times[name].append(time.perf_counter() - start)
                continue
            if before_each is not None:
                before_each(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return TimingResult(times, cpu_times, warmup_times, memory)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Peak resident memory


def resident_bytes() -> int:
    """The resident set size of this process, in bytes."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_heap() -> None:
    """Ask glibc to return freed heap pages to the OS (no-op where unavailable)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_method() -> str:
    try:
        import psutil  # noqa: F401

        source = "psutil.Process().memory_info().rss"
    except ImportError:
        source = "/proc/self/statm"
    return f"resident set size polled every 2 ms from a background thread ({source}), after malloc_trim(0)"


class PeakRSS:
    """Context manager: the highest resident set size seen while the body runs.

    with PeakRSS() as peak: step()
    peak.peak_bytes, peak.increase_bytes (over the value at entry, after freed heap is released).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        release_freed_heap()
        self.start_bytes = self.peak_bytes = resident_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, resident_bytes())

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def summary(self) -> dict[str, float]:
        return {"peak_rss_mb": self.peak_bytes / 2**20, "peak_rss_increase_mb": self.increase_bytes / 2**20}


# ---------------------------------------------------------------------------------------------
# Profiles


def profile_ops(fn: Callable[[], None], row_limit: int = 30) -> tuple[str, list[dict]]:
    """Run fn once under torch.profiler (CPU activities); return the table of the top ops by self
    CPU time and the same rows as dicts (name, self_cpu_s, total_cpu_s, calls, share of self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=60)
    total = sum(event.self_cpu_time_total for event in averages) or 1.0
    rows = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:row_limit]
    top = [
        {
            "name": event.key,
            "self_cpu_s": event.self_cpu_time_total / 1e6,
            "total_cpu_s": event.cpu_time_total / 1e6,
            "calls": event.count,
            "self_share": event.self_cpu_time_total / total,
        }
        for event in rows
    ]
    return table, top
