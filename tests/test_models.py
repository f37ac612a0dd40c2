"""The SiT backbone: shapes for every size and patch, zero init, REPA tap, keys, validation."""

import math

import pytest
import torch

from repa.models import (
    SiTConfig,
    config_for,
    convert_legacy_state_dict,
    create_model,
    list_models,
    load_state_dict_strict,
    unwrap_checkpoint,
)
from repa.models.layers import TimestepEmbedder, sincos_pos_embed_2d
from repa.models.sit import SIZES

# Small widths keep CPU cost down while every registered size and patch builds through the
# registry; the registered widths are checked on the meta device below.
TINY = dict(hidden_size=32, num_heads=2, depth=3, align_depth=2, num_classes=5)


def _inputs(batch=2, channels=4, size=8):
    return (
        torch.randn(batch, channels, size, size),
        torch.rand(batch),
        torch.randint(0, 5, (batch,)),
    )


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("SiT")])
def test_every_registered_size_and_patch_runs(name):
    model = create_model(name, input_size=8, projector_out_dims=[16, 24], **TINY)
    for p in model.parameters():  # break the zero init so outputs are not trivially zero
        p.data.normal_(0, 0.02)
    x, t, y = _inputs()
    velocity, projections = model(x, t, y)
    assert velocity.shape == x.shape
    patch = int(name.split("/")[1])
    tokens = (8 // patch) ** 2
    assert [tuple(p.shape) for p in projections] == [(2, tokens, 16), (2, tokens, 24)]
    assert torch.isfinite(velocity).all()


@pytest.mark.parametrize("size", list(SIZES))
def test_registered_widths_build_on_meta(size):
    # The reference repo's SiT-S configs are broken (final layer built for 768 inputs): ours run.
    with torch.device("meta"):
        model = create_model(f"SiT-{size}/2", projector_out_dims=[768])
        velocity, (projected,) = model(
            torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long)
        )
    depth, hidden, heads = SIZES[size]
    assert (
        len(model.blocks) == depth and model.config.hidden_size == hidden and model.config.num_heads == heads
    )
    assert velocity.shape == (2, 4, 32, 32) and projected.shape == (2, 256, 768)


def test_zero_initialised_model_outputs_zeros():
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY)
    velocity, projections = model(*_inputs())
    assert torch.count_nonzero(velocity) == 0
    assert projections[0].abs().sum() > 0  # the projector is not zero-initialised


def test_velocity_skips_projectors_and_matches_forward():
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    calls = []
    model.projectors[0].register_forward_hook(lambda *a: calls.append(1))
    x, t, y = _inputs()
    velocity = model.velocity(x, t, y)
    assert calls == []
    full, _ = model(x, t, y)
    assert len(calls) == 1
    torch.testing.assert_close(velocity, full)


def test_align_only_stops_at_the_tap():
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))
    model.final_layer.register_forward_hook(lambda *a: ran.append("final"))
    x, t, y = _inputs()
    velocity, (projected,) = model(x, t, y, align_only=True)
    assert velocity is None and ran == [0, 1]  # align_depth=2: blocks 1 and 2 only
    _, (projected_full,) = model(x, t, y)
    torch.testing.assert_close(projected, projected_full)


def test_tap_is_after_block_align_depth():
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, out: seen.setdefault("after2", out))
    x, t, y = _inputs()
    _, (projected,) = model(x, t, y)
    torch.testing.assert_close(projected, model.projectors[0](seen["after2"]))


def test_label_dropout_only_in_training():
    model = create_model("SiT-S/2", input_size=8, class_dropout_prob=1.0, **TINY)
    labels = torch.tensor([0, 1, 2])
    null = model.y_embedder.embedding_table.weight[model.null_label]
    model.train()
    assert torch.equal(model.y_embedder(labels, train=True), null.expand(3, -1))
    model.eval()
    assert not torch.equal(model.y_embedder(labels, train=False), null.expand(3, -1))


def test_unpatchify_order_is_row_col_channel():
    model = create_model("SiT-S/2", input_size=4, in_channels=3, **TINY)
    # token (row 0, col 1) holds values for pixels rows 0..1, cols 2..3, channel fastest
    tokens = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).reshape(1, 4, 12)
    image = model.unpatchify(tokens)
    assert image.shape == (1, 3, 4, 4)
    # token 1 = grid (0, 1); its entry (p_row=1, p_col=0, c=2) is index 1*6 + 0*3 + 2 = 8
    assert image[0, 2, 1, 2] == tokens[0, 1, 8]


def test_pos_embed_layout():
    embed = sincos_pos_embed_2d(8, 3)  # (9, 8): first 4 channels encode the column, last 4 the row
    assert embed.shape == (9, 8)
    # token 1 is (row 0, col 1); w = 10000^(-k/2) = [1, 0.01], so its column half is
    # [sin(1), sin(0.01), cos(1), cos(0.01)]
    expected = [math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]
    assert embed[1, :4].tolist() == pytest.approx(expected, abs=1e-6)
    assert (embed[1, 4:] == embed[0, 4:]).all()  # same row


def test_timestep_features_use_raw_t():
    features = TimestepEmbedder.sinusoidal_features(torch.tensor([0.5]), 256)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    torch.testing.assert_close(features[0, :128], torch.cos(0.5 * freqs))
    torch.testing.assert_close(features[0, 128:], torch.sin(0.5 * freqs))


def test_state_dict_keys_match_published_sit_xl2():
    with torch.device("meta"):
        model = create_model("SiT-XL/2", projector_out_dims=[768])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "projectors.0.0.weight": (2048, 1152),
        "projectors.0.0.bias": (2048,),
        "projectors.0.2.weight": (2048, 2048),
        "projectors.0.2.bias": (2048,),
        "projectors.0.4.weight": (768, 2048),
        "projectors.0.4.bias": (768,),
        "final_layer.linear.weight": (16, 1152),
        "final_layer.linear.bias": (16,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    for n in range(28):
        expected.update(
            {
                f"blocks.{n}.attn.qkv.weight": (3456, 1152),
                f"blocks.{n}.attn.qkv.bias": (3456,),
                f"blocks.{n}.attn.proj.weight": (1152, 1152),
                f"blocks.{n}.attn.proj.bias": (1152,),
                f"blocks.{n}.mlp.fc1.weight": (4608, 1152),
                f"blocks.{n}.mlp.fc1.bias": (4608,),
                f"blocks.{n}.mlp.fc2.weight": (1152, 4608),
                f"blocks.{n}.mlp.fc2.bias": (1152,),
                f"blocks.{n}.adaLN_modulation.1.weight": (6912, 1152),
                f"blocks.{n}.adaLN_modulation.1.bias": (6912,),
            }
        )
    assert shapes == expected


def test_optional_qk_norm_and_repae_bn_keys():
    model = create_model("SiT-S/2", input_size=8, qk_norm=True, latent_batchnorm=True, **TINY)
    keys = set(model.state_dict())
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"} <= keys
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= keys


def test_latent_batchnorm_round_trip():
    model = create_model("SiT-S/2", input_size=8, latent_batchnorm=True, **TINY)
    model.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    model.bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    model.eval()
    latents = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(model.denormalize_latents(model.normalize_latents(latents)), latents)


def test_strict_load_round_trip_and_legacy_names():
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    # The legacy layout stored blocks after the tap as decoder_blocks.(i - align_depth).
    legacy = {}
    for key, value in state.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= 2:
            index, rest = key[len("blocks.") :].split(".", 1)
            key = f"decoder_blocks.{int(index) - 2}.{rest}"
        legacy[key] = value
    assert any(k.startswith("decoder_blocks.") for k in legacy)
    assert convert_legacy_state_dict(legacy, align_depth=2).keys() == state.keys()
    fresh = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY)
    load_state_dict_strict(fresh, unwrap_checkpoint({"model": {}, "ema": legacy, "args": None}))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_strict_load_reports_what_differs():
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY)
    state = model.state_dict()
    del state["final_layer.linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(model, state)
    message = str(info.value)
    assert "missing: final_layer.linear.bias" in message
    assert "unexpected: extra.weight" in message
    assert "pos_embed" in message and "shape" in message


def test_strict_load_refuses_an_unexpected_key_alone():
    """Every key of the model with its shape, plus one it lacks (also under a DDP prefix, which the
    loader strips): refused, naming the key. The test above also drops a key and breaks a shape, so
    it raises even where unexpected keys are ignored."""
    model = create_model("SiT-S/2", input_size=8, projector_out_dims=[16], **TINY)
    for extra in ("extra.weight", "module.extra.weight"):
        state = {**model.state_dict(), extra: torch.zeros(1)}
        with pytest.raises(ValueError) as info:
            load_state_dict_strict(model, state)
        message = str(info.value)
        assert "unexpected: extra.weight" in message
        assert "missing" not in message and "shape" not in message


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(align_depth=0, projector_out_dims=[8]), ["align depth 0", "1..3"]),
        (dict(align_depth=4, projector_out_dims=[8]), ["align depth 4", "1..3"]),
        (dict(input_size=9), ["latent size 9", "patch size 2", "[1]"]),
        (dict(num_heads=5), ["divisible", "5"]),
    ],
)
def test_bad_configs_name_the_problem(overrides, words):
    with pytest.raises(ValueError) as info:
        config_for("SiT-S/2", **{**TINY, **overrides})
    for word in words:
        assert word in str(info.value)


def test_unknown_model_and_option_list_the_choices():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        create_model("SiT-XXL/2")
    with pytest.raises(ValueError, match="align_depth"):
        create_model("SiT-S/2", encoder_depth=8)


def test_wrong_latent_shape_is_reported():
    model = create_model("SiT-S/2", input_size=8, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_config_defaults_are_repa():
    config = SiTConfig()
    assert (config.depth, config.hidden_size, config.patch_size, config.align_depth) == (28, 1152, 2, 8)
    assert config.class_dropout_prob == 0.1 and config.projector_dim == 2048
