"""REPA-E end to end on a tiny VAE: which step updates what, stop-gradient, export, resume."""

import pytest
import torch

from repa.tokenizers import create_tokenizer, save_latent_stats
from repa.train import checkpoint as ckpt
from repa.train.logging import read_metrics
from repa.train.loop import train
from tests.test_train import RESOLUTION, encoder_file, shards, tiny_config  # noqa: F401 (fixtures)

TINY_VAE = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (), "z_channels": 4}


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    """A random tiny LDM-layout VAE (f2, z4) saved as a file with its latents-stats sibling."""
    torch.manual_seed(0)
    vae = create_tokenizer("f8d4", resolution=RESOLUTION, pretrained=False, arch_overrides=TINY_VAE,
                           require_stats=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("vae")
    path = folder / "tiny-vae.pt"
    torch.save(vae.autoencoder_state_dict(), path)
    save_latent_stats(folder / "tiny-vae-latents-stats.pt", torch.full((4,), 0.1), torch.full((4,), 2.0))
    return str(path)


def repae_config(shards, encoder_file, vae_file, output_dir, **run):  # noqa: F811
    config = tiny_config(shards, output_dir, encoder=encoder_file, **run)
    config.model.name = "SiT-S/2"  # 8x8 latents at f2 -> 4x4 tokens, like the encoder
    config.run.method = "repa-e"
    config.tokenizer.tokenizer = vae_file
    config.vae.lpips_weight = 0.0  # no VGG weights offline; every other term is on
    config.vae.disc_layers = 1  # 16px images are too small for REPA-E's 3-layer PatchGAN
    return config


def test_repae_step_partition(shards, encoder_file, vae_file, tmp_path, monkeypatch):  # noqa: F811
    """VAE step: VAE changes, SiT does not. SiT step: SiT changes, VAE does not. The diffusion
    loss has no gradient path into the VAE."""
    from repa.train import methods

    snapshots = {}
    original_prepare, original_loss = methods.REPAEMethod.prepare, methods.REPAEMethod.loss

    def snapshot(name, method):
        snapshots[name] = {
            "vae": {k: v.clone() for k, v in method.tokenizer.state_dict().items()},
            "sit": {k: v.clone() for k, v in method.sit.state_dict().items() if not k.startswith("bn.")},
            "disc": {k: v.clone() for k, v in method.vae_loss.discriminator.state_dict().items()},
        }

    def prepare(self, batch, device):
        snapshot("before", self)
        inputs = original_prepare(self, batch, device)
        snapshot("after_vae_and_disc", self)
        return inputs

    def loss(self, model, inputs):
        value, metrics = original_loss(self, model, inputs)
        vae_params = [p for p in self.tokenizer.parameters()]
        grads = torch.autograd.grad(value, vae_params, retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads), "the diffusion loss reached the VAE"
        assert not inputs.latents.requires_grad
        return value, metrics

    monkeypatch.setattr(methods.REPAEMethod, "prepare", prepare)
    monkeypatch.setattr(methods.REPAEMethod, "loss", loss)
    result = train(
        repae_config(shards, encoder_file, vae_file, tmp_path, max_train_steps=1, checkpointing_steps=1)
    )

    def changed(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a)

    before, middle = snapshots["before"], snapshots["after_vae_and_disc"]
    assert changed(before["vae"], middle["vae"]) and changed(before["disc"], middle["disc"])
    assert not changed(before["sit"], middle["sit"])
    final_sit = {k: v for k, v in result.model.state_dict().items() if not k.startswith("bn.")}
    assert changed(middle["sit"], final_sit)
    final_vae = ckpt.load_file(result.run_dir / "checkpoints" / "step-00000001" / "model.pt")["method"]["vae"]
    assert not changed(middle["vae"], final_vae)  # the SiT step left the VAE alone


@pytest.mark.slow
def test_repae_trains_exports_and_resumes(shards, encoder_file, vae_file, tmp_path):  # noqa: F811
    straight = train(
        repae_config(shards, encoder_file, vae_file, tmp_path / "a", max_train_steps=6, checkpointing_steps=3)
    )
    records = read_metrics(straight.run_dir)
    assert all(
        k in records[-1] for k in ("vae_l1", "vae_kl", "vae_gan", "vae_align", "disc_loss", "loss_align")
    )
    last = ckpt.latest_checkpoint(straight.run_dir / "checkpoints")
    # The E2E-VAE export loads as a tokenizer, with its statistics from the EMA BatchNorm.
    exported = create_tokenizer(str(last / "e2e-vae.pt"))
    stats = torch.load(last / "e2e-vae-latents-stats.pt", weights_only=True)
    ema_bn_mean = ckpt.load_file(last / "model.pt")["model"]["bn.running_mean"]
    assert stats["latents_bias"].shape == (1, 4, 1, 1) and exported.latent_channels == 4
    assert not torch.equal(stats["latents_bias"].flatten(), torch.full((4,), 0.1))  # BN stats moved
    assert torch.isfinite(ema_bn_mean).all()
    # Resume equivalence holds for REPA-E too (VAE, critic and their optimisers are checkpointed).
    train(
        repae_config(shards, encoder_file, vae_file, tmp_path / "b", max_train_steps=3, checkpointing_steps=3)
    )
    resumed = train(
        repae_config(shards, encoder_file, vae_file, tmp_path / "b", max_train_steps=6, checkpointing_steps=3)
    )
    a = ckpt.load_file(last / "model.pt")
    b = ckpt.load_file(ckpt.latest_checkpoint(resumed.run_dir / "checkpoints") / "model.pt")
    for part in ("model",):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    for key in a["method"]["vae"]:
        assert torch.equal(a["method"]["vae"][key], b["method"]["vae"][key]), key


def test_repae_rejects_fp16_and_pixels(shards, encoder_file, vae_file, tmp_path):  # noqa: F811
    config = repae_config(shards, encoder_file, vae_file, tmp_path)
    config.run.mixed_precision = "fp16"
    with pytest.raises(ValueError, match="fp16"):
        train(config)
    config = repae_config(shards, encoder_file, vae_file, tmp_path)
    config.tokenizer.tokenizer = "pixels"
    with pytest.raises(ValueError, match="choose a VAE tokenizer"):
        train(config)
