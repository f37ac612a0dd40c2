"""Cross-attention conditioning (PixArt layout, masks, null context for CFG, sampling through
CaptionVelocity) and TREAD token routing (training only, kept-token counts, the REPA tap inside the
route, FLOPs, a tiny training that resumes bitwise). Tiny widths on CPU; XL only on the meta device.
"""

import itertools

import pytest
import torch

from repa.analysis.flops import model_cost
from repa.config import ExperimentConfig
from repa.models import config_for, create_model
from repa.models.cross_attention import CaptionVelocity
from repa.models.rope import RotaryEmbedding2D
from repa.models.tread import RoutedRope, gather_tokens, random_route_ids
from repa.runs import list_checkpoints
from repa.train import checkpoint as ckpt
from repa.train.methods.denoising import routed_targets
from repa.train.randomness import StepNoise
from repa.transport.samplers import sample
from tests.test_train import assert_states_equal, encoder_file, final_state, shards, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, num_heads=2, input_size=4)  # patch 1: 16 tokens
TEXT = dict(context_dim=8, context_length=6, num_classes=0)


def _randomise(model, scale=0.05):
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, scale)
    return model


def _text_model(**options):
    return _randomise(create_model("SiT-S/1", depth=2, **TINY, **{**TEXT, **options})).eval()


def _xt(batch=2):
    return torch.randn(batch, 4, 4, 4), torch.rand(batch)


# ---- cross-attention -----------------------------------------------------------------------------


def test_padding_under_the_mask_changes_nothing():
    """Each sample alone with its real tokens only == the batch padded to 5 with garbage, masked."""
    model = _text_model()
    x, t = _xt()
    lengths = (2, 3)
    captions = [torch.randn(1, n, 8) for n in lengths]
    padded = torch.randn(2, 5, 8) * 10  # the padding is garbage
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for i, (caption, n) in enumerate(zip(captions, lengths)):
        padded[i, :n], mask[i, :n] = caption[0], True
    batched = model.velocity(x, t, None, context=padded, context_mask=mask)
    for i, caption in enumerate(captions):
        alone = model.velocity(x[i : i + 1], t[i : i + 1], None, context=caption)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    # the mask is what does it: unmasked, the garbage changes the output
    assert not torch.allclose(model.velocity(x, t, None, context=padded), batched, atol=1e-4)
    # a tokenizer's 0/1 integer mask reads the same
    torch.testing.assert_close(model.velocity(x, t, None, context=padded, context_mask=mask.long()), batched)


@pytest.mark.parametrize("null_context", ["learned", "fixed"])
def test_dropped_captions_are_ignored(null_context):
    model = _text_model(null_context=null_context)
    x, t = _xt()
    a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask_b = torch.tensor([[True, True, False, False], [True, True, True, False]])
    drop = torch.ones(2, dtype=torch.bool)
    dropped_a = model.velocity(x, t, None, context=a, force_drop_ids=drop)
    dropped_b = model.velocity(x, t, None, context=b, context_mask=mask_b, force_drop_ids=drop)
    assert torch.equal(dropped_a, dropped_b)  # neither the text nor its length reaches the model
    assert not torch.allclose(model.velocity(x, t, None, context=a), model.velocity(x, t, None, context=b))
    # per-sample: only the dropped row loses its caption
    one = model.velocity(x, t, None, context=a, force_drop_ids=torch.tensor([True, False]))
    assert torch.equal(one[0], dropped_a[0]) and torch.equal(one[1], model.velocity(x, t, None, context=a)[1])
    # learned: a parameter the dropped rows train; fixed: PixArt's saved, never optimised buffer
    names = dict(model.named_parameters())
    assert ("context_embedder.null_context" in names) == (null_context == "learned")
    assert "context_embedder.null_context" in model.state_dict()
    if null_context == "learned":
        model.train()
        velocity, _ = model(x, t, None, context=a, force_drop_ids=torch.tensor([True, False]))
        velocity.sum().backward()
        assert model.context_embedder.null_context.grad.abs().sum() > 0


def test_train_mode_draws_one_drop_for_label_and_caption():
    """class_dropout_prob 1: every caption and label is dropped; the output equals a forced drop."""
    model = _randomise(
        create_model("SiT-S/1", depth=2, **TINY, context_dim=8, num_classes=3, class_dropout_prob=0.999)
    )
    x, t = _xt()
    y, context = torch.tensor([0, 2]), torch.randn(2, 4, 8)
    model.train()
    torch.manual_seed(1)
    drawn, _ = model(x, t, y, context=context)
    model.eval()
    forced = model.velocity(x, t, y, context=context, force_drop_ids=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(drawn, forced)


def test_cross_attention_layout_and_costs():
    model = create_model("SiT-S/2", depth=1, hidden_size=32, num_heads=2, **TEXT)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["blocks.0.cross_attn.q_linear.weight"] == (32, 32)
    assert shapes["blocks.0.cross_attn.kv_linear.weight"] == (64, 32)
    assert shapes["blocks.0.cross_attn.proj.weight"] == (32, 32)
    assert shapes["context_embedder.fc1.weight"] == (32, 8) and shapes["context_embedder.fc2.weight"] == (
        32,
        32,
    )
    assert shapes["context_embedder.null_context"] == (6, 8)
    assert not any(k.startswith("y_embedder") for k in shapes)  # num_classes=0: no label embedder
    # PixArt's count: +4D^2 + 4D per block (5.31M at D=1152, 148.8M over 28 blocks)
    plain = model_cost("SiT-XL/2", adaln="single")
    text = model_cost("SiT-XL/2", adaln="single", context_dim=4096, num_classes=0, null_context="fixed")
    caption_mlp = 4096 * 1152 + 1152 + 1152 * 1152 + 1152
    no_label_table = 1001 * 1152
    assert text.parameters - plain.parameters == 28 * (4 * 1152**2 + 4 * 1152) + caption_mlp - no_label_table
    assert text.flops > plain.flops


def test_cfg_on_captions_through_the_unchanged_sampler():
    """One guided Euler step with CaptionVelocity == v_u + s (v_c - v_u) computed by hand."""
    model = _text_model()
    context, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    noise = torch.randn(2, 4, 4, 4)
    fn = CaptionVelocity(model, context, mask)
    out = sample(fn, noise, fn.rows, num_steps=1, cfg_scale=3.0, null_label=fn.null_label)
    t = torch.ones(2)
    v_c = model.velocity(noise, t, None, context=context, context_mask=mask)
    v_u = model.velocity(noise, t, None, context=context, force_drop_ids=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(out, noise - (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-6)
    unguided = sample(fn, noise, fn.rows, num_steps=1)
    torch.testing.assert_close(unguided, noise - v_c, rtol=1e-5, atol=1e-6)


def test_cross_attention_errors_name_the_problem():
    x, t = _xt()
    plain = create_model("SiT-S/1", depth=1, **TINY, num_classes=3).eval()
    with pytest.raises(ValueError, match="no cross-attention"):
        plain.velocity(x, t, torch.tensor([0, 1]), context=torch.randn(2, 3, 8))
    text = _text_model()
    with pytest.raises(ValueError, match="pass context="):
        text.velocity(x, t, None)
    with pytest.raises(ValueError, match="no label embedder"):
        text.velocity(x, t, torch.tensor([0, 1]), context=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"context must be \(B, L, 8\)"):
        text.velocity(x, t, None, context=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="context_mask must have shape"):
        text.velocity(
            x, t, None, context=torch.randn(2, 3, 8), context_mask=torch.ones(2, 4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="at least one real token"):
        text.velocity(
            x, t, None, context=torch.randn(2, 3, 8), context_mask=torch.zeros(2, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="longer than the null context"):
        text.velocity(
            x, t, None, context=torch.randn(2, 7, 8), force_drop_ids=torch.ones(2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="class-conditional"):
        plain.velocity(x, t, None)
    with pytest.raises(ValueError, match="null_context 'random' is not one of"):
        config_for("SiT-S/2", context_dim=8, null_context="random")


# ---- every option with cross-attention and TREAD, REPA tap at depth 8 ------------------------------

OPTIONS = {
    "lightning": dict(swiglu=True, rmsnorm=True, qk_norm=True),
    "rope": dict(rope=True),
    "adaln_single": dict(adaln="single"),
    "wo_shift": dict(wo_shift=True),
    "context": dict(context_dim=8, num_classes=0),
    "tread": dict(tread_ratio=0.5),  # route 2..8 (depth - 4) holds the tap after block 8 (index 7)
}
COMBINATIONS = [c for size in range(1, len(OPTIONS) + 1) for c in itertools.combinations(OPTIONS, size)]
COMBINATIONS = [c for c in COMBINATIONS if "context" in c or "tread" in c]


@pytest.mark.parametrize("combo", COMBINATIONS, ids="+".join)
def test_every_combination_with_the_repa_tap(combo):
    options = {k: v for name in combo for k, v in OPTIONS[name].items()}
    model = create_model(
        "SiT-S/1", depth=12, align_depth=8, projector_out_dims=[16], **TINY, **options
    ).train()
    x, t = _xt()
    y = None if "context" in combo else torch.tensor([0, 1])
    condition = {}
    if "context" in combo:
        condition = dict(context=torch.randn(2, 3, 8), context_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]) > 0)
    drop = torch.tensor([True, False])  # one null row, so the null context is trained too
    velocity, (projected,) = model(x, t, y, force_drop_ids=drop, **condition)
    assert torch.count_nonzero(velocity) == 0  # zero-initialised final layer
    if "context" in combo:  # the cross-attention starts at zero: the model starts text-blind
        other = dict(condition, context=torch.randn(2, 3, 8))
        model.eval()
        blind = model.velocity(x, t, y, **condition), model.velocity(x, t, y, **other)
        tokens, c = model._embed(x, t, y)
        context = model._embed_context(condition["context"], None, None)
        after = model.blocks[0](tokens, model._block_condition(c), model.feat_rope, context)
        if options.get("adaln") != "single":  # adaLN-Zero: the whole block is the identity
            assert torch.equal(after, tokens)
        assert torch.equal(*blind)
        model.train()
    _randomise(model)
    velocity, (projected,) = model(x, t, y, force_drop_ids=drop, **condition)
    kept = 8 if "tread" in combo else 16
    assert velocity.shape == x.shape and projected.shape == (2, kept, 16)
    (velocity.square().mean() + projected.mean()).backward()
    missing = [n for n, p in model.named_parameters() if n != "pos_embed" and p.grad is None]
    assert missing == [], missing
    model.eval()
    torch.testing.assert_close(model.velocity(x, t, y, **condition), model(x, t, y, **condition)[0])


# ---- TREAD ---------------------------------------------------------------------------------------


def _tread_pair(**options):
    """A routed model (r = 0.5, route 2..4 of 8 blocks) and the plain model with the same weights."""
    base = dict(depth=8, num_classes=3, class_dropout_prob=0.0, **TINY, **options)
    routed = _randomise(create_model("SiT-S/1", tread_ratio=0.5, **base))
    plain = create_model("SiT-S/1", **base)
    plain.load_state_dict(routed.state_dict())
    return routed, plain


@pytest.mark.parametrize("rope", [False, True])
def test_train_routes_eval_is_the_plain_model(rope):
    routed, plain = _tread_pair(rope=rope)
    x, t = _xt()
    y = torch.tensor([0, 2])
    plain.eval()
    expected = plain(x, t, y)[0]
    assert torch.equal(routed.eval()(x, t, y)[0], expected)
    routed.train()
    assert torch.equal(routed.velocity(x, t, y), expected)  # sampling never routes, even in train mode
    trained, _ = routed(x, t, y)
    assert not torch.allclose(trained, expected, atol=1e-4)
    # the same route_ids give the same output; another permutation another one
    ids = random_route_ids(2, 16, "cpu")
    assert torch.equal(routed(x, t, y, route_ids=ids)[0], routed(x, t, y, route_ids=ids)[0])
    assert not torch.equal(routed(x, t, y, route_ids=ids)[0], routed(x, t, y, route_ids=ids.flip(1))[0])


def test_activation_checkpointing_inside_the_route_gives_the_same_gradients():
    routed, _ = _tread_pair(rope=True)
    checkpointed = create_model(
        "SiT-S/1", depth=8, num_classes=3, class_dropout_prob=0.0, tread_ratio=0.5, rope=True,
        grad_checkpointing=True, **TINY,
    )  # fmt: skip
    checkpointed.load_state_dict(routed.state_dict())
    x, t, y, ids = *_xt(), torch.tensor([0, 1]), random_route_ids(2, 16, "cpu")
    for model in (routed, checkpointed):
        model.train()(x, t, y, route_ids=ids)[0].square().sum().backward()
    for (name, a), b in zip(routed.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_tokens_inside_the_route_and_their_reentry():
    routed, _ = _tread_pair()
    routed.train()
    start, end = routed.config.tread_blocks
    assert (start, end) == (2, 4)  # depth 8: 2 .. depth - 4
    seen = {}
    for index, block in enumerate(routed.blocks):
        block.register_forward_hook(
            lambda m, inputs, out, i=index: seen.update({i: (inputs[0].detach(), out.detach())})
        )
    x, t = _xt()
    ids = random_route_ids(2, 16, "cpu")
    routed(x, t, torch.tensor([0, 1]), route_ids=ids)
    counts = [seen[i][0].shape[1] for i in range(8)]
    assert counts == [16, 16, 8, 8, 8, 16, 16, 16]  # (1 - r) N inside the route
    # after the route the skipped tokens hold their values from before it; the kept ones the route's
    before, after_route = seen[start - 1][1], seen[end + 1][0]  # (B, 16, D) each
    kept, skipped = ids[:, :8], ids[:, 8:]
    assert torch.equal(gather_tokens(after_route, skipped), gather_tokens(before, skipped))
    assert torch.equal(gather_tokens(after_route, kept), seen[end][1])
    # r = 0.75 keeps a quarter
    quarter = create_model("SiT-S/1", depth=8, tread_ratio=0.75, **TINY).train()
    quarter.blocks[3].register_forward_hook(lambda m, inputs, out: seen.update(quarter=inputs[0].shape[1]))
    quarter(x, t, torch.tensor([0, 1]))
    assert seen["quarter"] == 4


def test_routed_rope_rotates_kept_tokens_by_their_own_positions():
    rope = RotaryEmbedding2D(8, 4)
    q = torch.randn(2, 3, 16, 8)  # (B, heads, T, d)
    ids = random_route_ids(2, 16, "cpu")[:, :6]
    kept = torch.stack([q[b][:, ids[b]] for b in range(2)])  # (B, heads, 6, d)
    expected = torch.stack([rope(q)[b][:, ids[b]] for b in range(2)])
    torch.testing.assert_close(RoutedRope(rope, ids)(kept), expected)


def test_the_repa_tap_inside_the_route_aligns_kept_tokens_with_same_index_targets():
    """At initialisation (adaLN-Zero) every block is the identity, so the tap after block 8 sees
    the embedded tokens: the projection rows are the tokens route_ids[:, :K], in that order."""
    model = create_model(
        "SiT-S/1", depth=12, align_depth=8, projector_out_dims=[16], tread_ratio=0.5, **TINY, num_classes=3
    ).train()
    x, t, y = *_xt(), torch.tensor([0, 1])
    ids = random_route_ids(2, 16, "cpu")
    _, (projected,) = model(x, t, y, route_ids=ids)
    embedded = model.x_embedder(x) + model.pos_embed  # (B, 16, D)
    torch.testing.assert_close(projected, model.projectors[0](gather_tokens(embedded, ids[:, :8])))
    targets = torch.randn(2, 16, 16)
    gathered = routed_targets(targets, projected, ids, resample=False)
    for b in range(2):
        assert torch.equal(gathered[b], targets[b, ids[b, :8]])
    # a tap outside the route sees every token: targets pass unchanged
    assert routed_targets(targets, torch.zeros(2, 16, 16), ids, resample=False) is targets
    resampled = routed_targets(torch.randn(2, 64, 16), projected, ids, resample=True)
    assert resampled.shape == (2, 8, 16)
    with pytest.raises(ValueError, match="--align-resample"):
        routed_targets(torch.randn(2, 64, 16), projected, ids, resample=False)


def test_the_method_routes_with_its_named_draw_and_aligns_the_same_tokens():
    """DenoisingMethod.model_loss passes noise's "route" permutations to the model and gathers
    the targets with them: its logged cosine is that of the same-index tokens."""
    from types import SimpleNamespace

    from repa.align import token_cosine
    from repa.train.methods.denoising import DenoisingMethod
    from repa.transport import create_time_sampler

    model = create_model(
        "SiT-S/1", depth=12, align_depth=8, projector_out_dims=[16], tread_ratio=0.5, class_dropout_prob=0.0,
        **TINY,
    )  # fmt: skip
    _randomise(model).train()
    calls = []

    def recording_model(*args, **kwargs):
        calls.append((args, kwargs))
        return model(*args, **kwargs)

    method = DenoisingMethod(
        None, [object()], "linear", create_time_sampler("uniform"), 0.5, SimpleNamespace(name="sit"),
        routed_tokens=16,
    )  # fmt: skip
    noise = StepNoise(seed=3, num_samples=2, device="cpu")
    targets = torch.randn(2, 16, 16)
    result = method.model_loss(
        recording_model, torch.randn(2, 4, 4, 4), torch.tensor([0, 1]), [targets], noise
    )
    ((args, kwargs),) = calls
    ids = kwargs["route_ids"]
    assert torch.equal(ids, StepNoise(seed=3, num_samples=2, device="cpu").permutations("route", 16))
    _, (projected,) = model(*args, **kwargs)
    assert projected.shape == (2, 8, 16)
    expected = token_cosine(projected, gather_tokens(targets, ids[:, :8])).mean()
    torch.testing.assert_close(result.metrics["cos_sim_0"], expected)


def test_route_draws_are_per_sample_permutations_independent_of_micro_batches():
    whole = StepNoise(seed=7, num_samples=6, device="cpu")
    full = whole.permutations("route", 16)
    assert torch.equal(full.sort(dim=1).values, torch.arange(16).expand(6, 16))
    parts = StepNoise(seed=7, num_samples=6, device="cpu")
    parts.select(0, 2)
    first = parts.permutations("route", 16)
    parts.select(2, 6)
    assert torch.equal(torch.cat([first, parts.permutations("route", 16)]), full)
    assert not torch.equal(StepNoise(seed=8, num_samples=6, device="cpu").permutations("route", 16), full)


def test_tread_flops_fall_by_the_published_amount(capsys):
    from repa.cli import main

    assert main(["flops", "SiT-XL/2", "--tread", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = [line for line in lines if line.startswith("SiT-XL/2 tread-ratio=0.5")][0].split()
    assert row[-1] == "+0.0%"  # no parameters
    assert float(row[-2].rstrip("%")) == pytest.approx(-42, abs=1)  # route 2 -> 24: about -42%
    base = model_cost("SiT-B/2")
    routed = model_cost("SiT-B/2", tread_ratio=0.5, tread_end=8)
    assert routed.flops / base.flops - 1 == pytest.approx(-0.30, abs=0.01)  # DiT-B/2 route 2 -> 8: -30%


def test_tread_errors_name_the_flags():
    with pytest.raises(ValueError, match="--tread-ratio 1.0 must lie in"):
        config_for("SiT-S/2", tread_ratio=1.0)
    with pytest.raises(ValueError, match=r"--tread-start 2 \.\. --tread-end 12 .*0 <= start <= end <= 11"):
        config_for("SiT-S/2", tread_ratio=0.5, tread_end=12)
    with pytest.raises(ValueError, match="default --tread-end is depth - 4"):
        config_for("SiT-S/2", depth=4, tread_ratio=0.5)
    with pytest.raises(ValueError, match="keeps no token"):
        config_for("SiT-S/8", input_size=8, tread_ratio=0.5)  # one token
    config_for("SiT-S/2", depth=4, tread_end=12)  # off (ratio 0): the route is not checked
    values = {"model": {"name": "SiT-S/2", "tread_ratio": 0.5, "tread_start": 9, "tread_end": 3}}
    with pytest.raises(ValueError, match="--tread-start 9"):
        ExperimentConfig.from_dict({**values, "encoder": {"encoder": "none"}}).validate()
    model = create_model("SiT-S/1", depth=8, tread_ratio=0.5, **TINY).train()
    with pytest.raises(ValueError, match="route_ids must hold one permutation"):
        model(*_xt(), torch.tensor([0, 1]), route_ids=torch.zeros(2, 8, dtype=torch.long))


def test_tiny_repa_training_with_tread_resumes_bitwise(shards, encoder_file, tmp_path):  # noqa: F811
    """SiT-S/4 on 16 px (16 tokens), 2 blocks, route 0..1 holding the REPA tap after block 1."""
    tread = {"tread_ratio": 0.5, "tread_start": 0, "tread_end": 1}

    def config(directory, **run):
        values = tiny_config(shards, directory, encoder=encoder_file, **run).to_dict()
        values["model"].update(tread)
        return ExperimentConfig.from_dict(values)

    from repa.train.loop import train

    straight = train(config(tmp_path / "straight", max_train_steps=6, checkpointing_steps=3))
    train(config(tmp_path / "resumed", max_train_steps=3, checkpointing_steps=3))
    resumed = train(config(tmp_path / "resumed", max_train_steps=6, checkpointing_steps=3))
    assert resumed.step == 6
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))
    # the route was taken: the first 3 steps without TREAD end elsewhere
    values = tiny_config(shards, tmp_path / "plain", encoder=encoder_file, max_train_steps=3).to_dict()
    values["run"]["checkpointing_steps"] = 3
    plain = final_state(train(ExperimentConfig.from_dict(values)).run_dir)["model"]
    routed = dict(list_checkpoints(tmp_path / "resumed" / "run" / "checkpoints"))[3] / "model.pt"
    routed = ckpt.load_file(routed)["model"]
    assert any(not torch.equal(routed[k], v) for k, v in plain.items())
