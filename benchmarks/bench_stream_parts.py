"""The per-batch and per-sample costs behind the data stream's design (repa/data/stream.py, shards.py).

Each line compares the way the stream does a thing with the way it replaced, side by side:
  shm      a fresh 64 x 256 px batch moved to shared memory (what the DataLoader does with a new
           batch) vs a copy into a shared slot already faulted in (the stream's `_SlotRing`)
  copy     copying a 64 x 512 px batch out with torch's copy_ (spread over intra-op threads) vs
           numpy (one thread), while two busy processes hold the cores (as the workers do)
  alloc    a 64 x 512 px batch copied into fresh memory vs into a recycled buffer
  buffer   reading 256 px samples (PNG + latents) from shards into a shuffle buffer of 1000 vs 1
  checksum one tar header: Python's byte sum vs the Adler-32 route (`_header_sum_mod_65521`)

    python benchmarks/bench_stream_parts.py
"""

from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timings(fn, repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_of(fn, repeats: int = 5) -> float:
    return min(timings(fn, repeats))


def median_of(fn, repeats: int) -> float:
    return statistics.median(timings(fn, repeats))


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    batch = torch.randint(0, 255, (64, 256, 256, 3), dtype=torch.uint8)
    slot = torch.empty_like(batch).share_memory_()
    clones = [batch.clone() for _ in range(5)]  # the collated batches torch then moves
    fresh = best_of(lambda: clones.pop().share_memory_())
    reused = best_of(lambda: np.copyto(slot.numpy(), batch.numpy()))
    print(f"shm: fresh shared batch {1e3 * fresh:.1f} ms vs copy into a slot {1e3 * reused:.1f} ms "
          f"({1e6 * (fresh - reused) / 64:.0f} us per 256 px sample saved)")  # fmt: skip

    large = torch.randint(0, 255, (64, 512, 512, 3), dtype=torch.uint8).share_memory_()
    recycled = torch.empty_like(large)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        busy = pool.map_async(_spin, [3.0, 3.0])
        time.sleep(0.2)
        torch_copy = median_of(lambda: recycled.copy_(large), 15)
        numpy_copy = median_of(lambda: np.copyto(recycled.numpy(), large.numpy()), 15)
        busy.wait()
    print(f"copy: 50 MB batch with both cores busy: torch copy_ {1e3 * torch_copy:.1f} ms, "
          f"numpy {1e3 * numpy_copy:.1f} ms (median of 15)")  # fmt: skip

    into_fresh = best_of(lambda: np.copyto(torch.empty_like(large).numpy(), large.numpy()))
    into_recycled = best_of(lambda: np.copyto(recycled.numpy(), large.numpy()))
    print(f"alloc: 50 MB batch into fresh memory {1e3 * into_fresh:.1f} ms vs recycled "
          f"{1e3 * into_recycled:.1f} ms")  # fmt: skip

    from repa.data.shards import _header_sum_mod_65521, expand_shard_urls, iter_tar_samples

    with tempfile.TemporaryDirectory(prefix="bench_parts_") as workdir:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_data import prepare

        shards, _, _ = prepare(Path(workdir), 1024, 256, 2)
        urls = expand_shard_urls(str(shards))
        for size in (1, 1000):
            buffer, rng, count = [], random.Random(0), 0
            start = time.process_time()
            for _ in range(3):
                for url in urls:
                    for sample in iter_tar_samples(url):  # bytes held, as before DeferredMember
                        count += 1
                        if len(buffer) < size:
                            buffer.append(sample)
                        else:
                            buffer[rng.randrange(size)] = sample
            print(f"buffer: read with a shuffle buffer of {size}: "
                  f"{1e6 * (time.process_time() - start) / count:.0f} us per 256 px sample")  # fmt: skip

    header = os.urandom(512)
    python_sum = best_of(lambda: [sum(header[:148]) + sum(header[156:]) for _ in range(10000)]) / 1e4
    adler = best_of(lambda: [_header_sum_mod_65521(header) for _ in range(10000)]) / 1e4
    print(f"checksum: Python sum {1e6 * python_sum:.2f} us vs Adler-32 {1e6 * adler:.2f} us per header")


if __name__ == "__main__":
    main()
