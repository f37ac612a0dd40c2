"""Backbone options of the SiT family: LightningDiT's block (SwiGLU, RMSNorm, 2-D RoPE, RMS qk-norm,
wo_shift), PixArt's adaLN-single and activation checkpointing, alone and in every combination with
each other and with the REPA tap; LightningDiT-XL/1's published key layout; `repa sample` on a
LightningDiT checkpoint; a tiny LightningDiT-style model trained through the loop.

Tiny widths (hidden 32, 2 heads) on CPU; the published widths only on the meta device.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from repa.analysis.flops import model_cost
from repa.config import AdaLNMode, ExperimentConfig
from repa.eval.checkpoints import infer_architecture, infer_model_name
from repa.models import config_for, create_model, list_models, load_state_dict_strict
from repa.models.rope import RotaryEmbedding2D, rope_2d_angles, rotate_pairs
from repa.models.sit import ADALN_MODES
from repa.models.swiglu import swiglu_hidden_size
from tests.test_train import shards, tiny_config  # noqa: F401 (the shards fixture)

TINY = dict(hidden_size=32, num_heads=2, num_classes=5)

# Every option as SiTConfig overrides; the combination test takes every subset of them.
OPTIONS = {
    "swiglu": dict(swiglu=True),
    "rmsnorm": dict(rmsnorm=True),
    "rope": dict(rope=True),
    "qk_norm": dict(qk_norm=True),
    "wo_shift": dict(wo_shift=True),
    "adaln_single": dict(adaln="single"),
    "grad_ckpt": dict(grad_checkpointing=True),
}
COMBINATIONS = [combo for size in range(len(OPTIONS) + 1) for combo in itertools.combinations(OPTIONS, size)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(combo) -> dict:
    merged = {}
    for name in combo:
        merged.update(OPTIONS[name])
    return merged


def _inputs(batch=2, channels=4, size=4):
    return torch.randn(batch, channels, size, size), torch.rand(batch), torch.randint(0, 5, (batch,))


def _randomise(model, scale=0.05):
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, scale)
    return model


# ---- every option, every combination, with the REPA tap at depth 8 -------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(c) or "plain")
def test_every_combination_with_the_repa_tap(combo):
    """Patch 1 on 4x4 latents (16 tokens), 9 blocks, REPA tap after block 8, two encoders."""
    options = _overrides(combo)
    model = create_model(
        "SiT-S/1", input_size=4, depth=9, align_depth=8, projector_out_dims=[16, 24], **TINY, **options
    )
    x, t, y = _inputs()

    # Zero init: the final layer starts at zero, so the velocity is exactly zero; with per-block
    # adaLN (adaLN-Zero) every block starts as the identity, with adaLN-single (PixArt) it does not.
    velocity, projections = model(x, t, y)
    assert torch.count_nonzero(velocity) == 0
    tokens, c = model._embed(x, t, y)
    after = model.blocks[0](tokens, model._block_condition(c), model.feat_rope)
    assert torch.equal(after, tokens) == (options.get("adaln", "block") == "block")

    # Shapes, the tap after block 8, gradients everywhere the losses reach.
    _randomise(model).train()
    seen = {}
    model.blocks[7].register_forward_hook(lambda m, i, out: seen.update(after8=out.detach()))
    velocity, projections = model(x, t, y)
    assert velocity.shape == x.shape and torch.isfinite(velocity).all()
    assert [tuple(p.shape) for p in projections] == [(2, 16, 16), (2, 16, 24)]
    torch.testing.assert_close(projections[0], model.projectors[0](seen["after8"]))
    (velocity.square().mean() + sum(p.mean() for p in projections)).backward()
    frozen = {"pos_embed"}
    missing = [n for n, p in model.named_parameters() if n not in frozen and p.grad is None]
    assert missing == [], missing
    model.eval()
    torch.testing.assert_close(model.velocity(x, t, y), model(x, t, y)[0])


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("LightningDiT")])
def test_every_registered_lightningdit_runs(name):
    model = create_model(name, input_size=4, depth=2, align_depth=1, projector_out_dims=[8], **TINY)
    assert (model.config.swiglu, model.config.rmsnorm, model.config.rope) == (True, True, True)
    assert not model.config.qk_norm and not model.config.wo_shift
    velocity, (projected,) = _randomise(model)(*_inputs())
    patch = int(name.split("/")[1])
    assert velocity.shape == (2, 4, 4, 4) and projected.shape == (2, (4 // patch) ** 2, 8)


def test_option_keys():
    keys = lambda **o: set(create_model("SiT-S/2", input_size=4, depth=1, **TINY, **o).state_dict())  # noqa: E731
    plain = keys()
    assert {"blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias"} <= keys(swiglu=True)
    assert {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "final_layer.norm_final.weight"} <= keys(
        rmsnorm=True
    )
    assert keys(rope=True) == plain  # RoPE tables are rebuilt, never saved
    rms_qk = keys(qk_norm=True, rmsnorm=True)
    assert "blocks.0.attn.q_norm.weight" in rms_qk and "blocks.0.attn.q_norm.bias" not in rms_qk
    assert "blocks.0.attn.q_norm.bias" in keys(qk_norm=True)  # LayerNorm form without --rmsnorm
    single = keys(adaln="single")
    assert {
        "t_block.1.weight",
        "blocks.0.scale_shift_table",
        "final_layer.adaLN_modulation.1.weight",
    } <= single
    assert not any(k.startswith("blocks.0.adaLN_modulation") for k in single)
    shapes = {k: v.shape for k, v in create_model("SiT-S/2", input_size=4, depth=1, wo_shift=True, **TINY)
              .state_dict().items()}  # fmt: skip
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (4 * 32, 32)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * 32, 32)  # the final layer keeps its shift
    single_wo = create_model("SiT-S/2", input_size=4, depth=1, wo_shift=True, adaln="single", **TINY)
    assert single_wo.blocks[0].scale_shift_table.shape == (4, 32)


def test_bad_combinations_name_the_flags():
    with pytest.raises(ValueError) as info:
        config_for("SiT-S/2", hidden_size=36, num_heads=6, rope=True)  # head width 6
    for word in ("--rope", "--hidden-size 36", "--num-heads 6", "6"):
        assert word in str(info.value)
    with pytest.raises(ValueError, match="--adaln 'shared'"):
        config_for("SiT-S/2", adaln="shared")
    # The same check runs when a training config is validated, before anything is built.
    values = {"model": {"name": "SiT-S/2", "hidden_size": 36, "num_heads": 6, "rope": True}}
    with pytest.raises(ValueError, match="--rope needs a head width divisible by 4"):
        ExperimentConfig.from_dict({**values, "encoder": {"encoder": "none"}}).validate()


def test_config_flags_reach_the_model():
    assert tuple(AdaLNMode.__args__) == ADALN_MODES
    config = ExperimentConfig.from_dict({"model": {"name": "LightningDiT-XL/1"}})
    overrides = config.model_overrides(input_size=16, in_channels=32)
    built = config_for(config.model.name, **overrides)
    assert (built.swiglu, built.rmsnorm, built.rope, built.adaln) == (True, True, True, "block")
    config = ExperimentConfig.from_dict(
        {"model": {"name": "LightningDiT-XL/1", "rope": False, "adaln": "single", "grad_checkpointing": True}}
    )
    built = config_for(config.model.name, **config.model_overrides(input_size=16, in_channels=32))
    assert (built.swiglu, built.rope, built.adaln, built.grad_checkpointing) == (True, False, "single", True)
    config = ExperimentConfig.from_dict({"model": {"name": "SiT-XL/2", "swiglu": True}})
    built = config_for(config.model.name, **config.model_overrides(input_size=32))
    assert (built.swiglu, built.rmsnorm, built.rope) == (True, False, False)


# ---- SwiGLU and RMSNorm ---------------------------------------------------------------------------


def test_swiglu_width_rule_and_math():
    # LightningDiT's int(2/3 * 4D), no rounding (MODERN-RECIPE facts, checked in the test too).
    widths = {384: 1024, 768: 2048, 1024: 2730, 1152: 3072, 1536: 4096, 1792: 4778}
    assert {d: swiglu_hidden_size(d) for d in widths} == widths
    model = create_model("SiT-S/2", input_size=4, depth=1, swiglu=True, **TINY)
    mlp = _randomise(model.blocks[0].mlp)
    x = torch.randn(3, 32)
    hidden = swiglu_hidden_size(32)  # int(2/3 * 128) = 85
    assert mlp.w12.weight.shape == (2 * hidden, 32) and mlp.w3.weight.shape == (32, hidden)
    a, b = mlp.w12(x)[:, :hidden], mlp.w12(x)[:, hidden:]
    torch.testing.assert_close(mlp(x), mlp.w3(torch.nn.functional.silu(a) * b))


def test_rmsnorm_formula():
    model = create_model("SiT-S/2", input_size=4, depth=1, rmsnorm=True, **TINY)
    norm = model.blocks[0].norm1
    assert torch.equal(norm.weight, torch.ones(32))
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


# ---- RoPE -----------------------------------------------------------------------------------------


def test_rope_axis_split_on_a_hand_computed_case():
    """head_dim 8 on a 3x3 grid: per axis 4 channels, frequencies 10000^(-0/4) = 1 and
    10000^(-2/4) = 0.01, each for a channel pair; the first 4 channels turn with the row, the last
    4 with the column. Token 5 is (row 1, col 2)."""
    angles = rope_2d_angles(8, 3)
    assert angles.shape == (9, 8)
    assert angles[5].tolist() == pytest.approx([1, 1, 0.01, 0.01, 2, 2, 0.02, 0.02])
    assert angles[3].tolist() == pytest.approx([1, 1, 0.01, 0.01, 0, 0, 0, 0])  # (row 1, col 0)
    rope = RotaryEmbedding2D(8, 3)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    out = rope(x.expand(9, 8))[5]
    # pair (a, b) -> (a cos - b sin, b cos + a sin) with the pair's angle
    expected = []
    for i, angle in zip(range(0, 8, 2), (1.0, 0.01, 2.0, 0.02)):
        a, b = x[i].item(), x[i + 1].item()
        expected += [a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)
    assert rotate_pairs(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_rope_logits_depend_only_on_the_relative_position():
    """q at token a and k at token b: the logit <R_a q, R_b k> is unchanged when both tokens move
    by the same (rows, cols) shift, and changes when only one moves."""
    grid, head_dim = 6, 16
    rope = RotaryEmbedding2D(head_dim, grid)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    cos, sin = rope.freqs_cos.double(), rope.freqs_sin.double()

    def logit(qpos, kpos):
        a, b = qpos[0] * grid + qpos[1], kpos[0] * grid + kpos[1]
        rq = q * cos[a] + rotate_pairs(q) * sin[a]
        rk = k * cos[b] + rotate_pairs(k) * sin[b]
        return (rq @ rk).item()

    base = logit((0, 1), (2, 0))
    for shift in ((1, 0), (0, 3), (3, 2), (2, 5 - 1)):
        shifted = logit((0 + shift[0], 1 + shift[1]), (2 + shift[0], 0 + shift[1]))
        assert shifted == pytest.approx(base, abs=1e-6)
    assert abs(logit((0, 1), (2, 1)) - base) > 1e-3  # not trivially constant
    assert abs(logit((1, 1), (2, 0)) - base) > 1e-3


def test_rope_is_applied_to_q_and_k_after_qk_norm():
    model = _randomise(create_model("SiT-S/2", input_size=4, depth=1, rope=True, qk_norm=True, **TINY))
    attn, calls = model.blocks[0].attn, []
    attn.q_norm.register_forward_hook(lambda *a: calls.append("q_norm"))
    model.feat_rope.register_forward_hook(lambda *a: calls.append("rope"))
    model.velocity(*_inputs())
    assert calls == ["q_norm", "rope", "rope"]
    # And it matters: the same weights without RoPE give another velocity.
    plain = create_model("SiT-S/2", input_size=4, depth=1, qk_norm=True, **TINY)
    plain.load_state_dict(model.state_dict())
    x, t, y = _inputs()
    assert not torch.allclose(plain.velocity(x, t, y), model.velocity(x, t, y))


def test_tables_are_rebuilt_for_another_resolution():
    """Weights trained on a 2x2 token grid load into a 4x4 model (RoPE and the sin-cos pos_embed
    are rebuilt; every learned weight is read) and sample there."""
    small = _randomise(create_model("LightningDiT-B/2", input_size=4, depth=2, **TINY))
    large = create_model("LightningDiT-B/2", input_size=8, depth=2, **TINY)
    assert large.feat_rope.freqs_cos.shape == (16, 16)
    load_state_dict_strict(large, small.state_dict())
    for key, value in small.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(large.state_dict()[key], value), key
    assert large.velocity(*_inputs(size=8)).shape == (2, 4, 8, 8)
    # A learned (not sin-cos) pos_embed of another grid is still refused.
    state = small.state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    with pytest.raises(ValueError, match="shape mismatch: pos_embed"):
        load_state_dict_strict(large, state)


# ---- adaLN-single ---------------------------------------------------------------------------------


def test_adaln_single_parameter_count():
    """SiT-XL/2: about 675M -> 460M (MODERN-RECIPE's arithmetic: -215.0M, -31.8%), within 0.5%."""
    standard = model_cost("SiT-XL/2")
    single = model_cost("SiT-XL/2", adaln="single")
    assert standard.parameters / 1e6 == pytest.approx(675.1, abs=0.1)
    assert single.parameters / 1e6 == pytest.approx(460, rel=0.005)
    assert (standard.parameters - single.parameters) / standard.parameters == pytest.approx(0.318, abs=0.001)
    # exactly: 28 blocks lose Linear(1152, 6912); one shared Linear and 28 tables of 6 x 1152 come in
    per_block = 1152 * 6912 + 6912
    assert standard.parameters - single.parameters == 28 * per_block - per_block - 28 * 6 * 1152
    assert single.flops < standard.flops  # adaLN runs once per sample, no longer once per block


def test_adaln_single_modulation_is_shared_plus_table():
    model = _randomise(create_model("SiT-S/2", input_size=4, depth=2, adaln="single", **TINY))
    c = torch.randn(3, 32)
    shared = model._block_condition(c)
    assert shared.shape == (3, 6 * 32)
    for block in model.blocks:
        expected = shared.view(3, 6, 32) + block.scale_shift_table
        for got, want in zip(block.modulation(shared), expected.unbind(1)):
            torch.testing.assert_close(got, want)
    # class and time both enter through it: another label changes the modulation
    x, t, _ = _inputs(batch=1)
    _, c0 = model._embed(x, t, torch.tensor([0]))
    _, c1 = model._embed(x, t, torch.tensor([1]))
    assert not torch.allclose(model._block_condition(c0), model._block_condition(c1))


# ---- activation checkpointing ---------------------------------------------------------------------


def test_grad_checkpointing_gives_the_same_gradients():
    options = dict(swiglu=True, rmsnorm=True, rope=True, qk_norm=True, adaln="single", **TINY)
    torch.manual_seed(0)
    plain = _randomise(create_model("SiT-S/1", input_size=4, depth=3, align_depth=2, projector_out_dims=[8],
                                    **options)).train()  # fmt: skip
    checkpointed = create_model(
        "SiT-S/1",
        input_size=4,
        depth=3,
        align_depth=2,
        projector_out_dims=[8],
        grad_checkpointing=True,
        **options,
    ).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = _inputs()
    drop = torch.tensor([False, True])
    runs = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        calls = []
        # a pre-hook: the recomputation stops once it has what the backward needs, before the
        # block returns, so forward hooks would not see it
        model.blocks[0].register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        velocity, (projected,) = model(x, t, y, force_drop_ids=drop)
        (velocity.square().mean() - projected.mean()).backward()
        runs[name] = (
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            len(calls),
        )
    grads, calls = runs["plain"]
    grads_ckpt, calls_ckpt = runs["checkpointed"]
    assert (calls, calls_ckpt) == (1, 2)  # the checkpointed block ran again in the backward pass
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name
    # training only: no recomputation (and no checkpoint) in eval mode or without gradients
    calls = []
    checkpointed.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        checkpointed(x, t, y)
    checkpointed.eval()
    checkpointed(x, t, y)[0].sum().backward()
    assert len(calls) == 2


# ---- LightningDiT-XL/1: the published key layout ---------------------------------------------------


def lightningdit_xl1_shapes() -> dict[str, tuple[int, ...]]:
    """The released LightningDiT-XL/1 state dict (reference section 2.8): D 1152, SwiGLU hidden
    3072, 32-channel latents at 16x16, patch 1, RoPE tables [256, 72]."""
    shapes = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 32, 1, 1),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "feat_rope.freqs_cos": (256, 72),
        "feat_rope.freqs_sin": (256, 72),
        "final_layer.norm_final.weight": (1152,),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    for n in range(28):
        shapes.update({
            f"blocks.{n}.norm1.weight": (1152,),
            f"blocks.{n}.norm2.weight": (1152,),
            f"blocks.{n}.attn.qkv.weight": (3456, 1152),
            f"blocks.{n}.attn.qkv.bias": (3456,),
            f"blocks.{n}.attn.proj.weight": (1152, 1152),
            f"blocks.{n}.attn.proj.bias": (1152,),
            f"blocks.{n}.mlp.w12.weight": (6144, 1152),
            f"blocks.{n}.mlp.w12.bias": (6144,),
            f"blocks.{n}.mlp.w3.weight": (1152, 3072),
            f"blocks.{n}.mlp.w3.bias": (1152,),
            f"blocks.{n}.adaLN_modulation.1.weight": (6912, 1152),
            f"blocks.{n}.adaLN_modulation.1.bias": (6912,),
        })  # fmt: skip
    return shapes


@pytest.mark.parametrize("with_rope_tables", [True, False], ids=["rope-tables", "rope-filtered"])
def test_lightningdit_xl1_layout_loads_strictly_with_inferred_architecture(with_rope_tables):
    shapes = lightningdit_xl1_shapes()
    # 675,256,736 parameters, as LightningDiT's log reports (675.26M); the RoPE tables are buffers.
    assert sum(math.prod(s) for k, s in shapes.items() if not k.startswith("feat_rope")) == 675_256_736
    if not with_rope_tables:
        shapes = {k: s for k, s in shapes.items() if not k.startswith("feat_rope")}
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    architecture = infer_architecture(state)
    assert infer_model_name(architecture) == "LightningDiT-XL/1"
    assert architecture["swiglu"] and architecture["rmsnorm"] and not architecture["wo_shift"]
    assert (architecture["in_channels"], architecture["input_size"], architecture["patch_size"]) == (
        32,
        16,
        1,
    )
    with torch.device("meta"):
        model = create_model("LightningDiT-XL/1", **architecture)
    assert model.config.rope and model.config.num_heads == 16
    load_state_dict_strict(model, state)
    assert set(model.state_dict()) == {k for k in shapes if not k.startswith("feat_rope")}
    assert model_cost("LightningDiT-XL/1", latent_downsample=16, latent_channels=32).parameters == 675_256_736


def lightningdit_rope_tables(head_dim: int, grid: int, swap_axes: bool = False):
    """LightningDiT's tables written from the reference's description (section 2.4), separately
    from repa/models/rope.py: dim = head_dim / 2, f_k = 10000^(-2k/dim), pairs repeated, the row
    half first, the column half second, flattened row-major."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (np.arange(0, dim, 2)[: dim // 2] / dim))
    per_axis = np.repeat(np.arange(grid)[:, None] * freqs[None], 2, axis=1)  # (grid, dim)
    rows = np.broadcast_to(per_axis[:, None, :], (grid, grid, dim))
    cols = np.broadcast_to(per_axis[None, :, :], (grid, grid, dim))
    halves = (cols, rows) if swap_axes else (rows, cols)
    table = np.concatenate(halves, axis=-1).reshape(grid * grid, head_dim)
    return torch.from_numpy(np.cos(table)).float(), torch.from_numpy(np.sin(table)).float()


def tiny_lightningdit_state(seed=0):
    """A LightningDiT-B/1 at width 48 (12 heads of 4, as registered), 2 blocks, 32 channels on a
    4x4 latent: its state dict in the published layout with the RoPE tables it would carry."""
    torch.manual_seed(seed)
    model = _randomise(
        create_model("LightningDiT-B/1", input_size=4, in_channels=32, hidden_size=48, depth=2, num_classes=5)
    )
    state = dict(model.state_dict())
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = lightningdit_rope_tables(4, 4)
    return model, state


def test_lightningdit_rope_tables_are_checked_on_load():
    model, state = tiny_lightningdit_state()
    fresh = create_model("LightningDiT-B/1", **infer_architecture(state))
    load_state_dict_strict(fresh, state)  # its own tables agree with ours: dropped
    x, t, y = _inputs(channels=32)
    torch.testing.assert_close(fresh.eval().velocity(x, t, y), model.eval().velocity(x, t, y))
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = lightningdit_rope_tables(
        4, 4, swap_axes=True
    )
    with pytest.raises(ValueError, match="feat_rope.freqs_cos differs"):
        load_state_dict_strict(fresh, state)
    # a model without RoPE refuses them, with a hint at the option
    state = tiny_lightningdit_state()[1]
    no_rope = create_model("LightningDiT-B/1", **{**infer_architecture(state), "rope": False})
    with pytest.raises(ValueError, match=r"(?s)unexpected: feat_rope.*option\(s\) rope \(--rope\)"):
        load_state_dict_strict(no_rope, state)


def test_reverse_time_wraps_weights_trained_with_t1_data():
    model = _randomise(create_model("SiT-S/2", input_size=4, depth=1, **TINY)).eval()
    wrapped = create_model("SiT-S/2", input_size=4, depth=1, reverse_time=True, **TINY).eval()
    wrapped.load_state_dict(model.state_dict())
    x, t, y = _inputs()
    torch.testing.assert_close(wrapped.velocity(x, t, y), -model.velocity(x, 1 - t, y))


def test_repa_sample_runs_a_lightningdit_checkpoint(tmp_path):
    """LightningDiT's training file ({model, ema, opt, config} with its own YAML as config) through
    `repa sample`: the model is named by its config, the rest read off the keys, the time
    convention wrapped; 3-channel CFG as LightningDiT samples."""
    from repa.cli import main
    from repa.eval.checkpoints import load_generator
    from repa.tokenizers import create_tokenizer, save_latent_stats

    model, state = tiny_lightningdit_state()
    their_config = {"model": {"model_type": "LightningDiT-B/1", "use_rope": True, "use_swiglu": True,
                              "use_rmsnorm": True, "in_chans": 32}, "transport": {"use_lognorm": True},
                    "sample": {"cfg_scale": 6.7, "cfg_interval_start": 0.125}}  # fmt: skip
    path = tmp_path / "0080000.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "config": their_config}, path)
    vae = create_tokenizer("f16d32", resolution=8, pretrained=False, arch_overrides=TINY_VAE32,
                           require_stats=False)  # fmt: skip
    torch.save(vae.autoencoder_state_dict(), tmp_path / "vae.pt")
    save_latent_stats(tmp_path / "vae-latents-stats.pt", torch.zeros(32), torch.ones(32))

    generator = load_generator(path, tokenizer=str(tmp_path / "vae.pt"))
    assert generator.model.config.reverse_time and generator.model.config.rope
    assert (generator.resolution, generator.latent_shape) == (8, (32, 4, 4))
    x, t, y = _inputs(channels=32)
    torch.testing.assert_close(generator.model.velocity(x, t, y), -model.eval().velocity(x, 1 - t, y))

    # --cfg-channels reaches the sampler: guiding 3 of 32 channels differs from guiding all
    from repa.eval.sample import SamplerSettings, generate_batch

    settings = SamplerSettings(mode="ode", num_steps=2, cfg_scale=4.0, guidance_high=1.0, precision="fp32")
    labels = torch.tensor([0, 1])
    full = generate_batch(generator, labels, [0, 1], settings)
    three = generate_batch(
        generator, labels, [0, 1], SamplerSettings(**{**settings.to_dict(), "cfg_channels": 3})
    )
    assert not torch.equal(full, three)

    output = tmp_path / "samples.npz"
    argv = ["sample", str(path), "--tokenizer", str(tmp_path / "vae.pt"), "--num-samples", "3",
            "--mode", "ode", "--num-steps", "2", "--cfg-scale", "4", "--cfg-channels", "3",
            "--guidance-high", "0.875", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    with np.load(output) as data:
        assert data["arr_0"].shape == (3, 8, 8, 3)


# ---- a tiny LightningDiT-style model trains through the loop ---------------------------------------

# A random LDM-layout VAE with 32 latent channels at f2 (the f16d32 layout, shrunk).
TINY_VAE32 = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (), "z_channels": 32}


@pytest.fixture(scope="module")
def vae32_file(tmp_path_factory):
    from repa.tokenizers import create_tokenizer, save_latent_stats

    torch.manual_seed(0)
    vae = create_tokenizer("f16d32", resolution=16, pretrained=False, arch_overrides=TINY_VAE32,
                           require_stats=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("vae32")
    state = vae.autoencoder_state_dict()
    # A narrow posterior (log-variance -12): random weights would otherwise give std ~1 around
    # means of std ~0.2, latents that are mostly noise, with nothing for a model to learn.
    state["quant_conv.weight"][32:] = 0
    state["quant_conv.bias"][32:] = -12
    torch.save(state, folder / "tiny-vae32.pt")
    save_latent_stats(folder / "tiny-vae32-latents-stats.pt", torch.zeros(32), torch.full((32,), 0.2))
    return str(folder / "tiny-vae32.pt")


@pytest.mark.slow
def test_tiny_lightningdit_trains_on_32_channel_latents(shards, vae32_file, tmp_path):  # noqa: F811
    """LightningDiT-B/1 shrunk (SwiGLU + RMSNorm + RoPE, patch 1) on 8x8x32 latents of a 32-channel
    VAE, through repa.train.loop.train with activation checkpointing: the loss falls."""
    from safetensors.torch import load_file

    from repa.runs import latest_checkpoint
    from repa.train.logging import read_metrics
    from repa.train.loop import train

    steps = 200
    config = tiny_config(shards, tmp_path, max_train_steps=steps, checkpointing_steps=steps)
    config.model.name = "LightningDiT-B/1"
    config.model.grad_checkpointing = True
    config.tokenizer.tokenizer = vae32_file
    run = train(config)
    ema = load_file(latest_checkpoint(run.run_dir / "checkpoints") / "ema.safetensors")
    assert ema["x_embedder.proj.weight"].shape == (32, 32, 1, 1)  # 32 channels in, patch 1
    assert {"blocks.0.mlp.w12.weight", "blocks.0.norm1.weight"} <= set(ema)
    losses = [record["loss"] for record in read_metrics(run.run_dir)]
    assert len(losses) == steps
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:5]) / 5
