"""`--mixed-precision auto`: bf16 only where the hardware multiplies it natively, on CPU and CUDA."""

import json
import warnings

import pytest
import torch

from repa import precision as precision_module
from repa.precision import (
    CpuProbe,
    choose_cpu_precision,
    choose_cuda_precision,
    native_bf16_flags,
    resolve_precision,
)

# /proc/cpuinfo flags of the machines the README quotes (abridged)
AMD_EPYC_AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}
XEON_AVX512_NO_BF16 = AMD_EPYC_AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
SAPPHIRE_RAPIDS = XEON_AVX512_NO_BF16 | {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}


def probe(flags, fp32=117.0, bf16=0.3, capability="AVX2"):
    return CpuProbe(capability, native_bf16_flags(flags), fp32, bf16)


@pytest.mark.parametrize("flags", [AMD_EPYC_AVX2, XEON_AVX512_NO_BF16, set()])
def test_auto_never_picks_bf16_on_a_cpu_without_native_bf16(flags):
    # even a probe that (wrongly) says bf16 is fast does not override missing instructions
    for bf16_rate in (0.3, 1000.0):
        choice = choose_cpu_precision("auto", probe(flags, bf16=bf16_rate))
        assert choice.name == "no" and choice.label == "fp32"
        assert "no native bf16" in choice.reason


def test_auto_picks_bf16_on_a_cpu_with_amx_when_the_probe_agrees():
    choice = choose_cpu_precision("auto", probe(SAPPHIRE_RAPIDS, fp32=130.0, bf16=790.0, capability="AMX"))
    assert choice.name == "bf16" and choice.autocast_dtype == torch.bfloat16
    assert "amx_bf16" in choice.reason and "790" in choice.reason
    # the flags are there, but the probe says bf16 is slower: fp32, and the reason says why
    slow = choose_cpu_precision("auto", probe(SAPPHIRE_RAPIDS, fp32=130.0, bf16=40.0))
    assert slow.name == "no" and "3.2x slower" in slow.reason


def test_explicit_choices_win_and_bf16_without_native_support_warns_with_the_factor():
    assert choose_cpu_precision("no", probe(SAPPHIRE_RAPIDS, bf16=790.0)).name == "no"
    assert choose_cpu_precision("fp32", probe(SAPPHIRE_RAPIDS, bf16=790.0)).name == "no"
    with pytest.warns(UserWarning, match=r"390\.0x slower"):
        choice = choose_cpu_precision("bf16", probe(AMD_EPYC_AVX2, fp32=117.0, bf16=0.3))
    assert choice.name == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native and fast: no warning
        choose_cpu_precision("bf16", probe(SAPPHIRE_RAPIDS, fp32=130.0, bf16=790.0))
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        choose_cpu_precision("fp16", probe(SAPPHIRE_RAPIDS))


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")],
)
def test_auto_on_cuda_follows_the_compute_capability(capability, expected):
    choice = choose_cuda_precision("auto", capability)
    assert choice.name == expected and choice.device == "cuda"
    assert f"{capability[0]}.{capability[1]}" in choice.reason
    assert choose_cuda_precision("no", capability).name == "no"
    assert choose_cuda_precision("fp16", capability).name == "fp16"


def test_resolve_on_cuda_reads_the_device_capability(monkeypatch):
    # the faked device capability reaches the rule through resolve_precision, as on a real GPU
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_precision("auto", "cuda").name == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_precision("auto", "cuda").name == "bf16"


def _forget_this_cpu():
    precision_module.probe_cpu.cache_clear()
    precision_module._this_cpu_native_bf16_flags.cache_clear()


def test_resolve_on_cpu_reads_the_flags_and_skips_the_probe_without_them(monkeypatch):
    measured = []

    def fake_rates(size=256):
        measured.append(size)
        return 130.0, 790.0

    monkeypatch.setattr(precision_module, "measure_bf16_against_fp32", fake_rates)
    _forget_this_cpu()
    try:
        monkeypatch.setattr(precision_module, "cpu_flags", lambda: set(AMD_EPYC_AVX2))
        assert resolve_precision("auto", "cpu").name == "no"
        assert measured == []  # no native instructions: nothing to measure, no start-up cost
        _forget_this_cpu()
        monkeypatch.setattr(precision_module, "cpu_flags", lambda: set(SAPPHIRE_RAPIDS))
        assert resolve_precision("auto", "cpu").name == "bf16"
        assert measured  # native instructions: the probe confirmed them
    finally:
        _forget_this_cpu()
    with pytest.raises(ValueError, match="choose one of"):
        resolve_precision("tf32", "cpu")


def test_the_probe_measures_real_rates():
    fp32, bf16 = precision_module.measure_bf16_against_fp32(64)
    assert fp32 > 0 and bf16 > 0


@pytest.mark.slow
def test_train_without_a_precision_flag_records_the_automatic_choice(tmp_path):
    """The issue's command, at a batch the slow CPU runs in seconds: no precision flag needed."""
    from repa.cli import main
    from repa.data.build import build_shards
    from repa.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "images", num_images=16, resolution=32, num_classes=4, seed=0)
    build_shards(str(tmp_path / "images"), tmp_path / "D", resolution=32, shard_size=8, workers=1)
    argv = ["train", "--data", str(tmp_path / "D"), "--output-dir", str(tmp_path / "R"), "--model", "SiT-S/2"]
    argv += ["--tokenizer", "pixels", "--resolution", "32", "--encoder", "none", "--max-train-steps", "2"]
    argv += ["--batch-size", "4", "--depth", "2", "--hidden-size", "64", "--num-heads", "2"]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "R").iterdir()
    recorded = json.loads((run_dir / "environment.json").read_text())["mixed_precision"]
    expected = resolve_precision("auto")
    assert recorded["requested"] == "auto"
    assert recorded["name"] == expected.name and recorded["reason"] == expected.reason


def test_the_flag_offers_exactly_the_choices_the_rule_knows():
    from repa.config import PRECISIONS  # the torch-free copy the argument parsers use

    assert PRECISIONS == precision_module.CHOICES
