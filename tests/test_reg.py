"""REG (--method reg): the class token as token 0 of the SiT, its loss, its gradient, its joint
sampling, TREAD/RoPE handling, REG's key layout, the class-token feature cache, and a tiny run that
trains, resumes bitwise after SIGKILL and samples with `repa sample` (docs/reg.md)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.config import ExperimentConfig, load_preset
from repa.eval.sample import ClassTokenSampling
from repa.models import create_model
from repa.models.sit import PrefixSkippingRope, load_state_dict_strict
from repa.models.tread import gather_tokens
from repa.train import checkpoint as ckpt
from repa.train.logging import read_metrics
from repa.train.methods import get_method
from repa.train.methods.base import MethodContext
from repa.train.randomness import StepNoise
from repa.train.setup import build_parts, cached_fields
from repa.transport import sample
from tests.test_train import (  # noqa: F401 (fixtures)
    RESOLUTION,
    assert_states_equal,
    encoder_file,
    final_state,
    shards,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=4)


def _reg_config(shards, output_dir, encoder, **run) -> ExperimentConfig:  # noqa: F811
    values = tiny_config(shards, output_dir, encoder=encoder, **run).to_dict()
    values["model"]["class_dropout_prob"] = 0.0
    values["run"]["method"] = "reg"
    return ExperimentConfig.from_dict(values).validate()


def _method(shards, encoder_file, tmp_path):  # noqa: F811
    config = _reg_config(shards, tmp_path, encoder_file)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    context = MethodContext(config, tokenizer, encoders, model, torch.device("cpu"))
    return get_method("reg").build(context), model, encoders[0]


def test_reg_loss_matches_a_per_sample_reference(shards, encoder_file, tmp_path):  # noqa: F811
    method, model, encoder = _method(shards, encoder_file, tmp_path)
    torch.manual_seed(1)
    for parameter in model.parameters():  # away from the zero init, so every term is live
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.05)
    batch = 3
    latents = torch.randn(batch, 3, RESOLUTION, RESOLUTION)  # pixels tokenizer: 3 x 16 x 16
    labels = torch.tensor([0, 3, 1])
    targets = torch.randn(batch, 1 + 16, encoder.dim)  # [class token; 4x4 patches]
    noise = StepNoise(seed=5, num_samples=batch, device="cpu")
    result = method.model_loss(model, latents, labels, [targets], noise)

    t = noise.draw("t", None)  # the draws the step made (cached by name)
    eps, class_eps = noise.draw("noise", None), noise.draw("class_token_noise", None)
    denoise, align, class_loss = [], [], []
    for i in range(batch):
        ti = t[i : i + 1]
        x_t = (1 - ti) * latents[i : i + 1] + ti * eps[i : i + 1]
        c = targets[i, 0]
        c_t = (1 - ti) * c + ti * class_eps[i]
        (velocity, class_velocity), (projected,) = model(x_t, ti, labels[i : i + 1], class_token=c_t[None])
        denoise.append(((velocity[0] - (eps[i] - latents[i])) ** 2).mean())
        class_loss.append(((class_velocity[0] - (class_eps[i] - c)) ** 2).mean())
        cosines = [
            torch.dot(projected[0, k], targets[i, k]) / (projected[0, k].norm() * targets[i, k].norm())
            for k in range(17)
        ]
        align.append(-sum(cosines) / 17)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    expected = mean(denoise) + 0.5 * mean(align) + 0.03 * mean(class_loss)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.metrics["loss_cls"].item() == pytest.approx(mean(class_loss).item(), rel=1e-5)
    assert result.metrics["loss_align"].item() == pytest.approx(mean(align).item(), rel=1e-5)


def test_reg_gradient_reaches_the_class_token_projector_norm_and_head(shards, encoder_file, tmp_path):  # noqa: F811
    method, model, encoder = _method(shards, encoder_file, tmp_path)
    latents = torch.randn(4, 3, RESOLUTION, RESOLUTION)
    targets = torch.randn(4, 17, encoder.dim)
    result = method.model_loss(model, latents, torch.arange(4), [targets], StepNoise(0, 4, "cpu"))
    result.loss.backward()
    for name in ("cls_projectors2.weight", "wg_norm.weight", "wg_norm.bias", "final_layer.linear_cls.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in encoder.parameters())  # the encoder stays frozen
    # the class head learns from the class token's loss only: without it, no gradient reaches it
    model.zero_grad()
    method.cls_loss_weight = 0.0
    method.model_loss(model, latents, torch.arange(4), [targets], StepNoise(0, 4, "cpu")).loss.backward()
    assert model.final_layer.linear_cls.bias.grad.abs().sum() == 0


def test_reg_resamples_only_the_patch_targets(shards, encoder_file, tmp_path):  # noqa: F811
    from repa.align import resample_tokens

    method, model, encoder = _method(shards, encoder_file, tmp_path)
    method.resample_targets = True  # --align-resample
    latents, labels = torch.randn(2, 3, RESOLUTION, RESOLUTION), torch.tensor([0, 1])
    coarse = torch.randn(2, 1 + 4, encoder.dim)  # a 2x2 encoder grid for the model's 4x4
    resampled = torch.cat([coarse[:, :1], resample_tokens(coarse[:, 1:], 16)], dim=1)
    got = method.model_loss(model, latents, labels, [coarse], StepNoise(3, 2, "cpu"))
    expected = method.model_loss(model, latents, labels, [resampled], StepNoise(3, 2, "cpu"))
    assert torch.equal(got.loss, expected.loss)


def test_reg_with_tread_aligns_the_class_token_and_the_kept_patches(shards, encoder_file, tmp_path):  # noqa: F811
    from repa.align import alignment_loss

    values = _reg_config(shards, tmp_path, encoder_file).to_dict()
    values["model"].update(tread_ratio=0.5, tread_start=0, tread_end=1)  # the tap (block 1) routed
    config = ExperimentConfig.from_dict(values).validate()
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    method = get_method("reg").build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    latents, labels = torch.randn(2, 3, RESOLUTION, RESOLUTION), torch.tensor([0, 1])
    targets = torch.randn(2, 17, encoders[0].dim)
    noise = StepNoise(4, 2, "cpu")
    result = method.model_loss(model, latents, labels, [targets], noise)
    t, eps, class_eps = (noise.draw(name, None) for name in ("t", "noise", "class_token_noise"))
    route_ids = noise.draw("route", None)
    class_t = (1 - t[:, None]) * targets[:, 0] + t[:, None] * class_eps
    x_t = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * eps
    _, (projected,) = model(x_t, t, labels, class_token=class_t, route_ids=route_ids)
    assert projected.shape[1] == 1 + 8  # the class token and half of the 16 patches
    kept = gather_tokens(targets[:, 1:], route_ids[:, :8])
    expected = alignment_loss([projected], [torch.cat([targets[:, :1], kept], dim=1)])
    assert result.metrics["loss_align"].item() == pytest.approx(expected.item(), rel=1e-5)


class _GaussianReg(torch.nn.Module):
    """The exact velocity of independent Gaussian data on the linear path, for a latent
    x ~ N(mu, s^2) and a class token c ~ N(m, r^2) (per element): v = E[e - x | x_t]."""

    def __init__(self, class_token_dim: int, mu=1.5, s=0.5, m=-2.0, r=0.8):
        super().__init__()
        self.config = type("Config", (), {"class_token_dim": class_token_dim})()
        self.mu, self.s, self.m, self.r = mu, s, m, r

    @staticmethod
    def _velocity(x, t, mean, std):
        t = t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        a = 1 - t
        variance = a**2 * std**2 + t**2
        residual = x - a * mean
        expected_x = mean + a * std**2 / variance * residual
        expected_e = t / variance * residual
        return expected_e - expected_x

    def velocity(self, x, t, y, *, class_token=None):
        assert class_token is not None
        return self._velocity(x, t, self.mu, self.s), self._velocity(class_token, t, self.m, self.r)


def test_joint_sampling_reproduces_both_marginals():
    model = _GaussianReg(class_token_dim=5)
    joint = ClassTokenSampling(model, (2, 3, 3))
    count = 2000
    state = sample(
        joint, joint.state_shape, torch.zeros(count, dtype=torch.long), list(range(count)),
        mode="ode", method="heun", num_steps=40, cfg_scale=1.0,
    )  # fmt: skip
    latents, class_tokens = joint.split(state)
    assert latents.shape == (count, 2, 3, 3) and class_tokens.shape == (count, 5)
    assert torch.equal(joint.latents(state), latents)
    tolerance = 4 / math.sqrt(count)  # a few standard errors
    assert latents.mean().item() == pytest.approx(1.5, abs=0.5 * tolerance)
    assert latents.std().item() == pytest.approx(0.5, abs=0.5 * tolerance)
    assert class_tokens.mean().item() == pytest.approx(-2.0, abs=tolerance)
    assert class_tokens.std().item() == pytest.approx(0.8, abs=tolerance)
    # the SDE, REG's sampler, too
    state = sample(
        joint, joint.state_shape, torch.zeros(count, dtype=torch.long), list(range(count)),
        mode="sde", num_steps=60, cfg_scale=1.0,
    )  # fmt: skip
    latents, class_tokens = joint.split(state)
    assert class_tokens.mean().item() == pytest.approx(-2.0, abs=2 * tolerance)
    assert class_tokens.std().item() == pytest.approx(0.8, abs=2 * tolerance)
    assert latents.std().item() == pytest.approx(0.5, abs=2 * tolerance)


def test_the_class_token_is_guided_with_its_own_scale():
    """Conditional velocity 1 + label, unconditional 0 (null label 4): one Euler step from t=1 to 0
    moves each part by minus its guided velocity."""

    class Shifted(torch.nn.Module):
        config = type("Config", (), {"class_token_dim": 2})()

        def velocity(self, x, t, y, *, class_token=None):
            offset = torch.where(y == 4, 0.0, 1.0 + y.float())
            return offset.view(-1, 1, 1, 1).expand_as(x), offset.view(-1, 1).expand_as(class_token)

    joint = ClassTokenSampling(Shifted(), (2, 1, 1))
    noise = torch.zeros(1, *joint.state_shape)
    for cls_scale, expected_class in ((None, 3.0), (2.5, 5.0), (0.0, 2.0)):
        scales = joint.scale_map(1.5, cls_scale, cfg_channels=1)
        out = sample(
            joint, noise, torch.tensor([1]), num_steps=1, cfg_scale=1.5, null_label=4, cfg_scale_map=scales
        )
        latents, class_token = joint.split(out)
        # channel 0 guided (1.5 * 2), channel 1 conditional (--cfg-channels 1), class token its own
        assert latents.flatten().tolist() == pytest.approx([-3.0, -2.0])
        assert class_token.flatten().tolist() == pytest.approx([-expected_class] * 2)


def test_tread_keeps_the_class_token_and_rope_leaves_it_unrotated():
    model = create_model(
        "SiT-S/2", **TINY, class_token_dim=6, projector_out_dims=[6], projector_dim=16, align_depth=2,
        rope=True, tread_ratio=0.5, tread_start=0, tread_end=2,
    )  # fmt: skip
    model.train()
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 6)
    route_ids = torch.stack([torch.randperm(16), torch.randperm(16)])
    seen = {}
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.setdefault("input", args[0]))
    (velocity, class_velocity), (projected,) = model(x, t, y, class_token=c, route_ids=route_ids)
    kept = route_ids[:, :8]
    assert projected.shape == (2, 1 + 8, 6)  # the tap inside the route: [class token; kept patches]
    embedded = model.x_embedder(x) + model.pos_embed[:, 1:]
    assert torch.allclose(seen["input"][:, 0], model.wg_norm(model.cls_projectors2(c)))
    assert torch.allclose(seen["input"][:, 1:], gather_tokens(embedded, kept))
    assert velocity.shape == (2, 4, 8, 8) and class_velocity.shape == (2, 6)
    assert torch.count_nonzero(model.pos_embed[0, 0]) == 0
    fresh = create_model("SiT-S/2", **TINY, class_token_dim=6)  # REG's head starts at zero
    assert torch.count_nonzero(fresh.final_layer.linear_cls.weight) == 0
    # RoPE skips the class token and rotates the patches as without it
    rope = PrefixSkippingRope.wrap(model.feat_rope, 1)
    q = torch.randn(2, 2, 17, 16)
    rotated = rope(q)
    assert torch.equal(rotated[:, :, 0], q[:, :, 0])
    assert torch.equal(rotated[:, :, 1:], model.feat_rope(q[:, :, 1:]))


def test_a_state_dict_in_regs_layout_loads_strictly():
    from repa.eval.checkpoints import infer_architecture

    base = create_model(
        "SiT-S/2", **TINY, projector_out_dims=[6], projector_dim=16, align_depth=2
    ).state_dict()
    hidden, tokens = 32, 16
    reg = dict(base)
    reg["cls_projectors2.weight"], reg["cls_projectors2.bias"] = torch.randn(hidden, 6), torch.randn(hidden)
    reg["wg_norm.weight"], reg["wg_norm.bias"] = torch.randn(hidden), torch.randn(hidden)
    reg["final_layer.linear_cls.weight"] = torch.randn(6, hidden)
    reg["final_layer.linear_cls.bias"] = torch.randn(6)
    reg["pos_embed"] = torch.cat([torch.zeros(1, 1, hidden), base["pos_embed"]], dim=1)
    assert reg["pos_embed"].shape == (1, tokens + 1, hidden)
    architecture = infer_architecture(reg)
    assert architecture["class_token_dim"] == 6 and architecture["input_size"] == 8
    model = create_model("SiT-S/2", **{**architecture, "num_heads": 2})
    load_state_dict_strict(model, reg)
    assert torch.equal(model.final_layer.linear_cls.weight, reg["final_layer.linear_cls.weight"])
    # REG's published shapes at XL/2 on DINOv2-B, and its +1.77M parameters
    with torch.device("meta"):
        xl = create_model("SiT-XL/2", projector_out_dims=[768], class_token_dim=768)
        plain = create_model("SiT-XL/2", projector_out_dims=[768])
    shapes = {k: tuple(v.shape) for k, v in xl.state_dict().items()}
    assert shapes["cls_projectors2.weight"] == (1152, 768)
    assert shapes["final_layer.linear_cls.weight"] == (768, 1152)
    assert shapes["pos_embed"] == (1, 257, 1152)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(xl) - trainable(plain) == 1_773_696


def test_class_token_features_are_cached_for_reg_runs_only(encoder_file, tmp_path):  # noqa: F811
    from repa.data.build import build_shards
    from repa.data.shards import read_manifest
    from repa.data.synthetic import write_synthetic_dataset
    from repa.encoders import ClassTokenFirst, create_encoder

    write_synthetic_dataset(tmp_path / "images", num_images=4, resolution=RESOLUTION, num_classes=2, seed=0)
    encoder = create_encoder(encoder_file, resolution=RESOLUTION)
    build_shards(
        str(tmp_path / "images"), tmp_path / "shards", resolution=RESOLUTION, shard_size=4, workers=0,
        encoder=ClassTokenFirst(encoder),
    )  # fmt: skip
    manifest = read_manifest(str(tmp_path / "shards" / "manifest.json"))
    assert manifest["options"]["cache_class_token"] is True
    assert manifest["feature_shape"] == [17, encoder.dim]
    images = torch.randint(0, 256, (2, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)
    tokens, class_token = encoder.forward_with_class_token(images)
    assert torch.equal(tokens, encoder(images))
    assert torch.equal(ClassTokenFirst(encoder)(images), torch.cat([class_token[:, None], tokens], 1))
    reg = _reg_config(str(tmp_path / "shards"), tmp_path, encoder_file)
    repa = tiny_config(str(tmp_path / "shards"), tmp_path, encoder=encoder_file)
    assert cached_fields(reg, manifest, type("Pixels", (), {"name": "pixels"}), [encoder]) == (False, True)
    assert cached_fields(repa, manifest, type("Pixels", (), {"name": "pixels"}), [encoder]) == (False, False)
    # a REG run trains on them without running the encoder
    from repa.train.loop import train

    result = train(_reg_config(str(tmp_path / "shards"), tmp_path / "run", encoder_file, max_train_steps=2))
    assert json.loads((result.run_dir / "targets.json").read_text())["features_cached"] is True
    assert "loss_cls" in read_metrics(result.run_dir)[-1]


def test_reg_flags_name_what_is_wrong(shards, encoder_file, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="single encoder with a class token"):
        _reg_config(shards, tmp_path, "none")
    values = _reg_config(shards, tmp_path, encoder_file).to_dict()
    values["objective"]["projector"] = "conv"
    with pytest.raises(ValueError, match="--projector mlp"):
        ExperimentConfig.from_dict(values).validate()
    values["objective"].update(projector="mlp", attn_distill_weight=0.5)
    with pytest.raises(ValueError, match="--attn-distill-weight at 0"):
        ExperimentConfig.from_dict(values).validate()
    assert (
        ExperimentConfig.from_dict({"objective": {"cls_loss_weight": 0.1}}).objective.cls_loss_weight == 0.1
    )
    preset = ExperimentConfig.from_dict(load_preset(ROOT / "configs" / "reg_sit_xl2.yaml")).validate()
    assert (preset.method, preset.model.proj_coeff, preset.objective.cls_loss_weight) == ("reg", 0.5, 0.03)


def test_reg_trains_resumes_bitwise_after_sigkill_and_samples(shards, encoder_file, tmp_path, monkeypatch):  # noqa: F811
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps = 16

    def command(name):
        values = _reg_config(shards, tmp_path / name, encoder_file, max_train_steps=steps).to_dict()
        # a visible fall of the class token's loss within 16 steps: a larger step and weight
        values["optim"]["learning_rate"], values["objective"]["cls_loss_weight"] = 3e-3, 1.0
        values["run"].update(sample_every=steps, sample_steps=3)  # the loop's preview samples REG too
        (tmp_path / f"{name}.yaml").write_text(json.dumps(values))
        return [sys.executable, "-m", "repa", "train", "--config", str(tmp_path / f"{name}.yaml")]

    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(command("reference"), check=True, **quiet)
    killed = command("killed")
    process = subprocess.Popen(killed, **quiet)
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(checkpoints) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert int(ckpt.latest_checkpoint(checkpoints).name.split("-")[1]) < steps
    subprocess.run(killed, check=True, **quiet)
    reference = tmp_path / "reference" / "run"
    assert_states_equal(final_state(reference), final_state(tmp_path / "killed" / "run"))

    assert (reference / "samples" / f"step-{steps:08d}.png").is_file()
    records = read_metrics(reference)
    for term in ("loss", "loss_denoise", "loss_cls"):
        first = sum(r[term] for r in records[:4]) / 4
        last = sum(r[term] for r in records[-4:]) / 4
        assert last < first, (term, [round(r[term], 3) for r in records])
    assert "loss_align" in records[-1] and "cos_sim_0" in records[-1]

    # `repa sample` on the REG checkpoint: no encoder is ever built, the class token is generated
    import repa.encoders

    def no_encoder(*args, **kwargs):
        raise AssertionError("sampling built an encoder")

    monkeypatch.setattr(repa.encoders, "create_encoder", no_encoder)
    monkeypatch.setattr(repa.encoders, "create_encoders", no_encoder)
    from repa.cli import main

    output = tmp_path / "samples.npz"
    args = [str(reference), "--num-samples", "3", "--output", str(output), "--num-steps", "3"]
    assert main(["sample", *args, "--cfg-scale", "2.0", "--cls-cfg-scale", "1.5", "--batch-size", "2"]) == 0
    with np.load(output) as data:
        assert data["arr_0"].shape == (3, RESOLUTION, RESOLUTION, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_0"].std() > 0
    record = json.loads(Path(f"{output}.json").read_text())["sampling"]["settings"]
    assert record["cls_cfg_scale"] == 1.5


def test_the_probe_reads_a_reg_model_without_a_class_token():
    from repa.eval.probe import block_outputs

    model = create_model("SiT-S/2", **TINY, class_token_dim=6).eval()
    pooled = block_outputs(model, torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert len(pooled) == 3 and pooled[0].shape == (2, 32)


def test_reg_costs_under_half_a_percent_more_flops_at_xl():
    """REG's paper: +<0.5% FLOPs (one token); `repa curves`' compute axis counts it."""
    from repa.analysis.compute import training_cost

    def sit_cost(method):
        config = ExperimentConfig.from_dict({"run": {"method": method}, "model": {"name": "SiT-XL/2"}})
        return training_cost(config, latents_cached=True, features_cached=True).parts["sit"]

    reg, repa = sit_cost("reg"), sit_cost("repa")
    assert 0 < (reg - repa) / repa < 0.005
