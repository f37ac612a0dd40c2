"""REPA-E end to end on a tiny VAE: which step updates what, stop-gradient, export, resume."""

import pytest
import torch
from safetensors.torch import load_file

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
    """Each loss reaches only its own group: the VAE loss the VAE (through the frozen SiT, in eval
    mode so its BatchNorm statistics do not move), the critic loss the discriminator, the
    diffusion loss the SiT (never the VAE). After the step all three have moved."""
    from repa.train.methods.repae import REPAEMethod

    seen = {}
    original_losses = REPAEMethod.losses

    def checked_losses(self, model, batch, noise):
        groups = {group.name: group.params for group in self.groups()}
        bn_before = self.sit.bn.running_mean.clone()
        seen["method"] = self
        seen["initial"] = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
        for item in original_losses(self, model, batch, noise):
            if item.group == "vae":
                assert not self.sit.training, "the VAE loss ran the SiT in train mode"
                assert torch.equal(self.sit.bn.running_mean, bn_before), (
                    "the VAE loss moved the SiT's BatchNorm"
                )
            for name, params in groups.items():
                live = [p for p in params if p.requires_grad]  # frozen ones cannot be reached
                grads = (
                    torch.autograd.grad(item.loss, live, retain_graph=True, allow_unused=True) if live else []
                )
                reached = any(g is not None and g.abs().sum() > 0 for g in grads)
                assert reached == (name == item.group), f"the {item.group} loss reached {name}: {reached}"
            seen.setdefault("order", []).append(item.group)
            yield item

    monkeypatch.setattr(REPAEMethod, "losses", checked_losses)
    train(repae_config(shards, encoder_file, vae_file, tmp_path, max_train_steps=1, checkpointing_steps=1))
    assert seen["order"] == ["vae", "critic", "sit"]
    for group in seen["method"].groups():
        after = [p.detach() for p in group.params]
        assert any(not torch.equal(a, b) for a, b in zip(seen["initial"][group.name], after)), group.name


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
    ema = load_file(last / "ema.safetensors")
    assert stats["latents_bias"].shape == (1, 4, 1, 1) and exported.latent_channels == 4
    assert not torch.equal(stats["latents_bias"].flatten(), torch.full((4,), 0.1))  # BN stats moved
    # the exported statistics are the EMA model's BatchNorm's (std includes its eps)
    assert torch.allclose(stats["latents_bias"].flatten(), ema["bn.running_mean"])
    assert torch.allclose(1 / stats["latents_scale"].flatten() ** 2, ema["bn.running_var"] + 1e-4)
    # Resume equivalence holds for REPA-E too (VAE, critic and their optimisers are checkpointed).
    train(
        repae_config(shards, encoder_file, vae_file, tmp_path / "b", max_train_steps=3, checkpointing_steps=3)
    )
    resumed = train(
        repae_config(shards, encoder_file, vae_file, tmp_path / "b", max_train_steps=6, checkpointing_steps=3)
    )
    resumed_last = ckpt.latest_checkpoint(resumed.run_dir / "checkpoints")
    a, b = ckpt.load_file(last / "model.pt"), ckpt.load_file(resumed_last / "model.pt")
    for part in ("model", ("method", "vae"), ("method", "discriminator")):
        left, right = (
            (a[part], b[part]) if isinstance(part, str) else (a[part[0]][part[1]], b[part[0]][part[1]])
        )
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), (part, key)
    assert str(a["optimizers"]) == str(b["optimizers"])  # every group's moments and step counts
    for key, value in load_file(resumed_last / "ema.safetensors").items():
        assert torch.equal(ema[key], value), key


def test_repae_rejects_pixels(shards, encoder_file, vae_file, tmp_path):  # noqa: F811
    config = repae_config(shards, encoder_file, vae_file, tmp_path)
    config.tokenizer.tokenizer = "pixels"
    with pytest.raises(ValueError, match="choose a VAE tokenizer"):
        train(config)
