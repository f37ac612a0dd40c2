"""repa.tokenizers: every registered tokenizer through its real loading path (shrunk widths), the
checkpoint layout and strict loading, latent normalisation and statistics, offline errors, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repa.tokenizers import (
    LatentNorm,
    compute_latent_stats,
    create_tokenizer,
    list_tokenizers,
    load_latent_stats,
    save_latent_stats,
)
from repa.tokenizers.checkpoint import read_checkpoint
from repa.tokenizers.ldm import LDM_CONFIGS, LDMAutoencoderKL, LDMConfig
from repa.tokenizers.registry import SD_VAE_CONFIG, _same_architecture, infer_ldm_config
from repa.tokenizers.stats import ChannelMoments

# Test-only shrinking: same classes and code path, narrower layers (GroupNorm(32) needs multiples of 32).
TINY = {
    "pixels": None,
    "sd-vae-ft-mse": {"block_out_channels": [32, 32, 64, 64]},
    "sd-vae-ft-ema": {"block_out_channels": [32, 32, 64, 64]},
    "f8d4": {"ch": 32},
    "f16d32": {"ch": 32},
    "va-vae": {"ch": 32},
}
EXPECTED_GEOMETRY = {  # (latent channels, downsampling factor)
    "pixels": (3, 1),
    "sd-vae-ft-mse": (4, 8),
    "sd-vae-ft-ema": (4, 8),
    "f8d4": (4, 8),
    "f16d32": (32, 16),
    "va-vae": (32, 16),
}
RESOLUTION = 16


def random_images(batch: int = 2, resolution: int = RESOLUTION, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, resolution, resolution), generator=generator, dtype=torch.uint8)


def tiny_random(name: str):
    return create_tokenizer(name, resolution=RESOLUTION, pretrained=False, arch_overrides=TINY[name])


def save_through_reference_layout(name: str, tmp_path) -> tuple[object, str]:
    """A random tiny tokenizer saved the way its published weights are distributed; returns (source, path)."""
    source = tiny_random(name)
    if name.startswith("sd-vae"):
        folder = tmp_path / name
        source.autoencoder.save_pretrained(folder)  # diffusers folder: config.json + safetensors
        return source, str(folder)
    path = tmp_path / f"{name}.pt"
    torch.save(source.autoencoder_state_dict(), path)
    channels = source.latent_channels
    save_latent_stats(
        tmp_path / f"{name}-latents-stats.pt",
        torch.linspace(-0.5, 0.5, channels),
        torch.full((channels,), 2.0),
    )
    return source, str(path)


def test_registry_lists_every_tokenizer():
    assert set(list_tokenizers()) == set(EXPECTED_GEOMETRY)
    assert set(TINY) == set(list_tokenizers())


@pytest.mark.parametrize("name", list(EXPECTED_GEOMETRY))
def test_every_tokenizer_loads_through_the_real_path_and_round_trips(name, tmp_path):
    if name == "pixels":
        tokenizer = create_tokenizer("pixels")
    else:
        source, weights = save_through_reference_layout(name, tmp_path)
        tokenizer = create_tokenizer(name, resolution=RESOLUTION, weights=weights, arch_overrides=TINY[name])
        for key, value in source.autoencoder_state_dict().items():
            assert torch.equal(tokenizer.autoencoder_state_dict()[key], value), key
    channels, factor = EXPECTED_GEOMETRY[name]
    assert (tokenizer.latent_channels, tokenizer.downsample) == (channels, factor)
    latent = tokenizer.latent_size(RESOLUTION)
    assert latent == RESOLUTION // factor

    images = random_images()
    moments = tokenizer.encode_moments(images)
    assert moments.shape == (2, 2 * channels, latent, latent) and moments.dtype == torch.float32
    assert (moments[:, channels:] >= 0).all()  # the second half is a std
    latents = tokenizer.encode(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, channels, latent, latent) and latents.dtype == torch.float32
    decoded = tokenizer.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.uint8
    if name == "pixels":
        assert torch.equal(decoded, images)  # exact round trip


def test_pixels_round_trip_is_exact_for_every_value():
    tokenizer = create_tokenizer("pixels")
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    assert torch.equal(tokenizer.decode(tokenizer.encode(images)), images)
    assert torch.equal(tokenizer.encode_moments(images)[:, 3:], torch.zeros(1, 3, 16, 16))


def test_decode_rounds_instead_of_truncating():
    tokenizer = create_tokenizer("pixels")
    values = torch.tensor([10.6, 10.4, -3.0, 300.0]) / 127.5 - 1.0  # pixel values before rounding
    decoded = tokenizer.decode(values.view(1, 1, 1, 4).expand(1, 3, 1, 4))
    assert decoded[0, 0, 0].tolist() == [11, 10, 0, 255]


def test_latent_size_rejects_indivisible_resolutions():
    tokenizer = tiny_random("f16d32")
    assert tokenizer.latent_size(512) == 32
    with pytest.raises(ValueError, match="not divisible.*16"):
        tokenizer.latent_size(200)
    with pytest.raises(ValueError, match="not divisible"):
        create_tokenizer("f16d32", resolution=100, pretrained=False, arch_overrides=TINY["f16d32"])


@pytest.mark.parametrize(
    "norm",
    [
        LatentNorm(0.18215),
        LatentNorm(scale=torch.tensor([1.5, 0.2, 3.0, 0.7]), bias=torch.tensor([0.1, -2.0, 0.0, 5.0])),
        LatentNorm.from_mean_std(torch.tensor([0.3, -0.1, 0.8, 0.0]), torch.tensor([4.0, 0.5, 1.0, 2.0])),
    ],
)
def test_normalize_and_denormalize_are_inverses(norm):
    z = torch.randn(3, 4, 5, 5) * 4 + 1
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, rtol=1e-6, atol=1e-6)
    assert torch.allclose(norm.normalize(norm.denormalize(z)), z, rtol=1e-6, atol=1e-5)


def test_normalisation_kinds():
    sd = create_tokenizer("sd-vae-ft-mse", pretrained=False, arch_overrides=TINY["sd-vae-ft-mse"])
    z = torch.randn(1, 4, 2, 2)
    assert torch.allclose(sd.normalize(z), z * 0.18215)
    stats = LatentNorm.from_mean_std(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
    z = torch.tensor([3.0, 10.0]).view(1, 2, 1, 1)
    assert torch.allclose(stats.normalize(z).flatten(), torch.tensor([1.0, 2.0]))


def test_channel_moments_are_stable_against_a_large_mean():
    rng = np.random.default_rng(0)
    data = 1e4 + rng.standard_normal((50, 3, 4, 4)) * np.array([1e-2, 1.0, 3.0])[None, :, None, None]
    moments = ChannelMoments(3)
    for chunk in np.array_split(data, 7):  # uneven batch sizes
        moments.update(torch.from_numpy(chunk))
    per_channel = data.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(moments.mean.numpy(), per_channel.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.std.numpy(), per_channel.std(axis=1), rtol=1e-8)


def test_latent_stats_of_a_synthetic_stream_match_numpy(tmp_path):
    batches = [random_images(batch, resolution=8, seed=seed) for seed, batch in enumerate([3, 5, 2, 4])]
    stats = compute_latent_stats(create_tokenizer("pixels"), iter(batches), max_images=12)
    assert stats["num_images"] == 12
    pixels = torch.cat(batches)[:12].numpy().astype(np.float64) / 127.5 - 1.0
    per_channel = pixels.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(stats["mean"].numpy(), per_channel.mean(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["std"].numpy(), per_channel.std(axis=1), rtol=1e-6)

    path = save_latent_stats(tmp_path / "pixels-latents-stats.pt", stats["mean"], stats["std"])
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["latents_bias", "latents_scale"]  # REPA-E's format, nothing else
    assert raw["latents_scale"].shape == (1, 3, 1, 1) and raw["latents_scale"].dtype == torch.float32
    np.testing.assert_allclose(raw["latents_scale"].flatten().numpy(), 1 / per_channel.std(axis=1), rtol=1e-6)
    norm = load_latent_stats(path)
    np.testing.assert_allclose(norm.mean.flatten().numpy(), per_channel.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_stats_of_an_image_folder_see_the_adm_crop_training_images_get(tmp_path):
    from PIL import Image

    from repa.data.images import center_crop_adm
    from repa.tokenizers.stats import iter_image_folder

    # Short side 40 >= 2 * 16: ADM halves with a BOX filter, resizes, then cuts the square.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8))
    image.save(tmp_path / "wide.png")
    (batch,) = iter_image_folder(tmp_path, resolution=16, batch_size=4)
    assert batch.dtype == torch.uint8 and batch.shape == (1, 3, 16, 16)
    assert torch.equal(batch[0], torch.from_numpy(center_crop_adm(image, 16)).permute(2, 0, 1))


def test_lightningdit_stats_format_is_read(tmp_path):
    path = tmp_path / "latents_stats.pt"
    torch.save(
        {
            "mean": torch.tensor([1.0, -1.0]).view(1, 2, 1, 1),
            "std": torch.tensor([2.0, 0.5]).view(1, 2, 1, 1),
        },
        path,
    )
    norm = load_latent_stats(path)
    assert torch.allclose(norm.scale.flatten(), torch.tensor([0.5, 2.0]))
    torch.save({"something": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="latents_scale/latents_bias"):
        load_latent_stats(path)


# ---- the published key layout and strict loading ------------------------------------------------------
def test_ldm_state_dict_uses_the_published_key_names():
    with torch.device("meta"):
        f8d4 = LDMAutoencoderKL(LDM_CONFIGS["f8d4"]).state_dict()
        f16d32 = LDMAutoencoderKL(LDM_CONFIGS["f16d32"]).state_dict()
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm2.bias",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.q.weight",
        "decoder.up.0.block.2.conv2.weight",  # num_res_blocks + 1 = 3 blocks per decoder level
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in f8d4, key
    assert "encoder.down.3.downsample.conv.weight" not in f8d4  # no downsampling after the last level
    assert "decoder.up.0.upsample.conv.weight" not in f8d4
    assert not any(".attn.0." in k for k in f8d4)  # f8d4: attention only in the middle blocks
    assert f8d4["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sum(v.numel() for k, v in f8d4.items()) == 83_653_863  # = diffusers' SD-VAE parameter count
    # f16d32: attention also at the 16 px level (encoder 2 blocks, decoder 3).
    assert "encoder.down.4.attn.1.norm.weight" in f16d32 and "decoder.up.4.attn.2.v.weight" in f16d32
    assert "encoder.down.3.attn.0.q.weight" not in f16d32
    assert f16d32["post_quant_conv.weight"].shape == (32, 32, 1, 1)


def test_ldm_autoencoder_matches_diffusers_sd_vae_numerically():
    """Our LDM module, converted to diffusers by diffusers' own LDM converter, gives the same outputs."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = LDMAutoencoderKL(LDMConfig(ch=32, ch_mult=(1, 2, 2, 2), z_channels=4)).eval()
    config = SD_VAE_CONFIG | {"block_out_channels": [32, 64, 64, 64]}
    reference = AutoencoderKL(**config).eval()
    converted = convert_ldm_vae_checkpoint(ours.state_dict(), config)
    reference.load_state_dict(converted, strict=True)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(images)
        distribution = reference.encode(images).latent_dist
        assert torch.allclose(mean, distribution.mean, atol=1e-5)
        assert torch.allclose(logvar, distribution.logvar, atol=1e-5)
        assert torch.allclose(ours.decode(mean), reference.decode(mean).sample, atol=1e-5)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "global_step": 10},
        lambda sd: {"vae": sd, "ema": {"pos_embed": torch.zeros(1)}, "discriminator": {}},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {
            "state_dict": {
                **sd,
                "loss.logvar": torch.zeros(()),
                "loss.discriminator.main.0.weight": torch.ones(1),
            }
        },
    ],
    ids=["raw", "state_dict", "repa-e-vae", "ddp-module", "ldm-loss-keys"],
)
def test_strict_loading_of_wrapped_checkpoints(wrap, tmp_path):
    source = tiny_random("f8d4")
    path = tmp_path / "f8d4.pt"
    torch.save(wrap(source.autoencoder_state_dict()), path)
    # Pretrained weights need their statistics: the sibling NAME-latents-stats.pt (or stats=).
    with pytest.raises(FileNotFoundError, match="f8d4-latents-stats.pt"):
        create_tokenizer("f8d4", weights=path, arch_overrides=TINY["f8d4"])
    save_latent_stats(tmp_path / "f8d4-latents-stats.pt", torch.zeros(4), torch.ones(4) * 3)
    loaded = create_tokenizer("f8d4", weights=path, arch_overrides=TINY["f8d4"])
    for key, value in source.autoencoder_state_dict().items():
        assert torch.equal(loaded.autoencoder_state_dict()[key], value)
    assert torch.allclose(loaded.latent_norm.scale.flatten(), torch.full((4,), 1 / 3))


def test_wrong_and_truncated_files_fail_clearly(tmp_path):
    state_dict = tiny_random("f8d4").autoencoder_state_dict()
    save_latent_stats(tmp_path / "broken-latents-stats.pt", torch.zeros(4), torch.ones(4))
    path = tmp_path / "broken.pt"

    missing = {k: v for k, v in state_dict.items() if k != "decoder.up.1.block.2.conv1.weight"}
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up\.1\.block\.2\.conv1\.weight"):
        create_tokenizer("f8d4", weights=path, arch_overrides=TINY["f8d4"])

    torch.save({**state_dict, "encoder.extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.extra\.weight"):
        create_tokenizer("f8d4", weights=path, arch_overrides=TINY["f8d4"])

    with pytest.raises(ValueError, match="shape mismatches: .*file .* vs model"):
        create_tokenizer(
            "f16d32", weights=path, arch_overrides=TINY["f16d32"], stats=tmp_path / "broken-latents-stats.pt"
        )

    torch.save(state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read checkpoint .*truncated"):
        create_tokenizer("f8d4", weights=path, arch_overrides=TINY["f8d4"])

    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        read_checkpoint(path)

    torch.save({"optimizer": {"lr": torch.ones(1)}}, path)
    with pytest.raises(ValueError, match="no autoencoder state dict found"):
        create_tokenizer("f8d4", weights=path, arch_overrides=TINY["f8d4"])


def test_ldm_layout_sd_vae_file_loads_and_refuses_an_unexpected_key_alone(tmp_path):
    """An SD-VAE file in the original LDM layout goes through diffusers' converter, which drops keys
    it has no rule for: one extra key next to a complete, well-shaped state dict must still be
    refused by name. The bookkeeping that such files carry (loss modules, EMA counters) is not."""
    ours = LDMAutoencoderKL(LDMConfig(ch=32, ch_mult=(1, 1, 2, 2), z_channels=4)).eval()
    state_dict = ours.state_dict()
    path = tmp_path / "vae-ft-mse-ldm.pt"
    extras = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999)}
    torch.save({"state_dict": {**state_dict, **extras}}, path)
    loaded = create_tokenizer("sd-vae-ft-mse", weights=path, arch_overrides=TINY["sd-vae-ft-mse"])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected_mean, _ = ours.encode(images)
        torch.testing.assert_close(loaded.autoencoder.encode(images).latent_dist.mean, expected_mean)

    for extra in ("encoder.extra.weight", "decoder.up.1.upsample.conv.extra"):
        torch.save({"state_dict": {**state_dict, extra: torch.zeros(3)}}, path)
        with pytest.raises(ValueError, match=rf"unexpected keys: {extra.replace('.', '[.]')}$"):
            create_tokenizer("sd-vae-ft-mse", weights=path, arch_overrides=TINY["sd-vae-ft-mse"])


def test_missing_weights_offline_name_the_file_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as error:
        create_tokenizer("sd-vae-ft-mse", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "stabilityai/sd-vae-ft-mse" in message and "--tokenizer-weights" in message
    assert "pretrained=False" in message

    with pytest.raises(FileNotFoundError) as error:
        create_tokenizer("f8d4", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "sdvae-ft-mse-f8d4.pt" in message and str(tmp_path / "cache") in message
    assert "--tokenizer-weights" in message

    with pytest.raises(FileNotFoundError, match="hustvl/vavae-imagenet256-f16d32-dinov2"):
        create_tokenizer("va-vae", cache_dir=tmp_path / "cache")

    with pytest.raises(FileNotFoundError, match="nowhere.pt is not a file"):
        create_tokenizer("f16d32", weights=tmp_path / "nowhere.pt")


def test_weights_are_found_in_the_cache_dir(tmp_path):
    source = tiny_random("f8d4")
    torch.save(source.autoencoder_state_dict(), tmp_path / "sdvae-ft-mse-f8d4.pt")
    save_latent_stats(tmp_path / "sdvae-ft-mse-f8d4-latents-stats.pt", torch.zeros(4), torch.ones(4))
    loaded = create_tokenizer("f8d4", cache_dir=tmp_path, arch_overrides=TINY["f8d4"])
    assert torch.equal(loaded.autoencoder.quant_conv.weight, source.autoencoder.quant_conv.weight)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="sd-vae-ft-mse.*f16d32"):
        create_tokenizer("sdvae")


# ---- paths: which kind of file is it -----------------------------------------------------------------
def test_path_detection_from_ldm_keys_and_metadata(tmp_path):
    source = tiny_random("f16d32")
    path = tmp_path / "my-vae.pt"
    torch.save({"state_dict": source.autoencoder_state_dict()}, path)
    save_latent_stats(tmp_path / "my-vae-latents-stats.pt", torch.zeros(32), torch.ones(32))
    loaded = create_tokenizer(str(path), resolution=RESOLUTION)
    assert (loaded.latent_channels, loaded.downsample) == (32, 16)
    assert loaded.autoencoder.config.attn_resolutions == (16,)  # read off the keys
    images = random_images()
    assert torch.allclose(loaded.encode_moments(images), source.encode_moments(images))

    # Explicit metadata naming a registered architecture; the tiny weights then do not fit it.
    torch.save({"tokenizer": "f16d32", "state_dict": source.autoencoder_state_dict()}, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        create_tokenizer(str(path))


def test_full_size_architectures_are_recognised_from_their_keys():
    for name, config in LDM_CONFIGS.items():
        with torch.device("meta"):
            state_dict = LDMAutoencoderKL(config).state_dict()
        inferred = infer_ldm_config(state_dict)
        assert _same_architecture(inferred, config), name
    assert not _same_architecture(LDM_CONFIGS["f8d4"], LDM_CONFIGS["f16d32"])


def test_diffusers_folder_and_single_file(tmp_path):
    source, folder = save_through_reference_layout("sd-vae-ft-mse", tmp_path)
    from_folder = create_tokenizer(folder, resolution=RESOLUTION)  # detected from config.json
    images = random_images()
    assert torch.allclose(from_folder.encode_moments(images), source.encode_moments(images))
    assert torch.allclose(from_folder.latent_norm.scale, torch.tensor(0.18215))

    from safetensors.torch import save_file

    file = tmp_path / "vae.safetensors"
    save_file(source.autoencoder.state_dict(), file)
    from_file = create_tokenizer("sd-vae-ft-mse", weights=file, arch_overrides=TINY["sd-vae-ft-mse"])
    assert torch.allclose(from_file.encode_moments(images), source.encode_moments(images))
    with pytest.raises(ValueError, match="--tokenizer sd-vae-ft-mse --tokenizer-weights"):
        create_tokenizer(str(file))


# ---- frozen or trainable (REPA-E) ----------------------------------------------------------------------
def test_frozen_by_default_and_trainable_on_request():
    frozen = tiny_random("f8d4")
    assert frozen.frozen and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.nn.Sequential(frozen).train()  # a parent switching to training does not unfreeze it
    assert not frozen.training

    trainable = create_tokenizer("f8d4", pretrained=False, trainable=True, arch_overrides=TINY["f8d4"])
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    mean, logvar = trainable.posterior(images)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    trainable.decode_float(z).square().mean().backward()
    assert trainable.autoencoder.encoder.conv_in.weight.grad is not None


def test_posterior_logvar_is_clamped():
    tokenizer = tiny_random("f8d4")
    with torch.no_grad():
        tokenizer.autoencoder.quant_conv.bias[4:] = 1e4
        tokenizer.autoencoder.quant_conv.bias[:4] = 0.0
    _, logvar = tokenizer.posterior(torch.zeros(1, 3, 16, 16))
    assert logvar.max() == 20.0
    with torch.no_grad():
        tokenizer.autoencoder.quant_conv.bias[4:] = -1e4
    assert tokenizer.posterior(torch.zeros(1, 3, 16, 16))[1].min() == -30.0


def test_sample_uses_the_given_noise():
    tokenizer = create_tokenizer("pixels")
    moments = torch.cat([torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)], dim=1)
    noise = torch.full((1, 3, 2, 2), 2.0)
    assert torch.equal(tokenizer.sample(moments, noise=noise), torch.full((1, 3, 2, 2), 2.0))
    a = tokenizer.sample(moments, generator=torch.Generator().manual_seed(3))
    b = tokenizer.sample(moments, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---- the command line --------------------------------------------------------------------------------
def test_cli_stats_from_shards_and_from_an_image_folder(tmp_path):
    from repa.cli import main
    from repa.data.build import build_shards
    from repa.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "images", num_images=6, resolution=16, num_classes=2)
    build_shards(str(tmp_path / "images"), tmp_path / "shards", resolution=16, workers=0, shard_size=4)
    results = []
    for data in [tmp_path / "shards", tmp_path / "images"]:
        output = tmp_path / f"{data.name}-latents-stats.pt"
        argv = ["tokenizer", "stats", "pixels", "--data", str(data), "--output", str(output)]
        assert main(argv + ["--resolution", "16", "--batch-size", "4", "--device", "cpu"]) == 0
        results.append(load_latent_stats(output))
    assert torch.allclose(results[0].scale, results[1].scale)
    assert torch.allclose(results[0].bias, results[1].bias)


def test_cli_writes_the_stats_a_new_vae_file_then_loads_with(tmp_path):
    """The REPA-E workflow: a VAE file without statistics -> `repa tokenizer stats` -> sibling stats file."""
    from repa.cli import main
    from repa.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "images", num_images=4, resolution=16, num_classes=2)
    vae_file = tmp_path / "my-vae.pt"
    torch.save(tiny_random("f16d32").autoencoder_state_dict(), vae_file)
    with pytest.raises(FileNotFoundError, match="my-vae-latents-stats.pt"):
        create_tokenizer(str(vae_file))
    argv = ["tokenizer", "stats", str(vae_file), "--data", str(tmp_path / "images"), "--resolution", "16"]
    assert main(argv + ["--output", str(tmp_path / "my-vae-latents-stats.pt"), "--device", "cpu"]) == 0
    tokenizer = create_tokenizer(str(vae_file), resolution=16)
    assert tokenizer.latent_norm.scale.shape == (1, 32, 1, 1)


# ---- FLOPs ---------------------------------------------------------------------------------------------
def test_sd_vae_flops_match_the_published_figure():
    from repa.tokenizers.flops import tokenizer_flops

    sd_vae = tokenizer_flops("sd-vae-ft-mse", 256)
    assert abs((sd_vae["encoder"] + sd_vae["decoder"]) / 445.87e9 - 1) < 0.01
    assert abs(sd_vae["encoder"] / 135.6e9 - 1) < 0.01 and abs(sd_vae["decoder"] / 310.3e9 - 1) < 0.01
    assert tokenizer_flops("f8d4", 256) == sd_vae  # the same network in the LDM layout
    f16d32 = tokenizer_flops("f16d32", 256)
    assert f16d32["encoder"] < sd_vae["encoder"] and f16d32["decoder"] < sd_vae["decoder"]
    assert tokenizer_flops("pixels", 256) == {"encoder": 0, "decoder": 0}
