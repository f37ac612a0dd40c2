"""Training-stream throughput against REPA's published loader and against bare PNG decoding.

Readers of the same samples (identical PNG bytes and cached arrays), each with `--workers` worker
processes:
  repa_loader       the reference: REPA's published data layout and loader as its dataset.py has
                    them: one PNG and one .npy of SD-VAE moments per sample in a folder
                    (images/, vae-sd/ with dataset.json), the PNG decoded with pyspng when it is
                    installed (PIL otherwise), a torch DataLoader with shuffle=True, drop_last,
                    default collation. Its workers persist across passes (REPA's loader restarts
                    them every epoch: the best case for it here)
  decode_pyspng     the limits: the same PNG bytes already in memory, decoded by a pool of worker
  decode_pil        processes that inherited them at fork (no reads, no batching, nothing sent back)
  stream_images     repa.data.stream.make_train_stream over tar shards, fields images + latents
                    (REPA with cached latents and an encoder run on the fly)
  stream_latents    fields latents only (SiT, or REPA with cached features: no PNG is read)
  stream_latents_features   latents + DINOv2-B-sized features, (R/16)^2 tokens x 768 in fp16
                    (256 x 768 at 256 px), i.e. REPA on cached latents and features
No flips (REPA's default). Each reader goes over the samples `--passes` times per run; the rate
is samples/s from the first batch on (worker start-up is excluded and reported apart), with the
CPU time per sample of all of a reader's processes. One warm-up run, then `--runs` timed runs,
the readers' order rotated each run; every ratio is taken within a run (both readers measured
minutes apart at most under the same load), and reported as the median with each run's value.

Targets (issue 20, at 256 px with 2 workers): images >= 1.5x REPA's loader and >= 85% of bare
pyspng decode; latents only >= 6x REPA's loader; latents + features >= 3x REPA's loader.

`--compare-checkout PATH` also times the stream of another checkout of repa (e.g. `git worktree
add /tmp/old COMMIT`) side by side: the stream readers of both checkouts then each run in a
subprocess (`stream_*@this`, `stream_*@other`), with ratios `*_this_vs_other`.

    python benchmarks/bench_data.py --resolutions 256 --num-images 1024 --workers 2 --runs 3 \
        --output benchmarks/results/data-256.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

try:
    import pyspng
except ImportError:
    pyspng = None

REPO = Path(__file__).resolve().parents[1]
STREAM_FIELDS = {
    "stream_images": ("images", "latents"),
    "stream_latents": ("latents",),
    "stream_latents_features": ("latents", "features"),
}
TARGETS = {  # ratio name -> (numerator, denominator, target)
    "images_vs_repa_loader": ("stream_images", "repa_loader", 1.5),
    "images_vs_pyspng_decode": ("stream_images", "decode_pyspng", 0.85),
    "latents_vs_repa_loader": ("stream_latents", "repa_loader", 6.0),
    "latents_features_vs_repa_loader": ("stream_latents_features", "repa_loader", 3.0),
}
FEATURE_DIM = 768  # DINOv2-B


class SDVAEShapedMoments:
    """Stand-in tokenizer with SD-VAE's moment shape (8, R/8, R/8): the files are the same size."""

    name = "sd-vae-shaped-stand-in"

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images.float() / 127.5 - 1, 8)  # (B, 3, R/8, R/8)
        return torch.cat([pooled, pooled[:, :1], pooled.abs() + 0.01, pooled[:, :1].abs() + 0.01], dim=1)


class DINOv2BShapedFeatures:
    """Stand-in encoder with DINOv2-B's token shape at REPA's settings: (R/16)^2 x 768."""

    name = "dinov2-b-shaped-stand-in"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        side = images.shape[-1] // 16
        pooled = F.adaptive_avg_pool2d(images.float() / 255, side).flatten(2).transpose(1, 2)  # (B, T, 3)
        return pooled.repeat(1, 1, FEATURE_DIM // 3).half()


class REPAFolderDataset(Dataset):
    """REPA's dataset.py, as published: images/*.png and vae-sd/*.npy (moments) with the labels in
    vae-sd/dataset.json; pyspng when installed, else PIL; CHW uint8 as a transposed view."""

    def __init__(self, root: Path):
        self.images_dir, self.features_dir = root / "images", root / "vae-sd"
        self.image_fnames = sorted(p.name for p in self.images_dir.iterdir() if p.suffix == ".png")
        self.feature_fnames = sorted(p.name for p in self.features_dir.iterdir() if p.suffix == ".npy")
        labels = dict(json.loads((self.features_dir / "dataset.json").read_text())["labels"])
        self.labels = np.array([labels[name] for name in self.feature_fnames]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.feature_fnames)

    def __getitem__(self, index: int):
        with open(self.images_dir / self.image_fnames[index], "rb") as handle:
            if pyspng is not None:
                image = pyspng.load(handle.read())
            else:
                image = np.array(Image.open(handle))
            image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)
        features = np.load(self.features_dir / self.feature_fnames[index])
        return torch.from_numpy(image), torch.from_numpy(features), torch.tensor(self.labels[index])


_PNGS: list[bytes] = []  # set before the decode pool forks, so its workers hold the bytes already


def _decode_pyspng(data: bytes) -> np.ndarray:
    return pyspng.load(data)


def _decode_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


_DECODERS = {"pyspng": _decode_pyspng, "pil": _decode_pil}


def _decode_every(start: int, step: int, passes: int, decoder: str) -> int:
    decode = _DECODERS[decoder]
    for _ in range(passes):
        for data in _PNGS[start::step]:
            decode(data)
    return passes * len(_PNGS[start::step])


def prepare(workdir: Path, num_images: int, resolution: int, workers: int) -> tuple[Path, Path, list[bytes]]:
    """Synthetic images -> shards with latents and features; the same PNGs and latents in REPA's
    folder layout."""
    from repa.data.build import build_shards
    from repa.data.shards import LATENTS, expand_shard_urls, iter_tar_samples, load_npy
    from repa.data.synthetic import write_synthetic_dataset

    images = workdir / "source"
    write_synthetic_dataset(images, num_images=num_images, resolution=resolution, num_classes=10)
    shards = workdir / "shards"
    shard_size = max(1, num_images // (4 * workers))  # >= 4 shards per worker
    build_shards(
        str(images), shards, resolution=resolution, shard_size=shard_size, workers=workers,
        tokenizer=SDVAEShapedMoments(), encoder=DINOv2BShapedFeatures(),
    )  # fmt: skip
    folder = workdir / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "vae-sd").mkdir()
    labels, pngs = [], []
    for url in expand_shard_urls(str(shards)):
        for sample in iter_tar_samples(url):
            name = f"img{len(labels):08d}"
            (folder / "images" / f"{name}.png").write_bytes(sample["png"])
            np.save(folder / "vae-sd" / f"{name}.npy", load_npy(sample[LATENTS]))
            labels.append([f"{name}.npy", int(sample["cls"])])
            pngs.append(sample["png"])
    (folder / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return shards, folder, pngs


def _cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system): (this process and all its live child processes, this process)."""
    own = psutil.Process().cpu_times()
    total = own.user + own.system
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total, own.user + own.system


def _timed(batches, batch_size: int, num_batches: int) -> dict:
    """Steady samples/s from the first batch on, start-up seconds to the first batch, CPU
    microseconds per sample over the same span (all processes; the training process alone)."""
    start = time.perf_counter()
    first = None
    count = 0
    iterator = iter(batches)  # held: a `for` over `batches` would drop it, and stop the workers, at its break
    for _batch in iterator:
        count += 1
        if first is None:
            first, cpu_first = time.perf_counter(), _cpu_seconds()
        if count == num_batches:
            break
    # Taken before the iterator is dropped: dropping it stops the workers and their CPU times go.
    cpu_end, end = _cpu_seconds(), time.perf_counter()
    samples = (count - 1) * batch_size
    cpu_us = [1e6 * (e - f) / samples for e, f in zip(cpu_end, cpu_first)]
    return {
        "rate": samples / (end - first),
        "startup_s": first - start,
        "cpu_us": cpu_us[0],
        "main_cpu_us": cpu_us[1],
    }


def run_stream(shards: Path, fields, batch_size: int, workers: int, num_batches: int, seed: int) -> dict:
    from repa.data.stream import make_train_stream

    stream = make_train_stream(
        str(shards), batch_size_per_rank=batch_size, num_workers=workers, seed=seed, shuffle_buffer=1000,
        fields=set(fields), num_batches=num_batches, pin_memory=False,
    )  # fmt: skip
    return _timed(stream, batch_size, num_batches)


def run_stream_in_subprocess(
    checkout: Path, shards: Path, fields, batch_size: int, workers: int, num_batches: int, seed: int
) -> dict:
    """`run_stream` with the repa of `checkout` first on the path, in a fresh process."""
    request = dict(shards=str(shards), fields=list(fields), batch_size=batch_size, workers=workers,
                   num_batches=num_batches, seed=seed)  # fmt: skip
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, __file__, "--stream-subprocess", json.dumps(request)],
        env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(measured.pop("repa_file")).resolve().parents[1] != checkout.resolve():
        raise RuntimeError(f"the subprocess did not import repa from {checkout}")
    return measured


def _stream_subprocess(request: str) -> None:
    import repa

    args = json.loads(request)
    measured = run_stream(Path(args["shards"]), args["fields"], args["batch_size"], args["workers"],
                          args["num_batches"], args["seed"])  # fmt: skip
    print(json.dumps({**measured, "repa_file": repa.__file__}))


def run_repa_loader(folder: Path, batch_size: int, workers: int, num_batches: int, seed: int) -> dict:
    loader = DataLoader(
        REPAFolderDataset(folder), batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    epochs = (batch for _ in range(num_batches) for batch in loader)  # same workers every pass
    return _timed(epochs, batch_size, num_batches)


def run_decode(pool, decoder: str, workers: int, passes: int) -> dict:
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    decoded = sum(pool.starmap(_decode_every, [(i, workers, passes, decoder) for i in range(workers)]))
    end, cpu_end = time.perf_counter(), _cpu_seconds()
    return {"rate": decoded / (end - start), "cpu_us": 1e6 * (cpu_end[0] - cpu_start[0]) / decoded}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_run": values}


def bench_resolution(args, resolution: int, workdir: Path) -> dict:
    shards, folder, pngs = prepare(workdir, args.num_images, resolution, args.workers)
    num_batches = args.passes * args.num_images // args.batch_size  # the stream is endless
    stream = dict(STREAM_FIELDS)
    measure = {
        "repa_loader": lambda run: run_repa_loader(folder, args.batch_size, args.workers, num_batches, run),
        "decode_pil": lambda run: run_decode(pool, "pil", args.workers, args.passes),
    }
    if pyspng is not None:
        measure["decode_pyspng"] = lambda run: run_decode(pool, "pyspng", args.workers, args.passes)
    for name, fields in stream.items():
        if args.compare_checkout:
            for label, checkout in (("this", REPO), ("other", Path(args.compare_checkout))):
                measure[f"{name}@{label}"] = lambda run, f=fields, c=checkout: run_stream_in_subprocess(
                    c, shards, f, args.batch_size, args.workers, num_batches, run
                )
        else:
            measure[name] = lambda run, f=fields: run_stream(
                shards, f, args.batch_size, args.workers, num_batches, run
            )
    if args.readers:
        wanted = args.readers.split(",")
        unknown = sorted(set(wanted) - set(measure))
        if unknown:
            raise SystemExit(f"--readers: unknown reader(s) {unknown}; choose from {sorted(measure)}")
        measure = {name: measure[name] for name in wanted}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in measure}
    _PNGS[:] = pngs
    order = list(measure)
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for run in range(args.runs + 1):  # run 0 is the warm-up
            shift = run % len(order)
            for name in order[shift:] + order[:shift]:  # rotated: no reader always runs first
                measured = measure[name](run)
                print(f"  {resolution}px run {run}: {name} {measured['rate']:.0f} samples/s", flush=True)
                if run > 0:
                    for key, value in measured.items():
                        results[name].setdefault(key, []).append(value)
    entry = {
        "resolution": resolution,
        "png_bytes_mean": float(np.mean([len(p) for p in pngs])),
        "samples_per_s": {name: _spread(values["rate"]) for name, values in results.items()},
        "cpu_us_per_sample_median": {n: statistics.median(v["cpu_us"]) for n, v in results.items()},
        "training_process_cpu_us_per_sample_median": {
            n: statistics.median(v["main_cpu_us"]) for n, v in results.items() if "main_cpu_us" in v
        },
        "startup_s_median": {
            n: statistics.median(v["startup_s"]) for n, v in results.items() if "startup_s" in v
        },
    }

    def ratio(numerator: str, denominator: str) -> dict | None:
        if numerator not in results or denominator not in results:
            return None
        return _spread([a / b for a, b in zip(results[numerator]["rate"], results[denominator]["rate"])])

    ratios = {}
    if args.compare_checkout:
        for name in stream:
            ratios[f"{name.removeprefix('stream_')}_this_vs_other"] = ratio(f"{name}@this", f"{name}@other")
        suffix = "@this"
    else:
        suffix = ""
    for key, (numerator, denominator, target) in TARGETS.items():
        measured = ratio(numerator + suffix if numerator.startswith("stream") else numerator, denominator)
        if measured is None:
            missing = [name for name in (numerator, denominator) if name not in results]
            why = f"not measured: {', '.join(missing)} not run (--readers, or pyspng absent)"
            ratios[key] = {"status": why}
            continue
        ratios[key] = {**measured, "target": target, "met": measured["median"] >= target}
    ratios["images_vs_pil_decode"] = ratio("stream_images" + suffix, "decode_pil")
    entry["ratios"] = ratios
    return entry


def machine() -> dict:
    from repa.data.png import png_decoder
    from repa.precision import cpu_model_name

    flags: list[str] = []
    cpuinfo: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                cpuinfo[key.strip()] = value.strip()
        flags = cpuinfo.get("flags", "").split()
    except OSError:
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16")
    import PIL

    return {
        "cpu_model": cpu_model_name(),
        "cpu_family_model_stepping": "/".join(
            cpuinfo.get(k, "?") for k in ("cpu family", "model", "stepping")
        ),
        "cpu_flags": [flag for flag in wanted if flag in flags],
        "virtualised": "hypervisor" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pyspng": getattr(pyspng, "__version__", None),
        "stream_png_decoder": png_decoder(),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--stream-subprocess":
        _stream_subprocess(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="256", help="comma-separated image sizes")
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="timed runs (after one warm-up)")
    parser.add_argument(
        "--passes", type=int, default=3, help="each reader goes over the samples this many times per run"
    )
    parser.add_argument("--compare-checkout", help="also time the stream of this other checkout of repa")
    parser.add_argument(
        "--readers", default="", help="comma-separated readers to time (default: all), e.g. stream_images"
    )
    parser.add_argument("--output", default="bench_data.json")
    args = parser.parse_args()
    report = {
        "benchmark": "data stream throughput against REPA's published loader and bare PNG decoding",
        "command": " ".join(["python", "benchmarks/bench_data.py", *sys.argv[1:]]),
        "settings": vars(args),
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "results": [],
    }
    for resolution in [int(r) for r in args.resolutions.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as workdir:
            entry = bench_resolution(args, resolution, Path(workdir))
        report["results"].append(entry)
        rates = {name: spread["median"] for name, spread in entry["samples_per_s"].items()}
        print(f"{resolution}px samples/s: " + ", ".join(f"{n} {r:.0f}" for n, r in rates.items()))
        for name, value in entry["ratios"].items():
            if value and "median" in value:
                target = (
                    f" (target {value['target']}: {'met' if value['met'] else 'MISSED'})"
                    if "target" in value
                    else ""
                )
                print(f"  {name}: {value['median']:.2f} (runs {value['min']:.2f}-{value['max']:.2f}){target}")
    report["load_average_at_end"] = os.getloadavg()
    # the ratios of the first (or only) resolution at the top, as the README quotes them
    report["ratios"] = report["results"][0]["ratios"] if report["results"] else {}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
