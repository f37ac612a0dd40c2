"""iREPA + REPA-E (issue 15): REPA-E with iREPA's conv projector (--projector conv) and target
z-score. The VAE step aligns through the frozen SiT and the frozen conv projectors (its gradient
reaches the VAE, never the projectors, as REPA-E's does through the SiT's MLP projectors); the
SiT step's alignment trains the projectors as the group `heads`; the run resumes bitwise and its
EMA file samples as any SiT's."""

import pytest
import torch
from safetensors.torch import load_file

from repa.align import alignment_loss, spatial_zscore
from repa.train import checkpoint as ckpt
from repa.train.logging import read_metrics
from repa.train.loop import train
from repa.transport import interpolate
from tests.test_train import encoder_file, shards  # noqa: F401 (fixtures)
from tests.test_train_repae import repae_config, vae_file  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def irepa_repae_config(shards, encoder_file, vae_file, output_dir, **run):  # noqa: F811
    config = repae_config(shards, encoder_file, vae_file, output_dir, **run)
    config.objective.projector = "conv"
    config.objective.target_norm = "zscore"
    return config


def test_vae_alignment_reaches_the_vae_through_the_frozen_conv_projector(
    shards,  # noqa: F811
    encoder_file,  # noqa: F811
    vae_file,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """With the VAE's own losses weighted 0 its loss is vae_align_coeff x the alignment alone:
    it equals the conv projector's alignment of a full SiT forward's block-align_depth output
    (a hook, not the step's early stop) with the z-scored targets, reaches the VAE and neither
    the SiT nor the projector (frozen, as the SiT is); the heads' loss reaches only the heads;
    every group moves."""
    from repa.train.methods.repae import REPAEMethod

    seen = {"order": []}
    original_losses = REPAEMethod.losses
    # each loss's reach; the SiT loss's graph runs through the projector too (as in the denoising
    # method), but the loop backpropagates it into the SiT's parameters only
    expected = {"vae": {"vae"}, "critic": {"critic"}, "sit": {"sit", "heads"}, "heads": {"heads"}}

    def checked_losses(self, model, batch, noise):
        groups = {group.name: group.params for group in self.groups()}
        seen["method"] = self
        seen["initial"] = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
        for item in original_losses(self, model, batch, noise):
            if item.group == "vae":
                assert not any(p.requires_grad for p in self.heads.parameters()), "projector not frozen"
                with torch.no_grad():  # the alignment again, from the step's named draws
                    pixels = batch.images.float() / 127.5 - 1.0
                    mean, logvar = self.tokenizer.posterior(pixels)
                    eps = noise.normal("posterior", tuple(mean.shape[1:]), dtype=mean.dtype)
                    latents = self.sit.normalize_latents((mean + torch.exp(0.5 * logvar) * eps).float())
                    t = noise.draw("t", None)  # drawn by the step: its cached value
                    x_t, _ = interpolate(
                        "linear", latents, noise.normal("noise", tuple(latents.shape[1:])), t
                    )
                    hidden = {}
                    block = self.sit.blocks[self.align_depth - 1]
                    handle = block.register_forward_hook(
                        lambda m, a, out, hidden=hidden: hidden.setdefault("h", out)
                    )
                    self.sit(x_t, t, batch.labels)  # the whole forward, eval mode
                    handle.remove()
                    projections = [p(hidden["h"]) for p in self.conv_projectors]
                    targets = spatial_zscore(self.encoders[0](batch.images).float(), gamma)
                    reference = alignment_loss(projections, [targets])
                torch.testing.assert_close(item.metrics["vae_align"], reference)
                torch.testing.assert_close(item.loss.detach(), self.vae_align_coeff * reference)
            reached = set()
            for name, params in groups.items():
                live = [p for p in params if p.requires_grad]  # frozen ones cannot be reached
                grads = (
                    torch.autograd.grad(item.loss, live, retain_graph=True, allow_unused=True) if live else []
                )
                if any(g is not None and g.abs().sum() > 0 for g in grads):
                    reached.add(name)
            assert reached == expected[item.group], (item.group, reached)
            seen["order"].append(item.group)
            yield item
        assert all(p.requires_grad for p in self.heads.parameters())  # unfrozen after the VAE step

    monkeypatch.setattr(REPAEMethod, "losses", checked_losses)
    # three steps: the SiT's blocks start as the identity (adaLN-zero) and the last one, behind
    # the zero-initialised final layer, moves from the second step on; the third tells them apart
    config = irepa_repae_config(shards, encoder_file, vae_file, tmp_path, max_train_steps=3)
    config.vae.l1_weight = config.vae.kl_weight = config.vae.gan_weight = 0.0
    gamma = config.objective.target_norm_gamma
    train(config)
    assert seen["order"] == ["vae", "critic", "sit", "heads"] * 3
    for group in seen["method"].groups():
        after = [p.detach() for p in group.params]
        assert any(not torch.equal(a, b) for a, b in zip(seen["initial"][group.name], after)), group.name


def test_irepa_repae_trains_resumes_bitwise_and_samples(shards, encoder_file, vae_file, tmp_path):  # noqa: F811
    def config(name, steps):
        return irepa_repae_config(
            shards, encoder_file, vae_file, tmp_path / name, max_train_steps=steps, checkpointing_steps=2
        )

    straight = train(config("straight", 4))
    records = read_metrics(straight.run_dir)
    assert all("loss_align" in r and "vae_align" in r and "grad_norm_heads" in r for r in records)
    train(config("resumed", 2))
    resumed = train(config("resumed", 4))
    a = ckpt.load_file(ckpt.latest_checkpoint(straight.run_dir / "checkpoints") / "model.pt")
    b = ckpt.load_file(ckpt.latest_checkpoint(resumed.run_dir / "checkpoints") / "model.pt")
    assert a["step"] == b["step"] == 4
    assert set(a["method"]) == {"heads", "vae", "discriminator"}
    for part in (a["model"], b["model"]), *((a["method"][k], b["method"][k]) for k in a["method"]):
        left, right = part
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), key
    assert str(a["optimizers"]) == str(b["optimizers"])  # the heads' AdamW moments too
    ema = load_file(ckpt.latest_checkpoint(straight.run_dir / "checkpoints") / "ema.safetensors")
    assert not any("projector" in key for key in ema)  # the conv projector stays out of the SiT
    from repa.eval.checkpoints import load_generator

    load_generator(straight.run_dir)
