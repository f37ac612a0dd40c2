"""Which floating-point precision a run computes in, chosen once from what the machine does fast.

`--mixed-precision auto` (the default of train, sample, curves, eval sampling, demo and bench):
  CUDA   bf16 on GPUs that multiply bf16 natively (compute capability 8.0 and newer: Ampere,
         Hopper, ...; on ROCm whatever torch reports as native), else fp16 (with a grad scaler
         when training).
  CPU    bf16 only where the CPU multiplies bf16 natively (x86 AMX-BF16 or AVX512-BF16, ARM's
         BF16 extension), confirmed by a probe that a bf16 matmul is not slower than an fp32 one;
         otherwise fp32. Without those instructions torch emulates bf16 and it is 5-400x slower
         than fp32 (docs/cpu.md has the measured figures), so a bf16 default would turn a
         demo of minutes into one of hours on a plain machine.

Explicit `no`/`fp32`, `bf16` and `fp16` win over the rule. An explicit bf16 on a CPU without
native support runs, with a warning that gives the measured slowdown.

Names follow accelerate's `mixed_precision`: "no" is fp32 ("fp32" is accepted as its synonym).
A probe can differ between processes, so training broadcasts rank 0's choice (repa/train/loop.py).
The flags are read once per process and the probe's rates cached: sampling resolves the
setting per batch at no cost.
"""

from __future__ import annotations

import functools
import platform
import sys
import warnings
from dataclasses import asdict, dataclass

import torch

# the flag's choices; "no" and "fp32" are the same precision
CHOICES = ("auto", "no", "fp32", "bf16", "fp16")
AUTOCAST_DTYPE = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# /proc/cpuinfo flags of CPUs with bf16 multiply instructions: x86 AMX-BF16 and AVX512-BF16,
# and ARM's BF16 extension (listed under "Features" on aarch64)
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
PROBE_MATMUL_SIZE = 256  # a few ms per product in fp32; ~0.1 s in emulated bf16 on the slowest CPUs


@dataclass(frozen=True)
class CpuProbe:
    """What the CPU offers for bf16: its flags, and matmul rates when they were measured."""

    capability: str  # torch's vector ISA level: AVX2, AVX512, AMX, DEFAULT, ...
    native_bf16_flags: tuple[str, ...]  # those of NATIVE_BF16_CPU_FLAGS the CPU lists
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    @property
    def bf16_slowdown(self) -> float | None:
        """fp32 rate / bf16 rate (> 1: bf16 is slower), when both were measured."""
        if self.fp32_gflops and self.bf16_gflops:
            return self.fp32_gflops / self.bf16_gflops
        return None


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, what was asked for, and why; recorded in environment.json."""

    name: str  # "no" | "bf16" | "fp16" (accelerate's names)
    requested: str
    device: str  # "cpu" | "cuda"
    reason: str
    cpu: CpuProbe | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPE[self.name]

    @property
    def label(self) -> str:
        """How the choice reads to a person: fp32, bf16 or fp16."""
        return "fp32" if self.name == "no" else self.name

    def summary(self) -> str:
        return f"precision: {self.label} ({self.reason})"

    def to_dict(self) -> dict:
        record = asdict(self)
        record["label"] = self.label
        return record


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _torch_native_bf16_flags() -> set[str]:
    """Where there is no /proc/cpuinfo (macOS, Windows): what torch's CPU probes report."""
    found = set()
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for flag, name in probes.items():
        probe = getattr(getattr(torch._C, "_cpu", None), name, None)
        if probe is not None and probe():
            found.add(flag)
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.add("bf16")  # Apple M2 and newer; M1 lacks it, and the probe below catches that
    return found


def native_bf16_flags(flags: set[str] | None = None) -> tuple[str, ...]:
    """The bf16 multiply instructions this CPU lists (from `flags`, default: this machine's)."""
    if flags is None:
        return _this_cpu_native_bf16_flags()
    return tuple(sorted(set(flags) & set(NATIVE_BF16_CPU_FLAGS)))


@functools.cache
def _this_cpu_native_bf16_flags() -> tuple[str, ...]:
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo: ask torch
        return tuple(sorted(_torch_native_bf16_flags()))
    return native_bf16_flags(flags)


def measure_bf16_against_fp32(size: int = PROBE_MATMUL_SIZE) -> tuple[float, float]:
    """(fp32 GFLOP/s, bf16 GFLOP/s) of a size x size matmul on this CPU, best of 3 each."""
    from repa.analysis.timing import measure_matmul_peak

    return (
        measure_matmul_peak(torch.float32, size, repeats=3) / 1e9,
        measure_matmul_peak(torch.bfloat16, size, repeats=3) / 1e9,
    )


@functools.cache
def probe_cpu(measure: bool = True) -> CpuProbe:
    """This CPU's bf16 support, with matmul rates when `measure` (cached for the process)."""
    rates = measure_bf16_against_fp32() if measure else (None, None)
    return CpuProbe(torch.backends.cpu.get_cpu_capability(), native_bf16_flags(), *rates)


def choose_cpu_precision(requested: str, probe: CpuProbe) -> PrecisionChoice:
    """The rule for a CPU, given its probe (pure: tests hand it a faked probe)."""
    if requested == "fp16":
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; on CPU use auto, bf16 or no")
    if requested in ("no", "fp32"):
        return PrecisionChoice("no", requested, "cpu", "asked for", probe)
    native = ", ".join(probe.native_bf16_flags)
    if requested == "bf16":
        slowdown = probe.bf16_slowdown
        if not probe.native_bf16_flags or (slowdown is not None and slowdown > 1):
            measured = f" (measured: bf16 matmuls {slowdown:.1f}x slower than fp32)" if slowdown else ""
            warnings.warn(
                f"--mixed-precision bf16 on a CPU that does not multiply bf16 natively{measured}: "
                "expect a much slower run; --mixed-precision auto picks fp32 here",
                stacklevel=3,
            )
        return PrecisionChoice("bf16", requested, "cpu", "asked for", probe)
    if requested != "auto":
        raise ValueError(f"--mixed-precision {requested!r}: choose one of {', '.join(CHOICES)}")
    if not probe.native_bf16_flags:
        reason = f"CPU ({probe.capability}) has no native bf16 multiply (no AMX-BF16 or AVX512-BF16)"
        return PrecisionChoice("no", requested, "cpu", reason, probe)
    slowdown = probe.bf16_slowdown
    if slowdown is not None and slowdown > 1:
        reason = f"CPU lists {native} but a bf16 matmul ran {slowdown:.1f}x slower than fp32"
        return PrecisionChoice("no", requested, "cpu", reason, probe)
    rates = f"; bf16 {probe.bf16_gflops:.0f} vs fp32 {probe.fp32_gflops:.0f} GFLOP/s" if slowdown else ""
    return PrecisionChoice("bf16", requested, "cpu", f"CPU multiplies bf16 natively ({native}{rates})", probe)


def choose_cuda_precision(requested: str, capability: tuple[int, int], hip: bool = False) -> PrecisionChoice:
    """The rule for a CUDA (or ROCm) GPU of this compute capability (pure: tests fake it)."""
    if requested in ("no", "fp32"):
        return PrecisionChoice("no", requested, "cuda", "asked for")
    if requested in ("bf16", "fp16"):
        return PrecisionChoice(requested, requested, "cuda", "asked for")
    if requested != "auto":
        raise ValueError(f"--mixed-precision {requested!r}: choose one of {', '.join(CHOICES)}")
    native = hip or capability >= (8, 0)  # bf16 tensor cores arrived with Ampere (sm_80)
    gpu = "ROCm GPU" if hip else f"GPU of compute capability {capability[0]}.{capability[1]}"
    if native:
        return PrecisionChoice("bf16", requested, "cuda", f"{gpu} multiplies bf16 natively")
    return PrecisionChoice("fp16", requested, "cuda", f"{gpu} has no native bf16; fp16 instead")


def resolve_precision(requested: str, device: torch.device | str | None = None) -> PrecisionChoice:
    """The precision for `requested` ("auto", "no", "fp32", "bf16", "fp16") on `device`
    (default: CUDA when available, else the CPU)."""
    if requested not in CHOICES:
        raise ValueError(f"--mixed-precision {requested!r}: choose one of {', '.join(CHOICES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        hip = torch.version.hip is not None
        if hip and requested == "auto" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("fp16", requested, "cuda", "ROCm GPU has no native bf16; fp16 instead")
        return choose_cuda_precision(requested, torch.cuda.get_device_capability(device), hip)
    if device.type != "cpu":
        raise ValueError(f"automatic precision knows CUDA and CPU devices, not {device.type!r}")
    # the matmul probe only where it can change the answer (or give an explicit bf16 its factor)
    needs_rates = requested == "bf16" or (requested == "auto" and bool(native_bf16_flags()))
    return choose_cpu_precision(requested, probe_cpu(measure=needs_rates))


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_report(size: int = 512) -> str:
    """`repa bench --probe`: the facts a timing depends on, as the README quotes them."""
    fp32, bf16 = measure_bf16_against_fp32(size)
    flags = native_bf16_flags()
    choice = resolve_precision("auto", "cpu")  # what a run decides (with its own, smaller probe)
    relative = f"bf16 {fp32 / bf16:.1f}x slower" if fp32 > bf16 else f"bf16 {bf16 / fp32:.1f}x faster"
    lines = [
        f"cpu: {cpu_model_name()}, {torch.get_num_threads()} torch threads",
        f"capability: {torch.backends.cpu.get_cpu_capability()}; native bf16 flags: "
        f"{', '.join(flags) or 'none'}",
        f"matmul {size}x{size}: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s ({relative})",
        f"--mixed-precision auto on this CPU: {choice.label} ({choice.reason})",
    ]
    if torch.cuda.is_available():
        lines.append(f"--mixed-precision auto on cuda: {resolve_precision('auto', 'cuda').summary()}")
    return "\n".join(lines)
