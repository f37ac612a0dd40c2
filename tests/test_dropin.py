"""repa as a drop-in for REPA and REPA-E users (docs/dropin.md): every argparse flag of REPA's
train.py / generate.py and REPA-E's train_repae.py / train_ldm_only.py / generate.py, with the
values their READMEs use, is accepted with its meaning or refused naming the repa equivalent;
Heun's interval guidance as REPA decides it; sampling SiT-convention weights; the timestep shift;
REPA-E's pretrained discriminator, BatchNorm momentum and legacy LPIPS rescale."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from repa.cli import build_parser
from repa.config import config_from_args, load_preset
from tests.test_train import encoder_file, shards  # noqa: F401 (fixtures)
from tests.test_train_repae import repae_config, vae_file  # noqa: F401 (fixture)

# ---- the flags, as each script's argparse declares them (names only; no leading --) ------------

REPA_TRAIN = """output-dir exp-name logging-dir report-to sampling-steps resume-step model num-classes
encoder-depth fused-attn qk-norm data-dir resolution batch-size allow-tf32 mixed-precision epochs
max-train-steps checkpointing-steps gradient-accumulation-steps learning-rate adam-beta1 adam-beta2
adam-weight-decay adam-epsilon max-grad-norm seed num-workers path-type prediction cfg-prob enc-type
proj-coeff weighting legacy""".split()
REPAE_TRAIN = """output-dir exp-name logging-dir report-to sampling-steps resume-step
continue-train-exp-dir wandb-history-path model num-classes encoder-depth qk-norm fused-attn
bn-momentum compile data-dir resolution batch-size allow-tf32 mixed-precision epochs max-train-steps
checkpointing-steps gradient-accumulation-steps learning-rate adam-beta1 adam-beta2 adam-weight-decay
adam-epsilon max-grad-norm seed num-workers path-type prediction cfg-prob enc-type proj-coeff
weighting vae vae-ckpt disc-pretrained-ckpt loss-cfg-path vae-learning-rate disc-learning-rate
vae-align-proj-coeff""".split()
REPAE_LDM_ONLY = """output-dir exp-name logging-dir report-to sampling-steps resume-step
continue-train-exp-dir wandb-history-path model num-classes encoder-depth qk-norm fused-attn compile
data-dir resolution batch-size allow-tf32 mixed-precision epochs max-train-steps checkpointing-steps
gradient-accumulation-steps learning-rate adam-beta1 adam-beta2 adam-weight-decay adam-epsilon
max-grad-norm seed num-workers path-type prediction cfg-prob enc-type proj-coeff weighting vae
vae-latents-name vae-ckpt""".split()
REPA_GENERATE = """global-seed tf32 ckpt sample-dir model num-classes encoder-depth resolution
fused-attn qk-norm vae per-proc-batch-size num-fid-samples mode cfg-scale projector-embed-dims
path-type num-steps heun guidance-low guidance-high legacy""".split()
REPAE_GENERATE = """global-seed tf32 sample-dir exp-path train-steps pproc-batch-size
num-fid-samples mode cfg-scale path-type num-steps heun guidance-low guidance-high""".split()
# BooleanOptionalAction flags also come as --no-NAME.
BOOLEAN_OPTIONAL = {"fused-attn", "qk-norm", "legacy", "compile", "allow-tf32", "tf32", "heun"}


@pytest.fixture
def manifest_shards(tmp_path):
    """A shard folder whose manifest says 1000 samples (what --epochs reads)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    manifest = {"format": "repa-shards/1", "num_samples": 1000, "shards": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


@pytest.fixture
def loss_yaml(tmp_path):
    """REPA-E's configs/l1_lpips_kl_gan.yaml, as published."""
    path = tmp_path / "l1_lpips_kl_gan.yaml"
    path.write_text(
        "model:\n  vq_model:\n    quantize_mode: vae\nlosses:\n  discriminator_start: 0\n"
        "  discriminator_factor: 1.0\n  discriminator_weight: 0.1\n  quantizer_weight: 1.0\n"
        '  perceptual_loss: "lpips"\n  perceptual_weight: 1.0\n  reconstruction_loss: "l1"\n'
        "  reconstruction_weight: 1.0\n  lecam_regularization_weight: 0.0\n  kl_weight: 1e-6\n"
        "  logvar_init: 0.0\n"
    )
    return str(path)


def train_config(*flags: str):
    args = build_parser().parse_args(["train", *flags])
    return config_from_args(args)


DEFAULT = None  # filled lazily: the config with no flags


def unchanged(config) -> bool:
    global DEFAULT
    DEFAULT = DEFAULT or train_config()
    return config.to_dict() == DEFAULT.to_dict()


# (flags, check of the resolved config) or (flags, text of the refusal). Values: the READMEs'.
TRAIN_CASES = [
    (["--output-dir=exps"], lambda c: c.run.output_dir == "exps"),
    (["--exp-name=linear-dinov2-b-enc8"], lambda c: c.run.exp_name == "linear-dinov2-b-enc8"),
    (["--logging-dir=logs"], "into the run directory"),
    (["--report-to=wandb"], lambda c: c.run.report_to == "wandb"),
    (["--sampling-steps=10000"], lambda c: c.run.sample_every == 10000),
    (["--resume-step=0"], lambda c: c.run.resume == "none"),
    (["--resume-step=50000"], lambda c: c.run.resume == "step:50000"),
    (["--continue-train-exp-dir=exps/old"], "--resume PATH"),
    (["--wandb-history-path=history.json"], "metrics.jsonl"),
    (["--model=SiT-XL/2"], lambda c: c.model.name == "SiT-XL/2"),
    (["--model=SiT-XL/1"], lambda c: c.model.name == "SiT-XL/1"),
    (["--num-classes=1000"], lambda c: c.model.num_classes == 1000),
    (["--encoder-depth=8"], lambda c: c.model.align_depth == 8),
    (["--encoder-depth=4"], lambda c: c.model.align_depth == 4),
    (["--fused-attn"], unchanged),
    (["--no-fused-attn"], unchanged),
    (["--qk-norm"], lambda c: c.model.qk_norm is True),
    (["--no-qk-norm"], lambda c: c.model.qk_norm is False),
    (["--bn-momentum=0.1"], lambda c: c.vae.bn_momentum == 0.1),
    (["--bn-momentum=0.05"], lambda c: c.vae.bn_momentum == 0.05),
    (["--compile"], lambda c: c.run.compile is True),
    (["--no-compile"], lambda c: c.run.compile is False),
    (["--data-dir=data"], lambda c: c.data.data == "data"),
    (["--resolution=256"], lambda c: c.data.resolution == 256),
    (["--resolution=512"], lambda c: c.data.resolution == 512),
    (["--batch-size=256"], lambda c: c.data.batch_size == 256),
    (["--allow-tf32"], lambda c: c.run.allow_tf32 is True),
    (["--no-allow-tf32"], lambda c: c.run.allow_tf32 is False),
    (["--mixed-precision=fp16"], lambda c: c.run.mixed_precision == "fp16"),
    (["--mixed-precision=no"], lambda c: c.run.mixed_precision == "no"),
    # 1000 samples // 64 = 15 steps per epoch; REPA stops at whichever of the two ends first
    (["--epochs=2", "--batch-size=64"], lambda c: c.run.max_train_steps == 30),
    (["--epochs=1400", "--batch-size=64", "--max-train-steps=100"], lambda c: c.run.max_train_steps == 100),
    (["--max-train-steps=400000"], lambda c: c.run.max_train_steps == 400000),
    (["--checkpointing-steps=50000"], lambda c: c.run.checkpointing_steps == 50000),
    (["--gradient-accumulation-steps=1"], lambda c: c.optim.gradient_accumulation_steps == 1),
    (["--learning-rate=1e-4"], lambda c: c.optim.learning_rate == 1e-4),
    (["--adam-beta1=0.9"], lambda c: c.optim.adam_beta1 == 0.9),
    (["--adam-beta2=0.999"], lambda c: c.optim.adam_beta2 == 0.999),
    (["--adam-weight-decay=0."], lambda c: c.optim.adam_weight_decay == 0.0),
    (["--adam-epsilon=1e-08"], lambda c: c.optim.adam_epsilon == 1e-8),
    (["--max-grad-norm=1.0"], lambda c: c.optim.max_grad_norm == 1.0),
    (["--seed=0"], lambda c: c.run.seed == 0),
    (["--num-workers=4"], lambda c: c.data.num_workers == 4),
    (["--path-type=linear"], lambda c: c.transport.path_type == "linear"),
    (["--path-type=cosine"], lambda c: c.transport.path_type == "cosine"),
    (["--prediction=v"], unchanged),
    (["--prediction=x"], "velocity prediction only"),
    (["--cfg-prob=0.1"], lambda c: c.model.class_dropout_prob == 0.1),
    (["--enc-type=dinov2-vit-b"], lambda c: c.encoder.encoder == "dinov2-vit-b"),
    (["--proj-coeff=0.5"], lambda c: c.model.proj_coeff == 0.5),
    (["--weighting=uniform"], lambda c: c.transport.time_sampler == "uniform"),
    (["--weighting=lognormal"], lambda c: c.transport.time_sampler == "lognormal"),
    # labels dropped in train.py and again in the model: kept with probability 0.9 * 0.9
    (["--legacy"], lambda c: abs(c.model.class_dropout_prob - 0.19) < 1e-12),
    (["--legacy", "--cfg-prob=0.2"], lambda c: abs(c.model.class_dropout_prob - 0.36) < 1e-12),
    (["--no-legacy"], unchanged),
    (["--vae=f8d4"], lambda c: c.tokenizer.tokenizer == "f8d4"),
    (["--vae=f16d32"], lambda c: c.tokenizer.tokenizer == "f16d32"),
    (["--vae-ckpt=pretrained/sdvae/sdvae-f8d4.pt"], lambda c: c.tokenizer.tokenizer_weights.endswith(".pt")),
    (["--vae-latents-name=e2e-vavae"], unchanged),
    (
        ["--disc-pretrained-ckpt=pretrained/sdvae/sdvae-f8d4-discriminator-ckpt.pt"],
        lambda c: c.vae.disc_pretrained_ckpt.endswith("ckpt.pt") and c.method == "repa-e",
    ),
    (
        ["--loss-cfg-path=LOSS_YAML"],
        lambda c: (
            c.method == "repa-e"
            and (c.vae.l1_weight, c.vae.lpips_weight, c.vae.kl_weight, c.vae.gan_weight)
            == (1.0, 1.0, 1e-6, 0.1)
        ),
    ),
    (["--vae-learning-rate=1e-4"], lambda c: c.vae.vae_learning_rate == 1e-4),
    (["--disc-learning-rate=1e-4"], lambda c: c.vae.disc_learning_rate == 1e-4),
    (["--vae-align-proj-coeff=1.5"], lambda c: c.vae.vae_align_coeff == 1.5),
    (["--vae-align-proj-coeff=1.0"], lambda c: c.vae.vae_align_coeff == 1.0),
]


@pytest.mark.parametrize("flags, expected", TRAIN_CASES, ids=[" ".join(f) for f, _ in TRAIN_CASES])
def test_train_flag(flags, expected, manifest_shards, loss_yaml):
    flags = [f.replace("LOSS_YAML", loss_yaml) for f in flags]
    if any(f.startswith("--epochs") for f in flags):
        flags.append(f"--data={manifest_shards}")
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            train_config(*flags)
    else:
        assert expected(train_config(*flags))


def test_every_training_flag_has_a_case():
    covered = {f.split("=")[0][2:] for flags, _ in TRAIN_CASES for f in flags}
    for name in {*REPA_TRAIN, *REPAE_TRAIN, *REPAE_LDM_ONLY}:
        assert name in covered, name
        if name in BOOLEAN_OPTIONAL:
            assert f"no-{name}" in covered, name


def test_loss_yaml_refuses_what_repa_cannot_do(tmp_path, loss_yaml):
    text = Path(loss_yaml).read_text()
    for old, new, field in [
        ("discriminator_start: 0", "discriminator_start: 20000", "discriminator_start"),
        ('reconstruction_loss: "l1"', 'reconstruction_loss: "l2"', "reconstruction_loss"),
        ("lecam_regularization_weight: 0.0", "lecam_regularization_weight: 0.1", "lecam"),
    ]:
        path = tmp_path / f"{field}.yaml"
        path.write_text(text.replace(old, new))
        with pytest.raises(ValueError, match=field):
            train_config(f"--loss-cfg-path={path}")


def test_epochs_without_a_manifest_names_the_alternative(tmp_path):
    with pytest.raises(ValueError, match="--max-train-steps"):
        train_config("--epochs=10", f"--data={tmp_path}")


def test_readme_commands(manifest_shards, loss_yaml):
    """The training commands of REPA's and REPA-E's READMEs, pasted as they are."""
    data = manifest_shards
    repa = train_config(*"""--report-to=wandb --allow-tf32 --mixed-precision=fp16 --seed=0 --path-type=linear
        --prediction=v --weighting=uniform --model=SiT-XL/2 --enc-type=dinov2-vit-b --proj-coeff=0.5
        --encoder-depth=8 --output-dir=exps --exp-name=linear-dinov2-b-enc8 --resolution=512""".split(),
        f"--data-dir={data}")  # fmt: skip
    assert (repa.method, repa.model.name, repa.data.resolution, repa.run.mixed_precision) == (
        "repa", "SiT-XL/2", 512, "fp16"
    )  # fmt: skip
    repae = train_config(*f"""--max-train-steps=400000 --report-to=wandb --allow-tf32 --mixed-precision=fp16
        --seed=0 --data-dir={data} --output-dir=exps --batch-size=256 --path-type=linear --prediction=v
        --weighting=uniform --model=SiT-XL/2 --checkpointing-steps=50000 --loss-cfg-path={loss_yaml}
        --vae=f8d4 --vae-ckpt=pretrained/sdvae/sdvae-f8d4.pt
        --disc-pretrained-ckpt=pretrained/sdvae/sdvae-f8d4-discriminator-ckpt.pt --enc-type=dinov2-vit-b
        --proj-coeff=0.5 --encoder-depth=8 --vae-align-proj-coeff=1.5 --bn-momentum=0.1
        --exp-name=sit-xl-dinov2-b-enc8-repae-sdvae-0.5-1.5-400k""".split())  # fmt: skip
    assert (repae.method, repae.tokenizer.tokenizer, repae.vae.vae_align_coeff) == ("repa-e", "f8d4", 1.5)
    ldm = train_config(*f"""--max-train-steps=4000000 --report-to=wandb --allow-tf32 --mixed-precision=fp16
        --seed=0 --data-dir={data} --batch-size=256 --path-type=linear --prediction=v --weighting=uniform
        --model=SiT-XL/1 --checkpointing-steps=50000 --vae=f16d32
        --vae-ckpt=pretrained/e2e-vavae/e2e-vavae-400k.pt --vae-latents-name=e2e-vavae
        --learning-rate=1e-4 --enc-type=dinov2-vit-b --proj-coeff=0.5 --encoder-depth=8 --output-dir=exps
        --exp-name=sit-xl-1-dinov2-b-enc8-ldm-only-e2e-vavae-0.5-4m""".split())  # fmt: skip
    assert (ldm.method, ldm.tokenizer.tokenizer, ldm.model.name) == ("repa", "f16d32", "SiT-XL/1")


def test_no_prefix_matching():
    """An abbreviation is never read as another flag (REPA's --vae once matched several)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--vae-learning", "1e-4"])


# ---- repa sample ------------------------------------------------------------------------------


def sample_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["sample", *flags])


def fake_generator(**overrides):
    config = dict(num_classes=1000, align_depth=8, projector_out_dims=[768], qk_norm=False)
    config.update(overrides)
    return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(**config)), resolution=256)


def _source(args):
    from repa.dropin import resolve_sample_source

    return resolve_sample_source(args)


def _settings(args):
    from repa.commands.sample import sampler_settings_from_args

    return sampler_settings_from_args(args)


def _batch(args, world_size):
    from repa.dropin import sample_batch_size

    return sample_batch_size(args, world_size)


def _check(args):
    from repa.dropin import check_architecture

    check_architecture(fake_generator(), args)
    return True


SAMPLE_CASES = [
    (["X.pt", "--global-seed=3"], lambda a: a.seed == 3),
    (["X.pt", "--tf32"], lambda a: a.tf32 is True),
    (["X.pt", "--no-tf32"], lambda a: a.tf32 is False),
    # REPA's train.py checkpoints carry no config: decoded as its generate.py does (--vae ema)
    (["--ckpt", "X.pt"], lambda a: _source(a)["path"] == "X.pt"),
    (["--ckpt", "X.pt"], lambda a: _source(a)["tokenizer"] == "sd-vae-ft-ema"),
    (["X.pt", "--sample-dir", "samples", "--output", "o.npz"], "not both"),
    (["X.pt", "--model", "SiT-XL/2"], lambda a: _source(a)["model"] == "SiT-XL/2"),
    (["X.pt", "--num-classes=1000"], _check),
    (["X.pt", "--num-classes=10"], "disagrees with the weights"),
    (["X.pt", "--encoder-depth=8"], _check),
    (["X.pt", "--encoder-depth=4"], "disagrees"),
    (["X.pt", "--resolution=256"], _check),
    (["X.pt", "--resolution=512"], "disagrees"),
    (["X.pt", "--fused-attn"], _check),
    (["X.pt", "--no-fused-attn"], _check),
    (["X.pt", "--qk-norm"], "disagrees"),
    (["X.pt", "--no-qk-norm"], _check),
    (["X.pt", "--vae", "ema"], lambda a: _source(a)["tokenizer"] == "sd-vae-ft-ema"),
    (["X.pt", "--vae", "mse"], lambda a: _source(a)["tokenizer"] == "sd-vae-ft-mse"),
    (["X.pt", "--per-proc-batch-size=64"], lambda a: _batch(a, world_size=8) == 512),
    (["X.pt", "--pproc-batch-size=256"], lambda a: _batch(a, world_size=2) == 512),
    (["X.pt", "--num-fid-samples", "50000"], lambda a: a.num_samples == 50000),
    (["X.pt", "--mode=sde"], lambda a: _settings(a).mode == "sde"),
    (["X.pt", "--mode", "ode"], lambda a: _settings(a).mode == "ode"),
    (["X.pt", "--cfg-scale=1.8"], lambda a: _settings(a).cfg_scale == 1.8),
    (["X.pt", "--projector-embed-dims=768"], _check),
    (["X.pt", "--projector-embed-dims=768,1024"], "disagrees"),
    (["X.pt", "--path-type=linear"], lambda a: _source(a)["path_type"] == "linear"),
    (["X.pt", "--num-steps=250"], lambda a: _settings(a).num_steps == 250),
    (["X.pt", "--heun", "--mode", "ode"], lambda a: _settings(a).method == "heun"),
    (["X.pt", "--no-heun"], lambda a: _settings(a).method == "euler"),
    (["X.pt", "--guidance-low", "0.0"], lambda a: _settings(a).guidance_low == 0.0),
    (["X.pt", "--guidance-high=0.7"], lambda a: _settings(a).guidance_high == 0.7),
    (["X.pt", "--legacy"], _check),
    (["X.pt", "--no-legacy"], _check),
    (["--exp-path", "runs/x", "--train-steps", "400000"], lambda a: _source(a)["checkpoint_step"] == 400000),
    (["--exp-path", "runs/x", "X.pt"], "name the weights once"),
    (["X.pt", "--time-convention", "sit"], lambda a: _source(a)["reverse_time"] is True),
    (["X.pt", "--time-convention", "repa"], lambda a: _source(a)["reverse_time"] is False),
    (["X.pt", "--timestep-shift", "0.3"], lambda a: abs(_settings(a).time_shift - 1 / 0.3) < 1e-12),
    (["X.pt", "--time-shift", "3"], lambda a: _settings(a).time_shift == 3.0),
]


@pytest.mark.parametrize("flags, expected", SAMPLE_CASES, ids=[" ".join(f) for f, _ in SAMPLE_CASES])
def test_sample_flag(flags, expected):
    args = sample_args(*flags, *([] if "--sample-dir" in flags else ["--output=o.npz"]))
    if isinstance(expected, str):
        from repa.dropin import check_architecture, resolve_sample_source, sample_output_path

        with pytest.raises(ValueError, match=expected):
            resolve_sample_source(args)
            sample_output_path(args, "X.pt")
            check_architecture(fake_generator(), args)
    else:
        assert expected(args)


def test_every_generation_flag_has_a_case():
    covered = {f.split("=")[0][2:] for flags, _ in SAMPLE_CASES for f in flags if f.startswith("--")}
    for name in {*REPA_GENERATE, *REPAE_GENERATE}:
        assert name in covered, name
        if name in BOOLEAN_OPTIONAL:
            assert f"no-{name}" in covered, name


def test_sample_dir_names_the_output():
    from repa.dropin import sample_output_path

    args = sample_args("--ckpt", "exps/x/checkpoints/0400000.pt", "--sample-dir", "samples")
    assert sample_output_path(args, args.ckpt) == "samples/0400000-cfg-1.8-0.0-0.7-seed-0-sde.npz"


def test_repae_experiment_directory(tmp_path):
    """REPA-E's layout: the VAE comes from the checkpoint when it holds one (REPA-E training)."""
    from repa.dropin import resolve_sample_source

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "args.json").write_text(
        json.dumps({"model": "SiT-XL/2", "vae": "f8d4", "vae_ckpt": "p/sdvae-f8d4.pt", "path_type": "linear"})
    )
    checkpoint = {"ema": {}, "vae": {}, "args": argparse.Namespace(vae="f8d4"), "steps": 400000}  # REPA-E's
    torch.save(checkpoint, tmp_path / "checkpoints" / "0400000.pt")
    found = resolve_sample_source(sample_args("--exp-path", str(tmp_path), "--train-steps", "400000"))
    weights = str(tmp_path / "checkpoints" / "0400000.pt")
    assert found["path"] == weights and found["tokenizer_weights"] == weights
    assert (found["tokenizer"], found["model"], found["tokenizer_stats"]) == (
        "f8d4", "SiT-XL/2", "p/sdvae-f8d4-latents-stats.pt"
    )  # fmt: skip
    torch.save({"ema": {}}, tmp_path / "checkpoints" / "0400000.pt")  # LDM-only: the VAE of args.json
    found = resolve_sample_source(sample_args("--exp-path", str(tmp_path), "--train-steps", "400000"))
    assert found["tokenizer_weights"] == "p/sdvae-f8d4.pt"


# ---- samplers ---------------------------------------------------------------------------------


def class_velocity(x, t, labels):
    """A closed-form field that depends on the label (the null class 2 differs from 0 and 1)."""
    rate = torch.tensor([0.5, -0.3, 1.2], dtype=x.dtype)[labels][:, None]
    return rate * x + (1 + t[:, None]) * torch.tensor([1.0, 2.0, -1.0], dtype=x.dtype)[labels][:, None]


def repa_heun(x, labels, num_steps, scale, low, high, corrector_at="t_cur"):
    """REPA's euler_sampler(heun=True), written out: both slopes guided iff low <= t_cur <= high
    (corrector_at="t_next": the corrector's guidance decided at its own time instead)."""

    def velocity(x, t, guided):
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype)
        cond = class_velocity(x, t_batch, labels)
        if not guided:
            return cond
        uncond = class_velocity(x, t_batch, torch.full_like(labels, 2))
        return uncond + scale * (cond - uncond)

    grid = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        guided = low <= t_cur <= high
        d_cur = velocity(x, t_cur, guided)
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = velocity(x_next, t_next, guided if corrector_at == "t_cur" else low <= t_next <= high)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def test_heun_interval_guidance_is_decided_as_repa_does():
    from repa.transport import sample

    labels = torch.tensor([0, 1, 0])
    noise = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # edges at 0.75 (between 0.8 and 0.7) and 0.35 (between 0.4 and 0.3): two steps cross one
    ours = sample(class_velocity, noise, labels, mode="ode", method="heun", num_steps=10,
                  cfg_scale=2.5, guidance_low=0.35, guidance_high=0.75, null_label=2)  # fmt: skip
    reference = repa_heun(noise, labels, 10, 2.5, 0.35, 0.75)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    # the rule matters here: deciding the corrector's guidance at t_next gives another result
    decided_at_next = repa_heun(noise, labels, 10, 2.5, 0.35, 0.75, corrector_at="t_next")
    assert (decided_at_next - reference).abs().max() > 1e-2


def test_time_shift_is_lightningdits_in_our_convention():
    """LightningDiT's shift s on its grid u (0 noise -> 1 data): u' = s u / (1 + (s - 1) u); our
    grid is t = 1 - u, and --time-shift 1/s must visit exactly t' = 1 - u'."""
    from repa.transport import time_grid

    s = 0.3
    theirs = [i / 4 for i in range(5)]
    expected = [1 - s * u / (1 + (s - 1) * u) for u in theirs]
    assert time_grid("ode", 4, 1 / s) == pytest.approx(expected, abs=1e-15)
    assert time_grid("ode", 2, 1 / s)[1] == pytest.approx(0.7692307692307692)  # by hand: (5/3)/(13/6)
    assert time_grid("ode", 4, 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_lightningdit_preset_sets_its_shift():
    preset = load_preset("configs/lightningdit_xl1_vavae.yaml")
    assert preset["transport"]["time_shift"] == pytest.approx(1 / 0.3)


def test_repa_preset_decodes_as_repa_published():
    preset = load_preset("configs/repa_sit_xl2.yaml")
    assert preset["tokenizer"] == {"tokenizer": "sd-vae-ft-mse", "decode_tokenizer": "sd-vae-ft-ema"}


MU, STD = 1.5, 0.5  # the data distribution N(MU, STD^2) per dimension


class _Tokens(nn.Module):
    """(B, C, H, W) -> (B, HW, D): each token carries its pixel's C values, zero-padded."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return torch.cat([tokens, tokens.new_zeros(*tokens.shape[:2], self.width - tokens.shape[2])], -1)


class _Time(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, t):
        return t[:, None].expand(-1, self.width).clone()


class _NoLabel(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, y, *args, **kwargs):
        return torch.zeros(y.shape[0], self.width, dtype=torch.float64)


class _SiTGaussian(nn.Module):
    """SiT's convention (u = 1 data): E[x - e | x_u] with x_u = u x + (1 - u) e, x ~ N(MU, STD^2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, tokens, c):
        u = c[:, 0][:, None, None]
        x_u = tokens[..., : self.channels]
        variance = u**2 * STD**2 + (1 - u) ** 2
        return MU + (u * STD**2 - (1 - u)) / variance * (x_u - u * MU)


def sit_convention_gaussian(reverse_time: bool) -> nn.Module:
    """A SiT whose network is the closed-form SiT-convention field; the time conversion around it
    is the model's own (what --time-convention sit turns on)."""
    from repa.models import create_model

    width = 8
    model = create_model("SiT-S/1", input_size=2, in_channels=4, depth=1, hidden_size=width, num_heads=1,
                         num_classes=2, reverse_time=reverse_time).double()  # fmt: skip
    model.x_embedder, model.t_embedder, model.y_embedder = _Tokens(width), _Time(width), _NoLabel(width)
    model.blocks = nn.ModuleList()
    model.final_layer = _SiTGaussian(4)
    with torch.no_grad():
        model.pos_embed.zero_()
    return model.eval()


def test_time_convention_sit_samples_a_gaussian():
    """The probability-flow ODE of a Gaussian maps noise e to MU + STD e: each sample is known."""
    from repa.transport import sample

    noise = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(3, dtype=torch.long)
    reverse_time = _source(sample_args("X.pt", "--time-convention", "sit"))["reverse_time"]
    out = sample(sit_convention_gaussian(reverse_time).velocity, noise, labels, mode="ode", method="heun",
                 num_steps=50)  # fmt: skip
    assert (out - (MU + STD * noise)).abs().max() < 2e-3
    wrong = sample(sit_convention_gaussian(False).velocity, noise, labels, mode="ode", method="heun",
                   num_steps=50)  # fmt: skip
    assert (wrong - (MU + STD * noise)).abs().max() > 1.0


# ---- REPA-E -----------------------------------------------------------------------------------


def test_disc_pretrained_ckpt_loads_repae_layout_strictly(tmp_path):
    from repa.tokenizers.losses import NLayerDiscriminator, load_discriminator

    torch.manual_seed(0)
    theirs = NLayerDiscriminator()
    path = tmp_path / "sdvae-f8d4-discriminator-ckpt.pt"
    torch.save(theirs.state_dict(), path)  # REPA-E: a bare state dict, keys main.{i}.*
    ours = NLayerDiscriminator()
    load_discriminator(ours, path)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    state = theirs.state_dict()
    del state["main.2.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing keys: main.2.weight"):
        load_discriminator(NLayerDiscriminator(), path)
    torch.save({**theirs.state_dict(), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="unexpected keys: extra.weight"):
        load_discriminator(NLayerDiscriminator(), path)


def lpips_by_hand(lpips, x, y, legacy):
    """LPIPS v0.1 written out: REPA-E's published code maps its [-1, 1] inputs by 2x - 1 again,
    then the scaling layer ((x - shift) / scale with LPIPS's constants), VGG taps,
    channel-normalised squared differences, the 1x1 linear weights, spatial mean, sum over taps."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    if legacy:
        x, y = x * 2.0 - 1.0, y * 2.0 - 1.0
    fx, fy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    for block, weight in zip(lpips.slices, lpips.linear):
        fx, fy = block(fx), block(fy)
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += ((nx - ny).pow(2) * weight).sum(1).mean((1, 2))
    return total


def test_lpips_legacy_rescale_matches_the_published_formula():
    from repa.tokenizers.losses import LPIPS

    torch.manual_seed(0)
    fixed = LPIPS(pretrained=False)
    legacy = LPIPS(pretrained=False, legacy_rescale=True)
    legacy.load_state_dict(fixed.state_dict())
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(legacy(x, y), lpips_by_hand(fixed, x, y, legacy=True))
        torch.testing.assert_close(fixed(x, y), lpips_by_hand(fixed, x, y, legacy=False))
        assert (legacy(x, y) - fixed(x, y)).abs().min() > 1e-4  # the option changes the value


def test_repae_starts_from_the_pretrained_discriminator_with_its_bn_momentum(
    shards,  # noqa: F811
    encoder_file,  # noqa: F811
    vae_file,  # noqa: F811
    tmp_path,
):
    from repa.tokenizers.losses import NLayerDiscriminator
    from repa.train.methods.base import MethodContext
    from repa.train.methods.repae import REPAEMethod
    from repa.train.setup import build_parts

    config = repae_config(shards, encoder_file, vae_file, tmp_path)
    torch.manual_seed(5)
    pretrained = NLayerDiscriminator(num_layers=config.vae.disc_layers)
    torch.save(pretrained.state_dict(), tmp_path / "discriminator.pt")
    config.vae.disc_pretrained_ckpt = str(tmp_path / "discriminator.pt")
    config.vae.bn_momentum = 0.25
    torch.manual_seed(0)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"), REPAEMethod.model_options)
    method = REPAEMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    assert method.sit.bn.momentum == 0.25
    loaded = method.vae_loss.discriminator.state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(loaded[key], value), key


# ---- decoding with the tokenizer the training latents came from -------------------------------


def test_decode_tokenizer_record(tmp_path):
    from repa.runs import decode_tokenizer

    mse = {"tokenizer": {"tokenizer": "sd-vae-ft-mse", "tokenizer_weights": "w.pt", "tokenizer_stats": None}}
    assert decode_tokenizer(mse, tmp_path) == {
        "tokenizer": "sd-vae-ft-mse", "weights": "w.pt", "stats": None, "in_checkpoint": False
    }  # fmt: skip
    repa_pairing = {"tokenizer": {"tokenizer": "sd-vae-ft-mse", "decode_tokenizer": "sd-vae-ft-ema"}}
    assert decode_tokenizer(repa_pairing, tmp_path)["tokenizer"] == "sd-vae-ft-ema"
    (tmp_path / "e2e-vae.pt").write_bytes(b"")  # a checkpoint holding its own trained VAE
    assert decode_tokenizer({"tokenizer": {"tokenizer": "f8d4"}}, tmp_path)["in_checkpoint"]


def test_repae_samples_decode_with_the_checkpoints_own_vae(shards, encoder_file, vae_file, tmp_path):  # noqa: F811
    """A REPA-E checkpoint's ema.safetensors names its exported VAE, and repa sample decodes with
    it, not with the VAE the run started from."""
    from safetensors import safe_open

    from repa.eval.checkpoints import load_generator
    from repa.tokenizers import create_tokenizer
    from repa.train.loop import train

    config = repae_config(shards, encoder_file, vae_file, tmp_path, max_train_steps=1, checkpointing_steps=1)
    result = train(config)
    last = result.run_dir / "checkpoints" / "step-00000001"
    with safe_open(str(last / "ema.safetensors"), "pt") as handle:
        record = json.loads(handle.metadata()["decode_tokenizer"])
    assert record == {"tokenizer": "e2e-vae.pt", "weights": None, "stats": "e2e-vae-latents-stats.pt",
                      "in_checkpoint": True}  # fmt: skip
    generator = load_generator(result.run_dir)
    trained = create_tokenizer(str(last / "e2e-vae.pt")).state_dict()
    initial = create_tokenizer(vae_file).state_dict()
    decoder = generator.tokenizer.state_dict()
    assert all(torch.equal(decoder[k], v) for k, v in trained.items())
    assert any(not torch.equal(decoder[k], v) for k, v in initial.items())  # the VAE did train


def test_previews_and_eval_every_sample_with_the_models_time_shift():
    from repa.config import ExperimentConfig
    from repa.train.loop import _sampler_for

    config = ExperimentConfig.from_dict({"transport": {"time_shift": 3.0}})
    assert _sampler_for(config, 10, 1.0).time_shift == 3.0


def test_repa_sample_in_generate_py_spelling_makes_the_same_set(tmp_path):
    """generate.py's flags through `repa sample` give the samples repa's own spelling gives."""
    import numpy as np

    from repa.cli import main
    from tests.test_eval_sample import write_fake_run

    run = write_fake_run(tmp_path / "run")
    weights = run / "checkpoints" / "step-00000200" / "ema.safetensors"
    theirs = [
        "sample",
        "--ckpt",
        str(weights),
        "--sample-dir",
        str(tmp_path / "s"),
        *"""--num-fid-samples 4
        --mode ode --num-steps 3 --per-proc-batch-size 2 --global-seed 1 --heun --num-classes 4 --resolution 8
        --encoder-depth 1 --timestep-shift 0.5 --no-tf32 --fused-attn --cfg-scale 1.5
        --guidance-high 0.7""".split(),
    ]
    ours = [
        "sample",
        str(run),
        "--output",
        str(tmp_path / "ours.npz"),
        *"""--checkpoint-step 200
        --num-samples 4 --mode ode --num-steps 3 --batch-size 2 --seed 1 --method heun --time-shift 2
        --cfg-scale 1.5 --guidance-high 0.7""".split(),
    ]
    assert main(theirs) == 0 and main(ours) == 0
    (written,) = (tmp_path / "s").glob("*.npz")
    assert written.name == "ema-cfg-1.5-0.0-0.7-seed-1-ode.npz"
    with np.load(written) as a, np.load(tmp_path / "ours.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    record = json.loads(Path(f"{written}.json").read_text())["sampling"]["settings"]
    assert (record["time_shift"], record["method"]) == (2.0, "heun")
    assert main([*theirs, "--num-classes", "10"]) == 2  # disagrees with the weights: refused


def test_repa_sample_takes_the_models_time_shift(tmp_path):
    """A run whose config sets --time-shift samples with it unless a flag says otherwise."""
    from safetensors.torch import load_file, save_file

    from repa.cli import main
    from tests.test_eval_sample import write_fake_run

    run = write_fake_run(tmp_path / "run", steps=(100,))
    weights = run / "checkpoints" / "step-00000100" / "ema.safetensors"
    config = json.loads(safetensors_metadata(weights)["config"])
    config["transport"]["time_shift"] = 2.0
    save_file(load_file(weights), weights, metadata={"config": json.dumps(config)})
    common = [str(weights), "--num-samples", "2", "--mode", "ode", "--num-steps", "2"]
    for extra, shift in (([], 2.0), (["--time-shift", "1"], None)):
        output = tmp_path / f"{len(extra)}.npz"
        assert main(["sample", *common, *extra, "--output", str(output)]) == 0
        record = json.loads(Path(f"{output}.json").read_text())["sampling"]["settings"]
        assert record.get("time_shift") == shift  # 1 (no shift) is left out of the record


def safetensors_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_vae_ckpt_reads_repae_training_checkpoints(vae_file, tmp_path):  # noqa: F811
    """--vae-ckpt (or --exp-path) may name one of REPA-E's training checkpoints: the VAE is its
    "vae" entry, next to the SiT, the optimisers and the argparse Namespace it keeps."""
    from repa.tokenizers import create_tokenizer
    from repa.tokenizers.checkpoint import stats_sibling

    vae = torch.load(vae_file, weights_only=True)
    path = tmp_path / "0400000.pt"
    torch.save({"model": {}, "ema": {}, "vae": vae, "discriminator": {}, "opt": {},
                "args": argparse.Namespace(vae="f8d4"), "steps": 400000}, path)  # fmt: skip
    loaded = create_tokenizer(str(path), stats=stats_sibling(vae_file)).autoencoder_state_dict()
    assert loaded.keys() == vae.keys() and all(torch.equal(loaded[k], v) for k, v in vae.items())
