"""Honest comparisons: interval maths, arms of seeds, the speed-up interval, the FLOP axis, class
accuracy, the random-teacher control and the alignment probe (docs/comparisons.md).

Runs are fake run directories (tests/test_eval_sample.write_fake_run) with per-seed weights;
scoring uses a cheap feature space, so no Inception is needed.
"""

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from repa.config import ExperimentConfig
from repa.eval.curves import Classifier, build_curves, flops_per_step, group_arms, parse_arm_option
from repa.eval.metrics import Evaluator
from repa.eval.npz import write_npz_streaming
from repa.eval.probe import cknna, linear_probe_accuracy
from repa.eval.sample import SamplerSettings
from repa.eval.stats import (
    bootstrap_interval,
    crossing_step,
    mean_interval,
    proportion_interval,
    speedup_interval,
    t_cdf,
    t_interval,
    t_quantile,
)
from tests.test_eval_sample import tiny_model, write_fake_run

FAST = SamplerSettings(mode="ode", method="euler", num_steps=2, cfg_scale=1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- interval maths ------------------------------------------------------------------------------

# Student's t 97.5% quantiles (tables; scipy.stats.t.ppf(0.975, df) gives the same digits)
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977987, 9: 2.2621571627409915}


def test_t_quantiles_and_t_interval_on_fixed_numbers():
    for df, value in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-9)
        assert t_quantile(0.025, df) == pytest.approx(-value, abs=1e-9)
    values = [20.1, 21.4, 19.8]
    interval = t_interval(values)
    half = T975[2] * np.std(values, ddof=1) / math.sqrt(3)
    assert interval.method == "t" and interval.n == 3
    assert (interval.low, interval.high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    try:
        from scipy import stats
    except ImportError:  # the tables above still hold the maths
        return
    for df in (1, 2, 3, 5, 8, 30, 101):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-8)
        for x in (-4.0, -0.3, 0.0, 1.7):
            assert t_cdf(x, df) == pytest.approx(stats.t.cdf(x, df), abs=1e-12)
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-10)


def test_proportion_interval_is_wilsons():
    """Wilson's interval: the p with (x/n - p)^2 = z^2 p (1 - p) / n, z the normal 97.5% quantile;
    (5, 10) and (0, 10) also against the textbook digits."""
    z = 1.959963984540054
    for successes, trials in ((5, 10), (0, 10), (19, 512), (3, 512), (512, 512)):
        share = successes / trials
        # (1 + z^2/n) p^2 - (2 share + z^2/n) p + share^2 = 0
        roots = np.sort(np.roots([1 + z * z / trials, -(2 * share + z * z / trials), share * share]).real)
        interval = proportion_interval(successes, trials)
        assert (interval.low, interval.high) == pytest.approx(tuple(roots), abs=1e-9), (successes, trials)
        assert interval.mean == share and interval.method == "wilson"
    assert (proportion_interval(5, 10).low, proportion_interval(0, 10).high) == pytest.approx(
        (0.2366, 0.2775), abs=1e-4
    )
    with pytest.raises(ValueError, match="successes <= trials"):
        proportion_interval(11, 10)


def test_bootstrap_interval_against_numpy_and_the_choice_by_seed_count():
    values = [3.1, 2.7, 3.9, 3.3, 2.2, 3.0]
    rng = np.random.default_rng(7)
    means = np.asarray(values)[rng.integers(0, 6, size=(2000, 6))].mean(axis=1)
    expected = np.quantile(means, [0.025, 0.975])
    interval = bootstrap_interval(values, seed=7)
    assert (interval.low, interval.high) == pytest.approx(tuple(expected), abs=1e-12)
    assert interval.mean == pytest.approx(np.mean(values))
    assert mean_interval(values).method == "bootstrap"  # >= 5 seeds
    assert mean_interval(values[:4]).method == "t"
    single = mean_interval(values[:1])
    assert single.method == "none" and single.low is None and not single.has_interval


def test_crossing_step_interpolates_between_evaluated_steps():
    assert crossing_step([100, 200, 300], [50.0, 30.0, 10.0], 20.0) == pytest.approx(250.0)
    assert crossing_step([100, 200], [50.0, 30.0], 60.0) == 100.0  # already there
    assert crossing_step([100, 200], [50.0, 30.0], 10.0) is None
    assert crossing_step([100, 200], [0.1, 0.5], 0.3, higher_is_better=True) == pytest.approx(150.0)


def test_speedup_interval_covers_the_true_factor_in_90_of_100_repetitions():
    """Curves f(k s) with k = 2 for the arm: it reaches the baseline's value at step s_B / 2,
    a true factor of 2; five seeds per arm with Gaussian noise of sd 1 on a curve falling 200."""
    steps = np.arange(100, 1601, 100, dtype=float)

    def curve(speed):
        return 200 * np.exp(-speed * steps / 500) + 10

    covered = 0
    for repetition in range(100):
        rng = np.random.default_rng(repetition)
        base = curve(1)[None] + rng.normal(0, 1.0, (5, len(steps)))
        arm = curve(2)[None] + rng.normal(0, 1.0, (5, len(steps)))
        result = speedup_interval(steps, base, arm, resamples=400, seed=repetition)
        covered += result.low <= 2.0 <= result.high
    assert covered >= 90, covered
    # no effect: the same curve for both arms -> an interval around 1 that includes it
    rng = np.random.default_rng(0)
    same = speedup_interval(steps, curve(1) + rng.normal(0, 1, (5, 16)), curve(1) + rng.normal(0, 1, (5, 16)))
    assert same.includes_one


# ---- arms of seeds in `repa curves` --------------------------------------------------------------


def write_seed_run(root, name, seed, encoder="none", steps=(100, 200), **config_changes):
    """A fake run with run.seed = seed and weights that depend on the seed."""
    run = write_fake_run(root / name, steps=steps, encoder=encoder)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["run"].update(seed=seed, exp_name=name)
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    projector_dims = (16,) if encoder != "none" else ()
    metadata = {"config": json.dumps(ExperimentConfig.from_dict(config).to_dict())}
    for index, step in enumerate(steps):
        model = tiny_model(seed=step + 1000 * seed, projector_dims=projector_dims, scale=0.05 / (index + 1))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, run / "checkpoints" / f"step-{step:08d}" / "ema.safetensors", metadata=metadata)
    return run


def _features(images: torch.Tensor) -> torch.Tensor:
    pixels = images.float() / 255
    return torch.cat(
        [pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3)), pixels[:, :, :4, :4].mean(dim=(2, 3))], 1
    )


def test_arms_of_seeds_give_bands_intervals_and_class_accuracy(tmp_path):
    runs = [write_seed_run(tmp_path, f"sit-seed{s}", s) for s in range(3)]
    runs += [write_seed_run(tmp_path, f"repa-seed{s}", s, encoder="dinov2-b") for s in range(3)]
    reference = tmp_path / "ref.npz"
    real = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    write_npz_streaming(reference, real.shape, [real])
    evaluator = Evaluator(["fd"], feature_fn=_features, feature_name="stats9", cache_dir=False)
    always_class_0 = Classifier(
        "always-0", lambda images: torch.eye(4)[torch.zeros(len(images), dtype=torch.long)]
    )
    result = build_curves(
        runs,
        tmp_path / "out",
        ref=reference,
        evaluator=evaluator,
        num_samples=8,
        settings=FAST,
        batch_size=8,
        classifier=always_class_0,
        progress=False,
    )
    # arms detected from the configs (they differ only in run.seed and exp_name)
    assert result.arms == {
        "sit": [f"sit-seed{s}" for s in range(3)],
        "repa": [f"repa-seed{s}" for s in range(3)],
    }
    assert result.baseline == "sit-seed0" and result.baseline_arm == "sit"
    assert {(r["arm"], r["seed"]) for r in result.rows} == {(a, s) for a in ("sit", "repa") for s in range(3)}
    # per arm and step: 3 seeds, a t-interval around the mean of the three runs' values
    for entry in result.arm_rows:
        values = [r["fd"] for r in result.rows if r["arm"] == entry["arm"] and r["step"] == entry["step"]]
        assert entry["seeds"] == 3 and entry["fd_interval"] == "t"
        assert entry["fd"] == pytest.approx(np.mean(values))
        assert (entry["fd_low"], entry["fd_high"]) == pytest.approx(
            (t_interval(values).low, t_interval(values).high)
        )
        assert entry["fd_low"] < entry["fd"] < entry["fd_high"]
    # class accuracy: balanced labels over 4 classes, a classifier that always says 0 -> exactly 1/4
    assert all(r["class_accuracy"] == 0.25 for r in result.rows)
    # curves.csv: the run's value beside its arm's mean and interval; arms.csv: one row per arm/step
    with open(result.files["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert {"arm", "seed", "fd", "fd_arm_mean", "fd_arm_low", "fd_arm_high", "class_accuracy"} <= set(
        table[0]
    )
    with open(result.files["arms_csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
    # the plot shades each arm's band (a filled polygon per arm) and draws each seed faintly
    svg = result.files["svg"].read_text()
    assert len(re.findall(r"id=\"\w*PolyCollection_", svg)) == 2
    assert (tmp_path / "out" / "fd_vs_images.png").is_file() and (
        tmp_path / "out" / "fd_vs_hours.png"
    ).is_file()
    # the arm speed-up: seeds (3, 3), an interval (or "not reached"), and whether it includes 1
    entry = result.arm_speedup["repa"]
    assert tuple(entry["seeds"]) == (3, 3)
    if entry["factor"] is not None:
        assert entry["low"] <= entry["high"] and isinstance(entry["includes_one"], bool)
    assert result.arm_speedup["sit"]["factor"] == 1.0  # the baseline arm against itself
    summary = json.loads(result.files["json"].read_text())
    assert summary["arms"] == result.arms and summary["classifier"] == "always-0"

    # sampling noise: the last checkpoint of each run scored with 3 sample sets
    spread = build_curves(
        runs[:1],
        tmp_path / "out2",
        ref=reference,
        evaluator=evaluator,
        num_samples=8,
        settings=FAST,
        batch_size=8,
        sampling_seeds=3,
        progress=False,
    ).sampling_spread["sit-seed0"]
    assert spread["step"] == 200 and len(set(spread["values"])) == 3 and spread["std"] > 0


def test_explicit_arms_refuse_runs_that_differ_in_more_than_the_seed(tmp_path):
    from pathlib import Path

    def config(seed, depth=2):
        values = ExperimentConfig.from_dict({"model": {"depth": depth}, "run": {"seed": seed}}).to_dict()
        values["run"]["exp_name"] = f"run{seed}-{depth}"  # bookkeeping differs too
        return values

    runs = [Path("a"), Path("b"), Path("c")]
    names = {run: run.name for run in runs}
    configs = {runs[0]: config(0), runs[1]: config(1), runs[2]: config(2, depth=4)}
    assert group_arms(runs[:2], names, configs, {"x": runs[:2]}) == {"x": runs[:2]}
    with pytest.raises(ValueError, match=r"differ in model\.depth \(2 vs 4\).*only in run\.seed"):
        group_arms(runs, names, configs, {"x": runs})
    # auto-detection puts the deeper run in its own arm; a repeated seed is refused
    assert group_arms(runs, names, configs) == {"a": runs[:2], "c": [runs[2]]}
    configs[runs[1]] = config(0)
    with pytest.raises(ValueError, match="same seed"):
        group_arms(runs[:2], names, configs)
    assert parse_arm_option(["repa=r1,r2", "sit=r3"]) == {"repa": ["r1", "r2"], "sit": ["r3"]}
    with pytest.raises(ValueError, match="NAME=RUN"):
        parse_arm_option(["repa"])
    # through `repa curves`: the refusal comes before anything is sampled
    first = write_seed_run(tmp_path, "d2", 0)
    second = write_seed_run(tmp_path, "d4", 1, model__depth=4)
    evaluator = Evaluator(["fd"], feature_fn=_features, feature_name="stats9", cache_dir=False)
    with pytest.raises(ValueError, match=r"--arm mixed: runs d2 and d4 differ in model\.depth"):
        build_curves(
            [first, second],
            tmp_path / "o",
            ref=tmp_path / "none.npz",
            evaluator=evaluator,
            arms={"mixed": ["d2", "d4"]},
        )


# ---- the compute axis ----------------------------------------------------------------------------


def test_flop_axis_of_cached_and_on_the_fly_repa_differs_by_encoder_forwards(tmp_path):
    from repa.analysis.flops import count_flops
    from repa.encoders import create_encoder

    config = ExperimentConfig.from_dict(
        {
            "model": {"name": "SiT-S/4", "hidden_size": 64, "depth": 2, "num_heads": 2, "align_depth": 1},
            "data": {"resolution": 64, "batch_size": 8},
            "tokenizer": {"tokenizer": "pixels"},
            "encoder": {"encoder": "dinov2-s"},
            "run": {"method": "repa"},
        }
    ).to_dict()
    per_step = {}
    for name, cached in (("cached", True), ("on-the-fly", False)):
        run = tmp_path / name
        run.mkdir()
        (run / "targets.json").write_text(json.dumps({"latents_cached": False, "features_cached": cached}))
        per_step[name], note = flops_per_step(run, config)
        assert per_step[name] is not None, note
    with torch.device("meta"):
        encoder = create_encoder("dinov2-s", resolution=64, pretrained=False)
        images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    encoder_forward = count_flops(encoder, images)
    assert encoder_forward > 0
    step = 300  # train_flops = step x per-step FLOPs; images seen = step x batch 8
    assert step * (per_step["on-the-fly"] - per_step["cached"]) == encoder_forward * step * 8
    # a run trained before targets.json existed has no FLOP axis (and says why)
    (tmp_path / "old").mkdir()
    missing, note = flops_per_step(tmp_path / "old", config)
    assert missing is None and "no targets.json" in note


# ---- the random-teacher control ------------------------------------------------------------------


def test_random_encoder_control_is_seeded_and_reads_no_weights(tmp_path, monkeypatch):
    import repa.encoders.registry as registry
    from repa.encoders import build_local_vit, create_encoder, create_encoders, save_local_encoder

    monkeypatch.setattr(registry, "download_state_dict", lambda *a, **k: pytest.fail("downloaded weights"))
    monkeypatch.setattr(registry, "read_state_dict_file", lambda *a, **k: pytest.fail("read a weight file"))
    small = {"depth": 1}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    control = create_encoder("dinov2-s:random", resolution=32, arch_overrides=small)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is untouched
    again = create_encoder("dinov2-vit-s:random", resolution=32, arch_overrides=small)  # an alias
    other_seed = create_encoder("dinov2-s:random:1", resolution=32, arch_overrides=small)
    assert control.name == "dinov2-s:random" and other_seed.name == "dinov2-s:random:1"
    state, same, other = control.state_dict(), again.state_dict(), other_seed.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state)
    # the architecture of dinov2-s: same keys and shapes, same tokens
    plain = create_encoder("dinov2-s", resolution=32, pretrained=False, arch_overrides=small).state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in state.items()}
    assert control(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 4, 384)
    with pytest.raises(ValueError, match="--encoder-weights"):
        create_encoder("dinov2-s:random", resolution=32, weights="w.pth")
    assert [e.name for e in create_encoders("dinov2-s:random", resolution=32, arch_overrides=small)] == [
        "dinov2-s:random"
    ]
    # a local encoder file: its architecture, random weights, never its stored ones
    monkeypatch.undo()
    kwargs = {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}
    vit = build_local_vit("vit_tiny_patch16_224", kwargs)
    path = tmp_path / "teacher.safetensors"
    norm = (0.5, 0.5, 0.5)
    save_local_encoder(str(path), vit, arch="vit_tiny_patch16_224", arch_kwargs=kwargs, mean=norm, std=norm,
                       input_size=8, patch_size=2)  # fmt: skip
    trained, random_teacher = create_encoder(str(path)), create_encoder(f"{path}:random")
    assert random_teacher.name == "teacher:random"
    a, b = trained.state_dict(), random_teacher.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


# ---- alignment diagnostics -----------------------------------------------------------------------


def test_cknna_is_one_for_identical_features_and_invariant_to_rotation_and_scale():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 12, generator=generator)
    assert cknna(features, features) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    other = torch.randn(64, 20, generator=generator)
    base = cknna(features, other)
    assert cknna(features.double() @ rotation, other) == pytest.approx(base, abs=1e-10)
    assert cknna(3.7 * features.double(), other) == pytest.approx(base, abs=1e-10)
    assert cknna(features.double() @ rotation * 0.2, features) == pytest.approx(1.0, abs=1e-10)
    assert abs(base) < 0.5  # unrelated features align far less


def _cknna_reference(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """CKNNA by its definition, one pair at a time: alpha(i, j) = 1 when j != i is among the k
    nearest of i under both kernels; unbiased HSIC of the masked kernels; normalised."""
    n = a.shape[0]
    kernels = {"a": (a @ a.T).tolist(), "b": (b @ b.T).tolist()}

    def nearest(kernel, i):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -kernel[i][j])
        return set(others[:k])

    def hsic(x, y):
        mask = [[float(j in nearest(x, i) and j in nearest(y, i)) for j in range(n)] for i in range(n)]
        p = [[mask[i][j] * x[i][j] if i != j else 0.0 for j in range(n)] for i in range(n)]
        q = [[mask[i][j] * y[i][j] if i != j else 0.0 for j in range(n)] for i in range(n)]
        trace = sum(p[i][j] * q[j][i] for i in range(n) for j in range(n))
        sums = sum(map(sum, p)) * sum(map(sum, q)) / ((n - 1) * (n - 2))
        cross = sum(sum(p[i][m] * q[m][j] for m in range(n)) for i in range(n) for j in range(n))
        return (trace + sums - 2 * cross / (n - 2)) / (n * (n - 3))

    ka, kb = kernels["a"], kernels["b"]
    return hsic(ka, kb) / math.sqrt(hsic(ka, ka) * hsic(kb, kb))


def test_cknna_matches_a_per_pair_reference():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    b = a[:, :3] + 0.5 * torch.randn(12, 3, generator=generator, dtype=torch.float64)
    for k in (3, 5):
        assert cknna(a, b, topk=k) == pytest.approx(_cknna_reference(a, b, k), abs=1e-12)


def test_linear_probe_separates_linearly_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 16, generator=generator) * 3
    features = centres[labels] + torch.randn(200, 16, generator=generator)
    assert linear_probe_accuracy(features, labels) > 0.9
    # no relation between 64-d noise and the labels: the training split is fitted almost
    # perfectly, the held-out split stays near chance (the probe scores held-out images only)
    noise = torch.randn(200, 64, generator=generator)
    assert linear_probe_accuracy(noise, labels) < 0.5


def test_repa_probe_command_on_a_run(tmp_path):
    from repa.cli import main
    from repa.data.synthetic import write_synthetic_dataset
    from repa.encoders import build_local_vit, save_local_encoder

    run = write_fake_run(tmp_path / "run", steps=(100,))
    write_synthetic_dataset(tmp_path / "images", num_images=24, resolution=8, num_classes=4, seed=0)
    kwargs = {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}
    norm = (0.5, 0.5, 0.5)
    save_local_encoder(str(tmp_path / "e.safetensors"), build_local_vit("vit_tiny_patch16_224", kwargs),
                       arch="vit_tiny_patch16_224", arch_kwargs=kwargs, mean=norm, std=norm, input_size=8,
                       patch_size=2)  # fmt: skip
    output = tmp_path / "probe"
    argv = [
        "probe",
        str(run),
        "--encoder",
        str(tmp_path / "e.safetensors"),
        "--data",
        str(tmp_path / "images"),
    ]
    assert main([*argv, "--output", str(output), "--noise-levels", "0,0.5", "--knn", "5"]) == 0
    record = json.loads((output / "probe.json").read_text())
    assert record["num_images"] == 24 and record["encoder"] == "e"
    assert [(r["layer"], r["t"]) for r in record["rows"]] == [(1, 0.0), (2, 0.0), (1, 0.5), (2, 0.5)]
    assert all(-1.0 <= r["cknna"] <= 1.0 + 1e-9 and 0.0 <= r["linear_probe"] <= 1.0 for r in record["rows"])
    assert (output / "probe.png").stat().st_size > 1000


# ---- the demo ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_with_seeds_and_arms_reports_bands_and_intervals(tmp_path):
    from repa.cli import main

    output = tmp_path / "demo"
    argv = [
        "demo",
        "--quick",
        "--seeds",
        "2",
        "--arms",
        "sit,repa,repa-random-teacher",
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    summary = json.loads((output / "summary.json").read_text())
    report = (output / "report.md").read_text()
    assert summary["arms"] == ["sit", "repa", "repa-random-teacher"] and summary["seeds"] == [0, 1]
    runs = {row["run"] for row in summary["rows"]}
    assert runs == {f"{arm}-seed{seed}" for arm in summary["arms"] for seed in (0, 1)}
    # every arm's curve is a mean of two seeds with a shaded interval
    svg = (output / "report" / "fd_vs_step.svg").read_text()
    assert len(re.findall(r"id=\"\w*PolyCollection_", svg)) == 3
    assert all(row["seeds"] == 2 and row["fd_low"] < row["fd_high"] for row in summary["arm_rows"])
    assert "mean over 2 seeds with its 95% interval shaded" in report
    assert re.search(r"\| repa \| 20 \| 2 \| [\d.]+ \| \[[\d.]+, [\d.]+\] \|", report)
    assert "no interval" not in report.split("## Speed-up")[0]
    # the speed-up comes with seeds per arm (and an interval whenever the arm reaches the baseline)
    for arm in ("repa", "repa-random-teacher"):
        entry = summary["arm_speedup"][arm]
        assert tuple(entry["seeds"]) == (2, 2) and (entry["factor"] is None or entry["low"] is not None)
    # class accuracy beside FD, the probe plot, and the random teacher computed its tokens each step
    assert all(0.0 <= row["class_accuracy"] <= 1.0 for row in summary["rows"])
    assert "probe.png" in report and (output / "report" / "probe.png").is_file()
    targets = json.loads((output / "runs" / "repa-random-teacher-seed0" / "targets.json").read_text())
    assert targets == {"latents_cached": False, "features_cached": False}


@pytest.mark.slow
def test_quick_demo_compares_the_objectives_as_arms(tmp_path):
    """Issue 15: `repa demo --quick --arms sit,repa,reg,sra,dispersive`, one seed: each arm trains
    with its own method (its own terms logged), every checkpoint is scored, and the report has each
    arm's curve (plotted, in the table) and samples."""
    from repa.cli import main
    from repa.train.logging import read_metrics

    arms = ["sit", "repa", "reg", "sra", "dispersive"]
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--arms", ",".join(arms), "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    report = (output / "report.md").read_text()
    svg = (output / "report" / "fd_vs_step.svg").read_text()
    with open(output / "report" / "curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert summary["arms"] == arms and set(summary["speedup"]) == set(arms)
    own_terms = {
        "sit": set(),
        "repa": {"loss_align"},
        "reg": {"loss_align", "loss_cls"},
        "sra": {"loss_sra"},  # SRA and the dispersive loss as published: no teacher
        "dispersive": {"loss_dispersive"},
    }
    for arm in arms:
        curve = [row for row in rows if row["arm"] == arm]
        assert [int(row["step"]) for row in curve] == [10, 20], arm  # every checkpoint scored
        assert all(math.isfinite(float(row["fd"])) for row in curve), arm
        assert f"<!-- {arm + ' (baseline)' if arm == 'sit' else arm} -->" in svg  # its line's legend
        assert f"| {arm} | 20 | 1 |" in report
        assert (output / "report" / f"samples_{arm}.png").is_file() and f"report/samples_{arm}.png" in report
        logged = set(read_metrics(output / "runs" / arm)[-1]) & set().union(*own_terms.values())
        assert logged == own_terms[arm], (arm, logged)


def test_curves_command_says_when_the_speedup_interval_includes_one():
    from repa.commands.curves import describe_arm_speedup

    entry = {
        "factor": 1.4,
        "low": 0.8,
        "high": 2.1,
        "includes_one": True,
        "seeds": (3, 3),
        "factor_flops": 1.3,
    }
    text = describe_arm_speedup(entry)
    assert "1.40x fewer steps" in text and "[0.80, 2.10]" in text and "includes 1" in text
    assert "per training FLOP 1.30x" in text
    assert "includes 1" not in describe_arm_speedup({**entry, "low": 1.1, "includes_one": False})
    assert "no interval" in describe_arm_speedup({**entry, "low": None, "high": None, "includes_one": None})
    assert describe_arm_speedup({"factor": None, "status": "not reached"}) == "not reached"
