"""REPA's MMDiT: shapes, the zero/identity start, the text mask and null caption, and a state dict in
REPA's key layout (`joint_blocks.N.x_block.*`, `context_block.*`) that loads strictly and computes
what REPA's maths computes (re-derived below from the state dict alone)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repa.models import load_state_dict_strict
from repa.models.mmdit import MMDIT_MODELS, MMDiT, create_mmdit, mmdit_config

DEPTH, CONTEXT_DIM, LENGTH = 3, 12, 6


def tiny(**overrides) -> MMDiT:
    options = dict(input_size=8, in_channels=4, context_dim=CONTEXT_DIM, context_length=LENGTH, align_depth=2)
    options.update(projector_out_dims=[10], projector_dim=16, mlp_ratio=2.0)
    torch.manual_seed(0)
    return MMDiT(mmdit_config(DEPTH, **{**options, **overrides}))  # hidden 96, 3 heads


def inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.rand(batch, generator=generator)
    context = torch.randn(batch, LENGTH, CONTEXT_DIM, generator=generator)
    return x, t, context


def repa_keys(depth: int, hidden: int, patch: int, channels: int, context_dim: int, projector: tuple) -> dict:
    """REPA's MMDiT state dict keys and shapes (models/mmdit.py with its defaults: qkv bias,
    no qk-norm, no registers, no y_embedder, Linear context embedder)."""
    keys = {
        "pos_embed": (1, None, hidden),
        "x_embedder.proj.weight": (hidden, channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "context_embedder.weight": (hidden, context_dim),
        "context_embedder.bias": (hidden,),
        "final_layer.linear.weight": (patch * patch * channels, hidden),
        "final_layer.linear.bias": (patch * patch * channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    projector_dim, target_dim = projector
    for index, (rows, columns) in enumerate(
        [(projector_dim, hidden), (projector_dim, projector_dim), (target_dim, projector_dim)]
    ):
        keys[f"projectors.0.{2 * index}.weight"] = (rows, columns)
        keys[f"projectors.0.{2 * index}.bias"] = (rows,)
    for block in range(depth):
        for stream in ("context_block", "x_block"):
            prefix = f"joint_blocks.{block}.{stream}"
            pre_only = stream == "context_block" and block == depth - 1
            keys[f"{prefix}.attn.qkv.weight"] = (3 * hidden, hidden)
            keys[f"{prefix}.attn.qkv.bias"] = (3 * hidden,)
            modulations = 2 if pre_only else 6
            keys[f"{prefix}.adaLN_modulation.1.weight"] = (modulations * hidden, hidden)
            keys[f"{prefix}.adaLN_modulation.1.bias"] = (modulations * hidden,)
            if not pre_only:
                keys[f"{prefix}.attn.proj.weight"] = (hidden, hidden)
                keys[f"{prefix}.attn.proj.bias"] = (hidden,)
                keys[f"{prefix}.mlp.fc1.weight"] = (2 * hidden, hidden)  # mlp_ratio 2 in these tests
                keys[f"{prefix}.mlp.fc1.bias"] = (2 * hidden,)
                keys[f"{prefix}.mlp.fc2.weight"] = (hidden, 2 * hidden)
                keys[f"{prefix}.mlp.fc2.bias"] = (hidden,)
    return keys


def reference_velocity(state: dict, x, t, context, *, depth: int, heads: int, patch: int, tap: int):
    """REPA's MMDiT forward on a raw state dict: patch embed + pos_embed, t embedding, a Linear on
    the text, per joint block each stream modulates its LayerNorm'd tokens with its own adaLN
    (shift, scale, gate x2), attention over [text; image] with the heads split (3, heads, d) per
    token, gated residual + modulated MLP; the last text stream stops at its qkv."""

    def linear(name, value):
        return F.linear(value, state[f"{name}.weight"], state[f"{name}.bias"])

    def norm(value):
        return F.layer_norm(value, value.shape[-1:], eps=1e-6)

    tokens = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + state["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # float32 features, as every SiT's
    features = torch.cat([angles.cos(), angles.sin()], -1).to(x.dtype)
    c = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", features)))
    text = linear("context_embedder", context)
    hidden = tokens.shape[-1]
    projection = None
    for block in range(depth):
        qkvs, rests = [], []
        for stream, value in (("context_block", text), ("x_block", tokens)):
            prefix = f"joint_blocks.{block}.{stream}"
            modulation = linear(f"{prefix}.adaLN_modulation.1", F.silu(c)).chunk(
                state[f"{prefix}.adaLN_modulation.1.bias"].shape[0] // hidden, -1
            )
            shift, scale = modulation[0][:, None], modulation[1][:, None]
            qkv = linear(f"{prefix}.attn.qkv", norm(value) * (1 + scale) + shift)
            qkvs.append(qkv.reshape(qkv.shape[0], qkv.shape[1], 3, heads, hidden // heads))
            rests.append((prefix, value, modulation))
        q, k, v = torch.cat(qkvs, dim=1).permute(2, 0, 3, 1, 4)  # each (B, heads, L + T, d)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(hidden // heads)).softmax(-1)
        attended = (weights @ v).transpose(1, 2).flatten(2)  # (B, L + T, D)
        outputs = []
        for (prefix, value, modulation), rows in zip(
            rests, (attended[:, : text.shape[1]], attended[:, text.shape[1] :])
        ):
            if len(modulation) == 2:
                outputs.append(None)
                continue
            gate, shift_mlp, scale_mlp, gate_mlp = (m[:, None] for m in modulation[2:])
            value = value + gate * linear(f"{prefix}.attn.proj", rows)
            hidden_mlp = F.gelu(
                linear(f"{prefix}.mlp.fc1", norm(value) * (1 + scale_mlp) + shift_mlp), approximate="tanh"
            )
            outputs.append(value + gate_mlp * linear(f"{prefix}.mlp.fc2", hidden_mlp))
        text, tokens = outputs
        if block + 1 == tap:
            h = tokens
            for index in range(3):
                h = linear(f"projectors.0.{2 * index}", h)
                h = F.silu(h) if index < 2 else h
            projection = h
    shift, scale = linear("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, -1)
    out = linear("final_layer.linear", norm(tokens) * (1 + scale[:, None]) + shift[:, None])  # (B, T, p*p*C)
    grid = x.shape[-1] // patch
    out = out.reshape(x.shape[0], grid, grid, patch, patch, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], -1, grid * patch, grid * patch), projection


def test_repa_key_layout_loads_strictly_and_computes_repas_maths():
    model = tiny()
    expected = repa_keys(DEPTH, 96, 2, 4, CONTEXT_DIM, (16, 10))
    ours = model.state_dict()
    assert set(ours) == set(expected)
    for key, shape in expected.items():
        assert tuple(ours[key].shape) == tuple(d if d is not None else 16 for d in shape), key
    # a state dict as REPA's code saves it (random values in its keys), loaded strictly
    generator = torch.Generator().manual_seed(5)
    state = {
        key: torch.randn(value.shape, generator=generator, dtype=torch.float64) * 0.2
        for key, value in ours.items()
    }
    state["pos_embed"] = ours["pos_embed"].double()  # REPA's fixed sin-cos table of the same layout
    model.double()  # float64 on both sides: the comparison tests the maths, not summation orders
    load_state_dict_strict(model, state)
    x, t, context = (value.double() for value in inputs())
    velocity, projections = model.eval()(x, t, context=context)
    reference, reference_projection = reference_velocity(
        state, x, t, context, depth=DEPTH, heads=3, patch=2, tap=2
    )
    torch.testing.assert_close(velocity, reference, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(projections[0], reference_projection, rtol=1e-9, atol=1e-9)
    # a key of another layout is named in the error
    state["joint_blocks.2.context_block.mlp.fc1.weight"] = torch.zeros(192, 96)
    with pytest.raises(ValueError, match=r"unexpected: joint_blocks.2.context_block.mlp.fc1.weight"):
        load_state_dict_strict(model, state)


def test_repa_sizes_and_pos_embed():
    config = mmdit_config(24)
    assert (config.hidden_size, config.num_heads, config.context_dim, config.context_length) == (
        768,
        24,
        768,
        77,
    )
    assert set(MMDIT_MODELS) >= {"MMDiT-24"} and create_mmdit.__defaults__[0] == "MMDiT-24"
    # REPA's sin-cos table: first half columns, second half rows (as the SiT's)
    model = tiny()
    from repa.models.layers import sincos_pos_embed_2d

    assert torch.equal(model.pos_embed[0], torch.from_numpy(sincos_pos_embed_2d(96, 4)))
    with pytest.raises(ValueError, match="unknown MMDiT"):
        create_mmdit("MMDiT-7")


def test_shapes_tap_and_velocity():
    model = tiny().eval()
    x, t, context = inputs(batch=3)
    velocity, projections = model(x, t, context=context)
    assert velocity.shape == (3, 4, 8, 8) and [p.shape for p in projections] == [(3, 16, 10)]
    torch.testing.assert_close(model.velocity(x, t, context=context), velocity)
    none, tapped = model(x, t, context=context, align_only=True)
    assert none is None and torch.equal(tapped[0], projections[0])
    with pytest.raises(ValueError, match="y=None"):
        model(x, t, torch.zeros(3, dtype=torch.long), context=context)
    with pytest.raises(ValueError, match=r"context must be \(B, L, 12\)"):
        model(x, t, context=context[..., :5])


def test_adaln_zero_blocks_are_the_identity_and_velocity_is_zero():
    model = tiny(adaln_zero=True).eval()
    x, t, context = inputs()
    velocity, _ = model(x, t, context=context)
    assert torch.equal(velocity, torch.zeros_like(velocity))
    text, tokens, c = torch.randn(2, LENGTH, 96), torch.randn(2, 16, 96), torch.randn(2, 96)
    for block in model.joint_blocks[:-1]:
        new_text, new_tokens = block(text, tokens, c, None)
        assert torch.equal(new_text, text) and torch.equal(new_tokens, tokens)
    last_text, last_tokens = model.joint_blocks[-1](text, tokens, c, None)
    assert last_text is None and torch.equal(last_tokens, tokens)  # the last text stream: attention only
    # REPA's default initialisation (no adaLN-Zero) is not the identity
    assert not torch.equal(tiny().eval()(x, t, context=context)[0], velocity)


def test_padded_caption_equals_unpadded_with_the_mask():
    x, t, context = inputs()
    model = tiny(use_context_mask=True).eval()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    garbage = torch.randn(context.shape) * 10
    padded = torch.where(mask[..., None], context, garbage)
    masked = model.velocity(x, t, context=padded, context_mask=mask)
    for row, length in enumerate((3, 5)):  # each caption alone, without its padding
        alone = model.velocity(x[row : row + 1], t[row : row + 1], context=context[row : row + 1, :length])
        torch.testing.assert_close(masked[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    # REPA's setting (use_context_mask False) attends the padding: the output moves with it
    blind = tiny(use_context_mask=False).eval()
    assert not torch.allclose(
        blind.velocity(x, t, context=padded, context_mask=mask),
        blind.velocity(x, t, context=context, context_mask=mask),
    )


@pytest.mark.parametrize("null_context", ["empty", "learned"])
def test_dropped_captions_ignore_the_text(null_context):
    x, t, context = inputs()
    other = torch.randn(context.shape)
    model = tiny(null_context=null_context, use_context_mask=True)
    mask = torch.ones(2, LENGTH, dtype=torch.bool)
    if null_context == "empty":
        drop_all = torch.ones(2, dtype=torch.bool)
        with pytest.raises(ValueError, match="set_null_context"):
            model.eval().velocity(x, t, context=context, force_drop_ids=drop_all)
        null = torch.randn(LENGTH, CONTEXT_DIM)  # the empty caption: two tokens, then padding
        model.set_null_context(null, torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool))
        assert "null_context" not in model.state_dict()  # REPA's layout: the null caption is data
    else:
        assert model.state_dict()["null_context"].shape == (LENGTH, CONTEXT_DIM)
    # caption dropout 1.0 in train mode: the model's own draw drops every caption
    model.train()
    model.config.caption_dropout_prob = 1.0
    first, _ = model(x, t, context=context, context_mask=mask)
    second, _ = model(x, t, context=other, context_mask=mask)
    torch.testing.assert_close(first, second)
    # force_drop_ids at sampling: only the dropped row ignores its caption
    model.eval()
    drop = torch.tensor([True, False])
    one = model.velocity(x, t, context=context, context_mask=mask, force_drop_ids=drop)
    two = model.velocity(x, t, context=other, context_mask=mask, force_drop_ids=drop)
    torch.testing.assert_close(one[0], two[0])
    assert not torch.allclose(one[1], two[1])
    torch.testing.assert_close(one[0], first[0])
    if null_context == "empty":  # the null caption's own mask applies: it is its two tokens alone
        alone = model.velocity(x[:1], t[:1], context=null[None, :2])
        torch.testing.assert_close(one[:1], alone, rtol=1e-5, atol=1e-5)
