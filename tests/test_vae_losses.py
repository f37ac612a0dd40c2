"""repa.tokenizers.losses: REPA-E's VAE losses on known values."""

from __future__ import annotations

import pytest
import torch

from repa.tokenizers.losses import (
    LPIPS,
    LPIPS_LINEAR_KEYS,
    VGG16_TAP_CHANNELS,
    NLayerDiscriminator,
    VAELoss,
    VAELossConfig,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_loss,
    l1_loss,
)


@pytest.fixture(scope="module")
def linear_weights_file(tmp_path_factory):
    """A file in the `lpips` package's v0.1 vgg.pth layout, with random non-negative weights."""
    path = tmp_path_factory.mktemp("lpips") / "vgg.pth"
    generator = torch.Generator().manual_seed(0)
    torch.save(
        {
            key: torch.rand(1, c, 1, 1, generator=generator)
            for key, c in zip(LPIPS_LINEAR_KEYS, VGG16_TAP_CHANNELS)
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def lpips(linear_weights_file):
    return LPIPS(linear_weights=linear_weights_file, pretrained=False)


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(lpips):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(images, images), torch.zeros(2))
    other = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    distance = lpips(images, other)
    assert distance.shape == (2,) and (distance > 0).all()


def test_lpips_loads_the_linear_weights_file(lpips, linear_weights_file):
    saved = torch.load(linear_weights_file, weights_only=True)
    for i, key in enumerate(LPIPS_LINEAR_KEYS):
        assert torch.equal(lpips.linear[i], saved[key])


def test_lpips_rejects_wrong_linear_weight_files(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"lin0.weight": torch.ones(1, 64, 1, 1)}, path)
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        LPIPS(linear_weights=path, pretrained=False)
    torch.save({key: -torch.ones(1, c, 1, 1) for key, c in zip(LPIPS_LINEAR_KEYS, VGG16_TAP_CHANNELS)}, path)
    with pytest.raises(ValueError, match="non-negative"):
        LPIPS(linear_weights=path, pretrained=False)


def test_lpips_input_range_is_minus_one_to_one_and_scaled_once(lpips):
    """What reaches VGG is the ImageNet normalisation of the image in [0, 1], i.e. inputs in [-1, 1] go
    through LPIPS's ScalingLayer exactly once (REPA-E's code rescaled [-1, 1] inputs a second time)."""
    seen = {}
    hook = lpips.slices[0].register_forward_pre_hook(
        lambda module, args: seen.setdefault("vgg_input", args[0])
    )
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    lpips(images, images)
    hook.remove()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    imagenet = ((images + 1) / 2 - mean) / std
    assert torch.allclose(seen["vgg_input"][:1], imagenet, atol=0.02)


def test_lpips_is_frozen_but_passes_gradients_to_its_inputs(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    reconstructions = (images + 0.1).requires_grad_(True)
    lpips(images, reconstructions).sum().backward()
    assert reconstructions.grad is not None and reconstructions.grad.abs().sum() > 0


def test_lpips_vgg_weights_from_a_file_and_a_clear_error_without(tmp_path, monkeypatch, linear_weights_file):
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loaded = LPIPS(linear_weights=linear_weights_file, vgg_weights=path)
    assert torch.equal(loaded.slices[4][-2].weight, features[28].weight)  # conv5_3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS(linear_weights=linear_weights_file)


def test_l1_and_kl_on_known_values():
    assert torch.isclose(l1_loss(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), -0.5)), torch.tensor(0.5))
    # mean 1, logvar 0: 0.5 * (1 + 1 - 1 - 0) = 0.5 per element; 4*3*3 elements summed, batch averaged.
    assert torch.isclose(kl_loss(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)), torch.tensor(18.0))
    # The standard normal posterior has zero KL; logvar = log 2 gives 0.5 * (2 - 1 - ln 2) per element.
    assert kl_loss(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)) == 0
    value = kl_loss(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), float(torch.tensor(2.0).log())))
    assert torch.isclose(value, 0.5 * (1 - torch.tensor(2.0).log()))


def test_hinge_discriminator_loss_on_known_logits():
    logits_real = torch.tensor([2.0, 0.5])
    logits_fake = torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75
    assert torch.isclose(hinge_discriminator_loss(logits_real, logits_fake), torch.tensor(0.5))
    assert hinge_discriminator_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)) == 0


def test_generator_loss_falls_when_the_discriminator_is_fooled():
    assert torch.isclose(generator_adversarial_loss(torch.tensor([1.0, 3.0])), torch.tensor(-2.0))
    logits = torch.zeros(3, requires_grad=True)
    generator_adversarial_loss(logits).backward()
    assert (logits.grad < 0).all()  # descending the loss raises D(fake)


def test_patchgan_discriminator_layout():
    discriminator = NLayerDiscriminator()
    logits = discriminator(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    keys = discriminator.state_dict()
    assert keys["main.0.weight"].shape == (64, 3, 4, 4)
    assert keys["main.2.weight"].shape == (128, 64, 4, 4) and "main.2.bias" not in keys  # bias off before BN
    assert keys["main.8.weight"].shape == (512, 256, 4, 4) and "main.9.running_mean" in keys
    assert keys["main.11.weight"].shape == (1, 512, 4, 4)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules()) == 3


def test_vae_loss_combines_the_terms_with_the_default_weights(lpips):
    config = VAELossConfig()
    assert (config.l1_weight, config.lpips_weight, config.kl_weight, config.gan_weight) == (
        1.0,
        1.0,
        1e-6,
        0.1,
    )
    loss = VAELoss(config, lpips=lpips)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstructions = (images + 0.2 * torch.randn_like(images)).requires_grad_(True)
    mean, logvar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    total, parts = loss.generator_loss(images, reconstructions, mean, logvar)
    expected = parts["l1"] + parts["lpips"] + 1e-6 * parts["kl"] + 0.1 * parts["gan"]
    assert torch.isclose(total, expected)
    total.backward()
    assert reconstructions.grad is not None

    d_loss, logs = loss.discriminator_loss(images, reconstructions)
    d_loss.backward()
    assert loss.discriminator.main[0].weight.grad is not None
    assert set(logs) == {"logits_real", "logits_fake"}
