"""repa.eval.curves: FID-vs-step tables, plots and the speed-up over a baseline, from fake runs.

The runs are written as training writes them (config.yaml, metrics.jsonl, committed checkpoints
with ema.safetensors) by `write_fake_run` from test_eval_sample.py; scoring uses a cheap custom
feature space (the hook the CPU demo uses), so no Inception is needed.
"""

import csv
import json

import numpy as np
import pytest
import torch

from repa.eval import curves as curves_module
from repa.eval.curves import build_curves, evaluate_model, speedup_table
from repa.eval.metrics import Evaluator
from repa.eval.npz import write_npz_streaming
from repa.eval.sample import SamplerSettings
from repa.tokenizers import create_tokenizer
from tests.test_eval_sample import tiny_model, write_fake_run

FAST = SamplerSettings(mode="ode", method="euler", num_steps=2, cfg_scale=1.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _features(images: torch.Tensor) -> torch.Tensor:
    """(B, 12): per-channel mean and std, and two quadrant means; cheap and deterministic."""
    pixels = images.float() / 255
    quadrants = pixels[:, :, :4, :4].mean(dim=(2, 3)), pixels[:, :, 4:, 4:].mean(dim=(2, 3))
    return torch.cat([pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3)), *quadrants], dim=1)


def test_speedup_table_ratios_and_not_reached():
    rows = [
        {"run": "sit", "step": 100, "images_seen": 25600, "fid": 30.0},
        {"run": "sit", "step": 400, "images_seen": 102400, "fid": 10.0},
        {"run": "sit", "step": 800, "images_seen": 204800, "fid": 10.0},  # ties: the first step counts
        {"run": "repa", "step": 50, "images_seen": 6400, "fid": 12.0},
        {"run": "repa", "step": 100, "images_seen": 12800, "fid": 9.5},
        {"run": "repa", "step": 200, "images_seen": 25600, "fid": 8.0},
        {"run": "bad", "step": 100, "images_seen": 25600, "fid": 40.0},
    ]
    table = speedup_table(rows, baseline="sit", metric="fid")
    assert table["sit"]["ratio_steps"] == 1.0 and table["sit"]["baseline_best_step"] == 400
    assert table["repa"]["step"] == 100 and table["repa"]["ratio_steps"] == 4.0
    assert table["repa"]["ratio_images"] == pytest.approx(102400 / 12800)  # batch 128 vs 256: 8x images
    assert table["bad"]["status"] == "not reached" and table["bad"]["ratio_steps"] is None
    higher = speedup_table([{**r, "is": -r["fid"]} for r in rows], baseline="sit", metric="is")
    assert higher["repa"]["ratio_steps"] == 4.0  # IS: higher is better
    with pytest.raises(ValueError, match="baseline"):
        speedup_table(rows, baseline="missing", metric="fid")


def test_curves_from_two_fake_runs(tmp_path, monkeypatch):
    repa_run = write_fake_run(tmp_path / "repa", steps=(100, 200), encoder="dinov2-b", batch_size=16)
    sit_run = write_fake_run(tmp_path / "sit", steps=(100, 200, 300), encoder="none", batch_size=32)
    reference = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    write_npz_streaming(reference, real.shape, [real])
    evaluator = Evaluator(["fd"], feature_fn=_features, feature_name="stats12", cache_dir=tmp_path / "cache")
    options = dict(ref=reference, evaluator=evaluator, num_samples=8, settings=FAST, batch_size=4)

    result = build_curves([repa_run, sit_run], tmp_path / "out", **options)
    assert result.metric == "fd" and result.baseline == "sit"  # the run without an encoder
    # table: one row per complete checkpoint (the uncommitted step-00000300 of repa is skipped)
    assert [(r["run"], r["step"]) for r in result.rows] == [
        ("repa", 100),
        ("repa", 200),
        ("sit", 100),
        ("sit", 200),
        ("sit", 300),
    ]
    repa_rows = [r for r in result.rows if r["run"] == "repa"]
    assert [r["images_seen"] for r in repa_rows] == [1600, 3200]  # step x global batch 16
    assert [r["images_seen"] for r in result.rows if r["run"] == "sit"] == [3200, 6400, 9600]
    # first checkpoint committed 0.5 h after the run started (config.yaml's mtime is later here,
    # so the first COMPLETE time is the start): hours 0, 0.5
    assert [round(r["hours"], 6) for r in repa_rows] == [0.0, 0.5]
    assert all(r["fd"] > 0 and r["num_samples"] == 8 for r in result.rows)
    # with wall-clock times in metrics.jsonl, hours count from the first record
    timed = write_fake_run(tmp_path / "timed", steps=(100,), log_time=True, start_time=1e9)
    assert curves_module.run_start_time(timed) == 1e9 + 10  # first record: step 10

    with open(result.files["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert [row["step"] for row in table] == ["100", "200", "100", "200", "300"]
    assert {"run", "step", "images_seen", "hours", "fd"} <= set(table[0])
    summary = json.loads(result.files["json"].read_text())
    assert summary["baseline"] == "sit" and len(summary["rows"]) == 5
    assert set(summary["speedup"]) == {"repa", "sit"}
    for kind in ("png", "svg"):
        assert result.files[kind].stat().st_size > 1000
    assert result.files["svg"].read_text().lstrip().startswith("<?xml")

    # the speed-up entry agrees with the table
    sit_best = min(r["fd"] for r in result.rows if r["run"] == "sit")
    entry = result.speedup["repa"]
    assert entry["baseline_best"] == sit_best
    reached = [r for r in repa_rows if r["fd"] <= sit_best]
    if reached:
        best_step = min(r["step"] for r in result.rows if r["run"] == "sit" and r["fd"] == sit_best)
        assert entry["ratio_steps"] == best_step / reached[0]["step"]
    else:
        assert entry["status"] == "not reached"
    assert result.speedup["sit"]["ratio_steps"] == 1.0

    # results are cached per run: a second call evaluates nothing (loading a model would fail)
    assert len(list((repa_run / "eval").glob("step-*.json"))) == 2
    monkeypatch.setattr(curves_module, "load_generator", lambda *a, **k: pytest.fail("re-evaluated"))
    again = build_curves([repa_run, sit_run], tmp_path / "out2", baseline=repa_run, **options)
    assert [r["fd"] for r in again.rows] == [r["fd"] for r in result.rows]
    assert again.baseline == "repa" and again.speedup["repa"]["ratio_steps"] == 1.0
    # other settings -> another cache key -> evaluated again
    with pytest.raises(pytest.fail.Exception):
        build_curves([repa_run], tmp_path / "out3", **{**options, "num_samples": 4})


def test_evaluate_model_scores_an_in_memory_model_and_restores_its_mode(tmp_path):
    model = tiny_model(seed=3).train()
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    evaluator = Evaluator(["fd"], feature_fn=_features, feature_name="stats12", cache_dir=False)
    reference = evaluator.reference(write_npz_streaming(tmp_path / "r.npz", real.shape, [real]))
    scores = evaluate_model(
        model,
        create_tokenizer("pixels", resolution=8),
        resolution=8,
        num_samples=6,
        ref=reference,
        evaluator=evaluator,
        settings=FAST,
        batch_size=4,
    )
    assert scores["num_samples"] == 6 and scores["fd"] > 0
    assert model.training  # put back in train mode


def test_curves_samples_with_the_runs_time_shift(tmp_path, monkeypatch):
    """`repa curves` samples as the runs' previews did: with their --time-shift (LightningDiT's
    preset sets one), unless a flag overrides it; runs trained with different shifts need one."""
    import repa.commands.eval as eval_command
    import repa.eval.curves as curves_module
    from repa.cli import main

    seen = []
    monkeypatch.setattr(curves_module, "build_curves", lambda *a, **k: seen.append(k["settings"]) or None)
    monkeypatch.setattr(eval_command, "evaluator_from_args", lambda args: None)

    def run_with_shift(name, shift):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(f"transport: {{time_shift: {shift}}}\n")
        return str(run)

    a, b, c = run_with_shift("a", 3.0), run_with_shift("b", 3.0), run_with_shift("c", 1.0)
    with pytest.raises(AttributeError):  # the stand-in returns no result; the settings are seen
        main(["curves", a, b, "--output", str(tmp_path / "out"), "--ref", "ref.npz"])
    assert seen[-1].time_shift == 3.0
    with pytest.raises(AttributeError):
        main(["curves", a, b, "--output", str(tmp_path / "out"), "--ref", "ref.npz", "--time-shift", "2"])
    assert seen[-1].time_shift == 2.0
    with pytest.raises(SystemExit, match="different --time-shift"):
        main(["curves", a, c, "--output", str(tmp_path / "out"), "--ref", "ref.npz"])
