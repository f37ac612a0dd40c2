"""`repa bench`: every benchmark in one run, written as one JSON document.

Sections:
  train     training-step throughput (repa.analysis.train_throughput), run in this process: it
            times repa.train.step.StepRunner.run, the training loop's own step function
  sampling  interval-aware vs always-batched CFG sampling (benchmarks/bench_sampling.py)
  data      data-stream throughput (benchmarks/bench_data.py)
The last two are scripts of the source checkout, run as child processes with their own flags;
a script that is absent gives its section {"status": "not available", "reason": ...}, one that
fails gives {"status": "failed", ...} with the end of its error output. Each section that ran
has "status": "ok".

`quick=True` shrinks everything (tiny widths, batch 2, one timed round) so the whole suite runs
in about a minute: it checks that the benchmarks work, and its figures mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from repa.analysis.train_throughput import TrainBenchConfig, run_train_benchmark

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

# script -> (flags for the full run, flags for --quick); "--output FILE" is added to both.
SCRIPTS: dict[str, tuple[str, list[str], list[str]]] = {
    "sampling": (
        "bench_sampling.py",
        [],  # its defaults: ~1 minute
        ["--num-steps", "4", "--num-samples", "4", "--repeats", "1", "--hidden-size", "64", "--depth", "2"]
        + ["--num-heads", "2", "--input-size", "8"],
    ),
    "data": (
        "bench_data.py",
        ["--resolutions", "32,256", "--num-images", "512", "--runs", "3"],
        ["--resolutions", "32", "--num-images", "128", "--batch-size", "16", "--runs", "1"],
    ),
}
SCRIPT_TIMEOUT_S = {"full": 900, "quick": 180}


def quick_train_config() -> TrainBenchConfig:
    """The same variants at toy size: SiT and DINOv2 of width 64 and depth 2 / 1, batch 2."""
    return TrainBenchConfig(
        batch_size=2,
        align_depth=1,
        model_overrides=dict(depth=2, hidden_size=64, num_heads=2, projector_dim=128),
        encoder_overrides=dict(depth=1, embed_dim=64, num_heads=2),
        repeats=1,
        peak_size=512,
        peak_repeats=2,
    )


def train_config(quick: bool, low_precision: str) -> TrainBenchConfig:
    """The training benchmark `repa bench` runs: its fp32 variants, and those of `low_precision`
    (what --mixed-precision resolved to) when that is bf16."""
    config = quick_train_config() if quick else TrainBenchConfig()
    return config.only(("fp32", low_precision))


def run_script(
    name: str, quick: bool, workdir: Path, benchmarks_dir: Path = BENCHMARKS_DIR, log: Callable = print
) -> dict:
    """Run one benchmark script as a child process and return its JSON (or why there is none)."""
    filename, full_flags, quick_flags = SCRIPTS[name]
    script = benchmarks_dir / filename
    if not script.is_file():
        return {
            "status": "not available",
            "reason": f"{script} does not exist (repa bench runs it from a source checkout of repa)",
        }
    output = workdir / f"{name}.json"
    command = [sys.executable, str(script), *(quick_flags if quick else full_flags), "--output", str(output)]
    log(f"running {' '.join(command[1:])}")
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S["quick" if quick else "full"],
            cwd=benchmarks_dir.parent,
        )
    except subprocess.TimeoutExpired as error:
        return {"status": "failed", "command": command, "reason": f"timed out after {error.timeout} s"}
    wall = time.perf_counter() - started
    if done.returncode != 0 or not output.is_file():
        return {
            "status": "failed",
            "command": command,
            "returncode": done.returncode,
            "stderr_tail": done.stderr[-3000:],
        }
    return {"status": "ok", "command": command[1:], "wall_s": wall, "result": json.loads(output.read_text())}


def run_benchmarks(
    output: Path, quick: bool = False, precision: str = "auto", log: Callable[[str], None] = print
) -> dict:
    """Run the training, sampling and data benchmarks; write the JSON to `output` and the
    profile table of the training step next to it (`<output stem>.profile.txt`).

    precision (repa.precision): fp32 is always timed; bf16 as well when it is asked for or when
    `auto` picks it, so a CPU that only emulates bf16 does not spend hours on bf16 steps."""
    from repa.precision import probe_cpu, resolve_precision

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    choice = resolve_precision(precision, "cpu")
    report: dict = {
        "suite": "repa bench" + (" --quick" if quick else ""),
        "loadavg_start": list(os.getloadavg()),
        "precision": choice.to_dict(),
        "cpu": probe_cpu(measure=True).__dict__,
    }
    log(choice.summary())
    log("training-step benchmark ...")
    train, profile_table = run_train_benchmark(train_config(quick, choice.label), log=log)
    if profile_table:
        profile_path = output.with_name(output.stem + ".profile.txt")
        profile_path.write_text(
            f"torch.profiler, one step of {train['profile']['variant']}, top ops by self CPU time\n"
            f"{profile_table}\n"
        )
        train["profile"]["table_file"] = profile_path.name
    report["train"] = {"status": "ok", "result": train}
    with tempfile.TemporaryDirectory(prefix="repa_bench_") as workdir:
        for name in SCRIPTS:
            log(f"{name} benchmark ...")
            report[name] = run_script(name, quick, Path(workdir), log=log)
            if report[name]["status"] != "ok":
                log(f"{name}: {report[name]['status']}: {report[name].get('reason', '')}")
    report["loadavg_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    output.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {output}")
    return report
