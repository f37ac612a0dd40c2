"""`repa bench --device cuda`: the real training step and sampler of SiT-XL/2 + REPA on one GPU.

What is timed, per batch size per GPU (32, 64, 128; larger ones after an out-of-memory are
recorded as such and not tried), eager and through torch.compile:
  the training step   `StepRunner.run` (repa/train/step.py), the loop's own step function, on
                      the method the loop builds (repa.analysis.train_throughput.BenchModel),
                      bf16 autocast, cached SD-VAE moments and DINOv2-B-shaped features at
                      256 px, attention restricted to SDPA's flash kernel (an error, not a silent
                      fallback, if the GPU cannot run it)
  the sampler         repa.transport.samplers.sample: SDE, 250 steps, CFG 1.8 on t in [0, 0.7]
                      (REPA's evaluation setting), EMA-free model, bf16 autocast
  the loader          benchmarks/bench_data.py's `stream_latents_features` reader (the stream the
                      loop reads in this recipe: latents + features, no PNG), 8 workers, in a
                      child process
and, from those: images/s, peak GPU memory, MFU and "no data stall" (loader >= 2x the step).

MFU convention (the same as repa/analysis/train_throughput.py): step FLOPs = 2 x 3 x forward
multiply-adds x batch, over the GPU's dense bf16 peak from its datasheet (table below) and over
the best bf16 matmul measured here. The DiT paper's "118.6 GFLOPs" for SiT-XL/2 counts
multiply-adds, so its own MFU figures (one FLOP per multiply-add) are half of ours.

`dry_run=True` runs the same code at toy sizes (a 2-block, 64-wide SiT at 64 px, batch 2 and 4,
4 sampler steps, 64 images, 2 loader workers; torch.compile's eager backend on a CPU), on CUDA
when there is one and on the CPU otherwise, so `bash benchmarks/gpu_check.sh --dry-run` in the
test suite keeps this path from rotting.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
DATASHEET_BF16_PEAK = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.5e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "A10G": 70e12,
}
GOAL_IMAGES_PER_S = 1000  # issue 20's goal for SiT-XL/2 + REPA on one H200


@dataclass
class GpuBenchConfig:
    model: str = "SiT-XL/2"
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    compile_modes: tuple[bool, ...] = (False, True)
    resolution: int = 256
    align_depth: int = 8
    encoder: str = "dinov2-b"
    warmup_steps: int = 3
    timed_steps: int = 10
    model_overrides: dict | None = None
    encoder_overrides: dict | None = None
    # sampler: REPA's evaluation setting
    sample_batch: int = 64
    sample_steps: int = 250
    cfg_scale: float = 1.8
    guidance_high: float = 0.7
    # loader
    loader_workers: int = 8
    loader_images: int = 2048
    compile_backend: str = "inductor"
    dry_run: bool = False


def dry_run_config() -> GpuBenchConfig:
    return GpuBenchConfig(
        batch_sizes=(2, 4),
        resolution=64,
        warmup_steps=1,
        timed_steps=2,
        model_overrides=dict(depth=2, hidden_size=64, num_heads=2, projector_dim=128),
        encoder_overrides=dict(depth=1, embed_dim=64, num_heads=2),
        align_depth=1,
        sample_batch=2,
        sample_steps=4,
        loader_workers=2,
        loader_images=64,
        dry_run=True,
    )


def datasheet_peak(device_name: str) -> float | None:
    for name, peak in DATASHEET_BF16_PEAK.items():
        if name in device_name:
            return peak
    return None


def no_cuda_message() -> str:
    built = torch.version.cuda
    if built is None:
        why = f"this torch {torch.__version__} is built without CUDA"
    else:
        why = "no CUDA device is visible"
    return f"repa bench --device cuda: {why}; nothing to time (try `repa bench` for the CPU suite)"


class _Clock:
    """Wall time of a GPU (synchronised) or CPU call."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def flash_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """SDPA restricted to the flash kernel on CUDA (it raises if that kernel cannot run, so the
    figure is never a silent fallback); the CPU's default kernel otherwise."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    clock = _Clock(device)
    clock.time(lambda: a @ b)
    return 2.0 * size**3 / min(clock.time(lambda: a @ b) for _ in range(repeats))


def _peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def time_training(config: GpuBenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    """Every (compile mode, batch size) variant of the loop's step, timed after its warm-up."""
    from repa.analysis.train_throughput import BenchModel, TrainBenchConfig, make_batch
    from repa.encoders import create_encoder

    train_config = TrainBenchConfig(
        models=(config.model,),
        precisions=("bf16",),
        on_the_fly=(),
        sdpa_attention=(),
        resolution=config.resolution,
        align_depth=config.align_depth,
        encoder=config.encoder,
        model_overrides=config.model_overrides or {},
        encoder_overrides=config.encoder_overrides or {},
        profile=None,
    )
    # Only the encoder's width matters with cached features: it is built on CPU and never run.
    encoder = create_encoder(
        config.encoder,
        resolution=config.resolution,
        pretrained=False,
        arch_overrides=config.encoder_overrides,
    )
    state = BenchModel(config.model, train_config, encoder, device=device)
    state.compile_backend = config.compile_backend
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict] = {}
    for compiled in config.compile_modes:
        for batch_size in config.batch_sizes:
            name = f"batch {batch_size}" + (" compiled" if compiled else "")
            batch = make_batch(replace(train_config, batch_size=batch_size), True, encoder.dim, generator)
            if device.type == "cuda":
                batch = batch.pin_memory()
            step_flops = state.flops(replace(train_config, batch_size=batch_size))["step_flops"]
            clock = _Clock(device)
            step = lambda batch=batch, compiled=compiled: state.step(batch, "bf16", compiled)  # noqa: E731
            _reset_peak_memory(device)
            try:
                with flash_attention(device):
                    started = time.perf_counter()
                    for _ in range(config.warmup_steps):
                        clock.time(step)
                    warmup = time.perf_counter() - started
                    times = [clock.time(step) for _ in range(config.timed_steps)]
            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                if not _is_out_of_memory(error):
                    raise
                results[name] = {"batch_size": batch_size, "compiled": compiled, "status": "out of memory"}
                log(f"{name}: out of memory; larger batches not tried")
                _reset_peak_memory(device)
                break
            seconds = sorted(times)[len(times) // 2]
            results[name] = {
                "batch_size": batch_size,
                "compiled": compiled,
                "status": "ok",
                "seconds_per_step": times,
                "median_s": seconds,
                "warmup_s": warmup,
                "images_per_s": batch_size / seconds,
                "step_tflop": step_flops / 1e12,
                "achieved_tflops": step_flops / seconds / 1e12,
                "peak_memory_mb": _peak_memory_mb(device),
            }
            log(f"{name}: {seconds * 1e3:.1f} ms/step, {batch_size / seconds:.0f} images/s")
    return {"variants": results, "flops": state.flops(train_config)}


def time_sampler(config: GpuBenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    from repa.models import create_model
    from repa.transport.samplers import sample

    latent = config.resolution // 8
    model = create_model(config.model, input_size=latent, **(config.model_overrides or {})).to(device).eval()
    labels = torch.arange(config.sample_batch, device=device) % model.config.num_classes
    seeds = list(range(config.sample_batch))
    clock = _Clock(device)

    def run() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16), flash_attention(device):
            return sample(
                model.velocity,
                (model.config.in_channels, latent, latent),
                labels,
                seeds,
                mode="sde",
                num_steps=config.sample_steps,
                cfg_scale=config.cfg_scale,
                guidance_low=0.0,
                guidance_high=config.guidance_high,
                null_label=model.null_label,
            )

    _reset_peak_memory(device)
    warmup = clock.time(run)
    seconds = clock.time(run)
    log(f"sampler: {config.sample_batch / seconds:.1f} images/s ({config.sample_steps} SDE steps)")
    return {
        "settings": f"SDE, {config.sample_steps} steps, "
        f"CFG {config.cfg_scale} on t in [0, {config.guidance_high}]",
        "batch_size": config.sample_batch,
        "seconds": seconds,
        "warmup_s": warmup,
        "images_per_s": config.sample_batch / seconds,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def time_loader(config: GpuBenchConfig, log: Callable[[str], None], batch_size: int) -> dict:
    """benchmarks/bench_data.py's cached latents + features reader, in a child process."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"
    if not script.is_file():
        return {"status": "not available", "reason": f"{script} is absent (needs a source checkout)"}
    with tempfile.TemporaryDirectory(prefix="repa_gpu_loader_") as workdir:
        output = Path(workdir) / "data.json"
        command = [
            sys.executable, str(script), "--resolutions", str(config.resolution),
            "--num-images", str(config.loader_images), "--batch-size", str(batch_size),
            "--workers", str(config.loader_workers), "--runs", "1", "--passes", "2",
            "--readers", "stream_latents_features", "--output", str(output),
        ]  # fmt: skip
        log("loader: " + " ".join(command[1:]))
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return {"status": "failed", "stderr_tail": done.stderr[-3000:]}
        report = json.loads(output.read_text())
    rate = report["results"][0]["samples_per_s"]["stream_latents_features"]["median"]
    log(f"loader: {rate:.0f} images/s with {config.loader_workers} workers")
    return {"status": "ok", "images_per_s": rate, "workers": config.loader_workers, "command": command[1:]}


def run_gpu_benchmark(output: Path, dry_run: bool = False, log: Callable[[str], None] = print) -> dict:
    """Time everything above and write one JSON to `output`. Raises SystemExit with
    `no_cuda_message()` when there is no CUDA device and this is not a dry run."""
    if not torch.cuda.is_available() and not dry_run:
        raise SystemExit(no_cuda_message())
    config = dry_run_config() if dry_run else GpuBenchConfig()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # inductor's C++ build takes a minute on a small CPU
        config = replace(config, compile_backend="eager")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    started = time.perf_counter()
    log(f"repa bench --device cuda{' --dry-run' if dry_run else ''}: {device_name}")
    training = time_training(config, device, log)
    sampler = time_sampler(config, device, log)
    fitted = [v for v in training["variants"].values() if v["status"] == "ok"]
    best = max(fitted, key=lambda v: v["images_per_s"]) if fitted else None
    loader = time_loader(config, log, best["batch_size"] if best else config.batch_sizes[0])

    sheet_peak = datasheet_peak(device_name) if device.type == "cuda" else None
    matmul_peak = measured_matmul_peak(device, torch.bfloat16, 64 if dry_run else 8192)
    for variant in fitted:
        achieved = variant["achieved_tflops"] * 1e12
        variant["mfu_of_datasheet_peak"] = achieved / sheet_peak if sheet_peak else None
        variant["mfu_of_measured_matmul_peak"] = achieved / matmul_peak
    summary = {
        "best_training_images_per_s": best["images_per_s"] if best else None,
        "best_variant": best and f"batch {best['batch_size']}" + (" compiled" if best["compiled"] else ""),
        "goal_images_per_s": GOAL_IMAGES_PER_S,
        "goal_met": bool(best and not dry_run and best["images_per_s"] >= GOAL_IMAGES_PER_S),
        "loader_over_step": (
            loader["images_per_s"] / best["images_per_s"] if best and loader.get("status") == "ok" else None
        ),
    }
    summary["no_data_stall"] = summary["loader_over_step"] is not None and summary["loader_over_step"] >= 2.0
    report = {
        "benchmark": "SiT-XL/2 + REPA training step, sampler and loader on one GPU",
        "dry_run": dry_run,
        "step_function": "repa.train.step.StepRunner.run",
        "settings": asdict(config),
        "device": {
            "name": device_name,
            "datasheet_bf16_peak_tflops": sheet_peak / 1e12 if sheet_peak else None,
            "measured_bf16_matmul_peak_tflops": matmul_peak / 1e12,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpus": os.cpu_count(),
        },
        "mfu_convention": "2 x 3 x forward multiply-adds x batch per step, over the bf16 peak",
        "training": training,
        "sampler": sampler,
        "loader": loader,
        "summary": summary,
        "wall_s": time.perf_counter() - started,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {output}: {json.dumps(summary)}")
    return report
