"""Benchmarks: the timing tools, the FLOP convention, the step being timed, and `repa bench --quick`."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from repa.analysis.bench_suite import quick_train_config, run_script, train_config
from repa.analysis.flops import model_cost
from repa.analysis.timing import PeakRSS, interleaved_timings, measure_matmul_peak
from repa.analysis.train_throughput import (
    BenchModel,
    TrainBenchConfig,
    compare,
    experiment_config,
    make_batch,
    variant_name,
)


def test_interleaved_timings_rotate_and_measure_memory_once():
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    rounds: list[int] = []
    timed: list[str] = []
    result = interleaved_timings(
        variants, warmup=1, repeats=2, before_round=rounds.append, before_each=timed.append
    )
    times, memory, warmup_times = result.times, result.memory, result.warmup_times
    assert {k: len(v) for k, v in result.cpu_times.items()} == {"a": 2, "b": 2, "c": 2}
    assert rounds == [0, 1, 2]
    assert calls == list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert set(memory) == set("abc")
    assert timed == list("bca") + list("cab")  # untimed hook before each timed call only
    assert {k: len(v) for k, v in warmup_times.items()} == {"a": 1, "b": 1, "c": 1}
    assert all(v >= 0 for v in times["a"])


def test_peak_rss_sees_a_large_allocation():
    with PeakRSS() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time_to_poll = torch.ones(8 * 2**20).sum()  # keep the block alive while the thread polls
        del block, time_to_poll
    assert peak.increase_bytes > 48 * 2**20
    assert peak.peak_bytes >= peak.start_bytes


def test_matmul_peak_is_positive_and_finite():
    for dtype in (torch.float32, torch.bfloat16):
        flops = measure_matmul_peak(dtype, size=128, repeats=2)
        assert math.isfinite(flops) and flops > 0


def _quick_encoder(config: TrainBenchConfig):
    from repa.encoders import create_encoder

    return create_encoder(
        config.encoder,
        resolution=config.resolution,
        pretrained=False,
        arch_overrides=config.encoder_overrides,
    ).eval()


def test_the_benchmark_trains_with_the_loops_defaults():
    from repa.config import ExperimentConfig
    from repa.train.methods import get_method

    config = quick_train_config()
    experiment = experiment_config("SiT-B/2", config)
    defaults = ExperimentConfig()
    # what the benchmark varies, and nothing else
    assert (experiment.model.name, experiment.model.align_depth) == ("SiT-B/2", config.align_depth)
    assert experiment.model.hidden_size == config.model_overrides["hidden_size"]
    assert experiment.encoder.encoder == config.encoder
    for section in ("optim", "transport", "run", "tokenizer", "vae"):
        assert getattr(experiment, section) == getattr(defaults, section), section
    model = BenchModel("SiT-B/2", config, _quick_encoder(config))
    assert type(model.method) is get_method(experiment.method)
    assert model.experiment == experiment


def test_the_timed_step_trains_the_model_and_its_ema():
    config = quick_train_config()
    encoder = _quick_encoder(config)
    model = BenchModel("SiT-S/2", config, encoder)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in model.ema.model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for precision in ("fp32", "bf16"):
        for with_features in (True, False):  # cached targets, then the encoder on the images
            outcome = model.step(make_batch(config, with_features, encoder.dim, generator), precision)
            assert not outcome.skipped and outcome.samples == config.batch_size
    assert model.steps == 4  # the step index the loop's seeds and learning rate follow
    changed = [k for k, v in model.model.state_dict().items() if not torch.equal(before[k], v)]
    assert "projectors.0.0.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    assert "pos_embed" not in changed
    assert any(not torch.equal(ema_before[k], v) for k, v in model.ema.model.state_dict().items())
    (group,) = model.method.groups()
    assert len(group.optimizer.state) == len(group.params)
    flops = model.flops(config)
    assert flops["step_flops"] == 2 * 3 * flops["forward_macs_per_image"] * config.batch_size
    toy = dict(config.model_overrides, align_depth=config.align_depth)
    assert flops["forward_macs_per_image"] == model_cost("SiT-S/2", resolution=config.resolution, **toy).flops
    assert flops["projector_macs_per_image"] > 0


def test_repa_bench_quick_times_the_loops_own_step_function(monkeypatch):
    # `repa bench --quick`'s training section, in this process: every timed call (and every
    # warm-up call) must be exactly one call of StepRunner.run, the function the loop calls.
    import repa.analysis.train_throughput as throughput
    from repa.precision import resolve_precision
    from repa.train.methods import get_method
    from repa.train.step import StepRunner

    original_run = StepRunner.run
    runners: list[StepRunner] = []

    def counting_run(self, *args, **kwargs):
        runners.append(self)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(StepRunner, "run", counting_run)
    per_call: list[tuple[str, int]] = []  # (variant, StepRunner.run calls during that call)
    real_timings = throughput.interleaved_timings

    def watched_timings(variants, *args, **kwargs):
        def watch(name, fn):
            def call():
                before = len(runners)
                fn()
                per_call.append((name, len(runners) - before))

            return call

        return real_timings({name: watch(name, fn) for name, fn in variants.items()}, *args, **kwargs)

    monkeypatch.setattr(throughput, "interleaved_timings", watched_timings)
    config = train_config(quick=True, low_precision=resolve_precision("auto", "cpu").label)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy steps on shared cores: one thread waits on no other tenant
    try:
        report, _ = throughput.run_train_benchmark(config, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)

    variants = report["variants"]
    assert variants and len(per_call) == (config.warmup + config.repeats) * len(variants)
    assert all(count == 1 for _, count in per_call), per_call
    assert all(len(entry["seconds_per_step"]) == config.repeats for entry in variants.values())
    assert all(type(runner) is StepRunner for runner in runners)
    assert {type(runner.method) for runner in runners} == {get_method("repa")}
    assert report["step_function"] == "repa.train.step.StepRunner.run"
    assert all(entry["skipped_steps"] == 0 for entry in variants.values())
    # and the module keeps no step of its own to time instead
    source = inspect.getsource(throughput)
    for own_step in (".backward(", "optimizer.step(", "clip_grad_norm_", "ema.update("):
        assert own_step not in source, own_step


def test_comparisons_are_ratios_between_variants_of_one_run():
    config = TrainBenchConfig(compiled=(("SiT-B/2", "bf16"),))
    results = {
        variant_name("SiT-B/2", "fp32", "cached"): {"median_s": 6.0},
        variant_name("SiT-B/2", "bf16", "cached"): {"median_s": 2.0},
        variant_name("SiT-B/2", "bf16", "on-the-fly"): {"median_s": 3.0},
        variant_name("SiT-B/2", "bf16", "cached") + " sdpa-attention": {"median_s": 2.2},
        variant_name("SiT-B/2", "bf16", "cached") + " compiled": {"median_s": 4.0},
    }
    out = compare(results, config)
    assert out == pytest.approx(
        {
            "SiT-B/2 bf16 speed-up over fp32": 3.0,
            "SiT-B/2 bf16 cached speed-up over on-the-fly": 1.5,
            "SiT-B/2 bf16 matmul-attention speed-up over fused sdpa": 1.1,
            "SiT-B/2 bf16 compiled speed-up over eager": 0.5,
        }
    )
    assert compare({}, config) == {}  # nothing measured, nothing compared (no outside anchors)


def test_cpu_bf16_attention_matches_the_fused_kernel():
    # The CPU bf16 path (two matmuls) and torch's fused kernel agree to bf16 rounding, forward
    # and backward, and the switch that the benchmark's before/after variants use works.
    from repa.models.layers import Attention

    attention = Attention(64, 4)
    x = torch.randn(2, 16, 64)
    outputs, grads = {}, {}
    for kernel in ("matmul", "sdpa"):
        attention.cpu_low_precision_kernel = kernel
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(inputs)
        out.float().square().sum().backward()
        outputs[kernel], grads[kernel] = out.float(), inputs.grad
    torch.testing.assert_close(outputs["matmul"], outputs["sdpa"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads["matmul"], grads["sdpa"], atol=5e-2, rtol=5e-2)
    # fp32 always takes the fused kernel: identical whatever the switch says
    attention.cpu_low_precision_kernel = "matmul"
    reference = attention(x)
    attention.cpu_low_precision_kernel = "sdpa"
    assert torch.equal(attention(x), reference)


def test_missing_script_is_reported_not_available(tmp_path):
    section = run_script("sampling", quick=True, workdir=tmp_path, benchmarks_dir=tmp_path / "nowhere")
    assert section["status"] == "not available"
    assert "bench_sampling.py" in section["reason"]


def _numbers(value, path="") -> list[tuple[str, float]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _numbers(v, f"{path}[{i}]")]
    return []


@pytest.mark.slow
def test_repa_bench_quick_writes_every_section(tmp_path):
    from repa.cli import main
    from repa.precision import resolve_precision

    output = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    for section in ("train", "sampling", "data"):
        assert report[section]["status"] in ("ok", "not available"), report[section]
    train = report["train"]["result"]
    # bf16 steps only where --mixed-precision auto picks bf16 (a CPU that multiplies it natively)
    low = resolve_precision("auto", "cpu").label
    assert report["precision"]["label"] == low
    expected = {"SiT-S/2 fp32 cached", "SiT-B/2 fp32 cached"}
    if low == "bf16":
        expected |= {
            "SiT-S/2 bf16 cached",
            "SiT-B/2 bf16 cached",
            "SiT-B/2 bf16 on-the-fly",
            "SiT-B/2 bf16 cached sdpa-attention",
        }
    else:
        expected |= {"SiT-B/2 fp32 on-the-fly"}
    assert set(train["variants"]) == expected
    for entry in train["variants"].values():
        assert entry["median_s"] > 0 and entry["samples_per_s"] > 0
        assert entry["utilisation_of_measured_peak"] > 0 and entry["peak_rss_mb"] > 0
    assert train["matmul_peak_gflops"][low]["best"] > 0
    assert (tmp_path / train["profile"]["table_file"]).is_file()
    assert train["step_function"] == "repa.train.step.StepRunner.run"
    numbers = _numbers(report)
    assert len(numbers) > 50
    bad = [(path, v) for path, v in numbers if not math.isfinite(v)]
    assert not bad, bad
    assert Path(output).stat().st_size > 0


def test_bench_drops_the_precisions_it_is_not_asked_for():
    from repa.analysis.train_throughput import TrainBenchConfig, variant_specs

    full = TrainBenchConfig()
    assert any(spec.precision == "bf16" for spec in variant_specs(full).values())
    fp32_only = full.only(("fp32",))
    specs = variant_specs(fp32_only)
    assert {spec.precision for spec in specs.values()} == {"fp32"}
    # the cached-vs-on-the-fly comparison and the profile survive, in fp32
    assert "SiT-B/2 fp32 on-the-fly" in specs and fp32_only.profile == "SiT-B/2 fp32 cached"
    assert fp32_only.sdpa_attention == ()  # a comparison of the CPU's low-precision attention path
    assert variant_specs(full.only(("fp32", "bf16"))) == variant_specs(full)


def test_bench_probe_prints_the_machine_and_the_automatic_choice(capsys):
    from repa.cli import main

    assert main(["bench", "--probe"]) == 0
    out = capsys.readouterr().out
    for needle in ("capability:", "native bf16 flags:", "GFLOP/s", "--mixed-precision auto on this CPU:"):
        assert needle in out


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU suite's own code at toy sizes (on the CPU here),
    so the script a GPU machine runs cannot rot unnoticed."""
    import subprocess

    output = tmp_path / "gpu.json"
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "--dry-run", str(output)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] and report["step_function"] == "repa.train.step.StepRunner.run"
    variants = report["training"]["variants"]
    assert {(v["batch_size"], v["compiled"]) for v in variants.values()} == {
        (2, False), (4, False), (2, True), (4, True)
    }  # fmt: skip
    for variant in variants.values():
        assert variant["status"] == "ok" and variant["images_per_s"] > 0
        assert variant["mfu_of_measured_matmul_peak"] > 0
    assert report["sampler"]["images_per_s"] > 0
    assert report["loader"]["status"] == "ok" and report["loader"]["images_per_s"] > 0
    summary = report["summary"]
    assert summary["loader_over_step"] == pytest.approx(
        report["loader"]["images_per_s"] / summary["best_training_images_per_s"]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_device_cuda_without_cuda_says_so_in_one_line():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "repa.cli", "bench", "--device", "cuda"], capture_output=True, text=True
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "no CUDA device" in lines[0] or "without CUDA" in lines[0], done.stderr
