"""DDT (repa/models/ddt.py, ddt_sharing.py): the condition encoder / velocity decoder split, DDT's
block and RoPE, the released DDT-XL/2 key layout, encoder sharing at sampling time (uniform and
dp schedules), `repa flops`, `repa train` and `repa sample` on a tiny DDT.

Tiny widths (hidden 32, 2 heads) on CPU; the published widths only on the meta device.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from repa.analysis.flops import count_flops, model_cost
from repa.config import ExperimentConfig
from repa.eval.checkpoints import Generator, infer_architecture, infer_model_name
from repa.models import config_for, create_model, load_state_dict_strict
from repa.models.ddt import DDT, ddt_rope_angles, from_lightning_layout
from repa.models.ddt_sharing import EncoderSharing, dp_schedule
from repa.transport import sample
from tests.test_train import encoder_file, shards, tiny_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, num_heads=2, num_classes=5)


def tiny_ddt(depth=3, encoder_depth=2, size=4, **overrides) -> DDT:
    return create_model("DDT-B/2", input_size=size, depth=depth, ddt_encoder_depth=encoder_depth,
                        **{**TINY, **overrides})  # fmt: skip


def _randomise(model, scale=0.1):
    for parameter in model.parameters():
        parameter.data.normal_(0, scale)
    return model


def _inputs(batch=2, channels=4, size=4):
    return torch.randn(batch, channels, size, size), torch.rand(batch), torch.randint(0, 5, (batch,))


# ---- the model -------------------------------------------------------------------------------------


def test_shapes_zero_init_and_the_repa_tap_inside_the_encoder():
    model = tiny_ddt(depth=10, encoder_depth=8, size=8, align_depth=8, projector_out_dims=[24, 16],
                     projector_dim=16).train()  # fmt: skip
    assert isinstance(model, DDT) and len(model.encoder_blocks) == 8 and len(model.decoder_blocks) == 2
    x, t, y = _inputs(size=8)
    keep = torch.tensor([False, False])  # no label dropout, so the two passes below agree
    velocity, projections = model(x, t, y, force_drop_ids=keep)
    assert velocity.shape == x.shape
    assert torch.equal(velocity, torch.zeros_like(velocity))  # zero final layer: v = 0 at init
    assert [tuple(p.shape) for p in projections] == [(2, 16, 24), (2, 16, 16)]  # 4x4 tokens
    assert all(p.abs().sum() > 0 for p in projections)
    none, tapped = model(x, t, y, align_only=True, force_drop_ids=keep)
    assert none is None and all(torch.equal(a, b) for a, b in zip(tapped, projections))
    # every parameter gets a gradient once the final layer is live
    _randomise(model)
    velocity, projections = model(x, t, y)
    (velocity.square().mean() + sum(p.mean() for p in projections)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the sampler's view never evaluates the projectors
    calls = []
    model.projectors[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model.eval()
    torch.testing.assert_close(model.velocity(x, t, y), model(x, t, y)[0])
    assert len(calls) == 1  # only the forward above, not velocity


def test_self_condition_carries_the_label_and_time_to_the_decoder():
    """z = SiLU(t_emb + s); the decoder sees the label and t only through z."""
    model = _randomise(tiny_ddt()).eval()
    x, t, y = _inputs()
    z = model.encode(x, t, y)
    assert z.shape == (2, 4, 32) and (z >= -0.2785).all()  # SiLU's minimum
    torch.testing.assert_close(model.decode(x, z), model.velocity(x, t, y))
    other = model.encode(x, t, (y + 1) % 5)
    assert not torch.allclose(model.decode(x, other), model.decode(x, z))
    # the encoder's blocks get one condition per sample, the decoder's one per token
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("encoder", a[1].shape) and None)
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.setdefault("decoder", a[1].shape) and None)
    model.velocity(x, t, y)
    assert seen == {"encoder": (2, 1, 32), "decoder": (2, 4, 32)}


def test_patches_are_unfolded_channel_first_and_folded_back():
    model = tiny_ddt(size=4, in_channels=3)
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).view(1, 3, 4, 4)
    patches = model._patches(x)  # (1, 4, 12)
    # token 1 = patch at row 0, col 1; features (channel, row, col)
    expected = torch.stack([x[0, c, r, 2 + q] for c in range(3) for r in range(2) for q in range(2)])
    assert torch.equal(patches[0, 1], expected)
    assert torch.equal(model._unpatchify(patches), x)


def test_ddt_rope_on_a_hand_computed_case_and_as_complex_products():
    # head 8, grid 3: positions linspace(0, 16, 3) = 0, 8, 16; frequencies 1e4^(-4k/8) = 1, 0.01;
    # pairs: (col, f0), (row, f0), (col, f1), (row, f1). Token 5 = row 1, col 2.
    angles = ddt_rope_angles(8, 3)
    expected = torch.tensor([16.0, 16.0, 8.0, 8.0, 0.16, 0.16, 0.08, 0.08])
    torch.testing.assert_close(angles[5], expected)
    # the rotation equals DDT's complex product q * e^{i angle} over channel pairs
    model = tiny_ddt(size=6, hidden_size=32, num_heads=4)  # head 8, grid 3
    q = torch.randn(2, 4, 9, 8)
    complex_q = torch.view_as_complex(q.reshape(2, 4, 9, 4, 2))
    freqs = torch.polar(torch.ones(9, 4), ddt_rope_angles(8, 3)[:, ::2])
    torch.testing.assert_close(model.feat_rope(q), torch.view_as_real(complex_q * freqs).flatten(-2))


def test_time_features_use_period_10_and_reverse_time_wraps_the_released_convention():
    model = tiny_ddt()
    t = torch.tensor([0.3])
    freqs = 10.0 ** (-torch.arange(128) / 128)
    features = torch.cat([torch.cos(0.3 * freqs), torch.sin(0.3 * freqs)])
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(features[None]))
    plain = _randomise(tiny_ddt()).eval()
    wrapped = tiny_ddt(reverse_time=True).eval()
    wrapped.load_state_dict(plain.state_dict())
    x, t, y = _inputs()
    torch.testing.assert_close(wrapped.velocity(x, t, y), -plain.velocity(x, 1 - t, y))


def test_grad_checkpointing_gives_the_same_gradients():
    plain = _randomise(tiny_ddt(projector_out_dims=[8], align_depth=1, projector_dim=16)).train()
    checkpointed = tiny_ddt(projector_out_dims=[8], align_depth=1, projector_dim=16, grad_checkpointing=True)
    checkpointed.train().load_state_dict(plain.state_dict())
    x, t, y = _inputs()
    keep = torch.tensor([False, True])
    grads = []
    for model in (plain, checkpointed):
        velocity, (projected,) = model(x, t, y, force_drop_ids=keep)
        (velocity.square().mean() - projected.mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_bad_combinations_name_the_flags():
    cases = [
        (dict(ddt_encoder_depth=3), "--ddt-encoder-depth 3"),  # no decoder block left
        (dict(projector_out_dims=[8], align_depth=3), "inside the DDT condition encoder"),
        (dict(adaln="single"), "--adaln single"),
        (dict(wo_shift=True), "--wo-shift"),
        (dict(swiglu=False), "--swiglu"),
        (dict(tread_ratio=0.5), "tread_ratio"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            config_for("DDT-B/2", depth=3, **{"ddt_encoder_depth": 2, **TINY, **overrides})
    with pytest.raises(ValueError, match="DDT-"):  # a SiT name lacks DDT's block
        config_for("SiT-B/2", ddt_encoder_depth=8)


def test_config_flags_reach_the_model():
    config = ExperimentConfig.from_dict({"model": {"name": "DDT-B/2", "ddt_encoder_depth": 5}})
    overrides = config.model_overrides(input_size=4)
    assert overrides["ddt_encoder_depth"] == 5 and "qk_norm" not in overrides  # as registered
    model_config = config_for("DDT-B/2", **overrides)
    assert (model_config.ddt_encoder_depth, model_config.qk_norm, model_config.depth) == (5, True, 12)
    assert config_for("DDT-XL/2").ddt_encoder_depth == 22
    assert config_for("SiT-XL/2").ddt_encoder_depth == 0


# ---- DDT-XL/2: the released key layout and its cost --------------------------------------------------


def ddt_xl2_shapes() -> dict[str, tuple[int, ...]]:
    """The released DDT-XL/2 denoiser (22en6de; reference section 7.1): D 1152, 16 heads of 72,
    patch features 4 x 2 x 2 = 16, SwiGLU hidden 3072, bias-free qkv and FFN, adaLN without SiLU."""
    shapes = {
        "x_embedder.proj.weight": (1152, 16),
        "x_embedder.proj.bias": (1152,),
        "s_embedder.proj.weight": (1152, 16),
        "s_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "final_layer.adaLN_modulation.0.weight": (2304, 1152),
        "final_layer.adaLN_modulation.0.bias": (2304,),
        "final_layer.linear.weight": (16, 1152),
        "final_layer.linear.bias": (16,),
    }
    for n in range(28):
        shapes.update({
            f"blocks.{n}.norm1.weight": (1152,),
            f"blocks.{n}.norm2.weight": (1152,),
            f"blocks.{n}.attn.qkv.weight": (3456, 1152),
            f"blocks.{n}.attn.q_norm.weight": (72,),
            f"blocks.{n}.attn.k_norm.weight": (72,),
            f"blocks.{n}.attn.proj.weight": (1152, 1152),
            f"blocks.{n}.attn.proj.bias": (1152,),
            f"blocks.{n}.mlp.w1.weight": (3072, 1152),
            f"blocks.{n}.mlp.w3.weight": (3072, 1152),
            f"blocks.{n}.mlp.w2.weight": (1152, 3072),
            f"blocks.{n}.adaLN_modulation.0.weight": (6912, 1152),
            f"blocks.{n}.adaLN_modulation.0.bias": (6912,),
        })  # fmt: skip
    return shapes


def test_ddt_xl2_layout_loads_strictly_with_inferred_architecture():
    shapes = ddt_xl2_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 674_646_352  # "674.6M" (reference 7.1)
    projector = {"0.weight": (1152, 1152), "0.bias": (1152,), "2.weight": (1152, 1152), "2.bias": (1152,),
                 "4.weight": (768, 1152), "4.bias": (768,)}  # fmt: skip
    # DDT's Lightning checkpoint: raw and EMA denoisers, the REPA projector in the trainer
    lightning = {f"{prefix}.{k}": torch.empty(s, device="meta") for prefix in ("denoiser", "ema_denoiser")
                 for k, s in shapes.items()}  # fmt: skip
    trainer = {f"diffusion_trainer.proj.0.{k}": torch.empty(s, device="meta") for k, s in projector.items()}
    lightning.update(trainer)
    lightning["ema_denoiser.final_layer.linear.bias"] = torch.ones(16, device="meta")  # which one is picked
    state = from_lightning_layout(lightning)
    assert state["final_layer.linear.bias"] is lightning["ema_denoiser.final_layer.linear.bias"]
    assert {k for k in state if k.startswith("projectors.")} == {f"projectors.0.{k}" for k in projector}

    architecture = infer_architecture(state)
    assert infer_model_name(architecture) == "DDT-XL/2"
    assert {k: architecture[k] for k in ("depth", "ddt_encoder_depth", "hidden_size", "num_heads",
                                         "patch_size", "in_channels", "num_classes")} == dict(
        depth=28, ddt_encoder_depth=22, hidden_size=1152, num_heads=16, patch_size=2, in_channels=4,
        num_classes=1000)  # fmt: skip
    assert "input_size" not in architecture  # RoPE only: the grid is not in the weights
    assert architecture["projector_out_dims"] == [768] and architecture["align_depth"] == 8
    with torch.device("meta"):
        model = create_model("DDT-XL/2", input_size=32, **architecture)
    load_state_dict_strict(model, state)
    assert set(model.state_dict()) == set(state)
    # one key short, or LightningDiT's layout, is refused
    with pytest.raises(ValueError, match="missing"):
        load_state_dict_strict(model, {k: v for k, v in state.items() if k != "blocks.27.mlp.w2.weight"})


def test_a_lightning_file_is_read_as_its_ema_denoiser(tmp_path):
    """`repa sample` reads DDT's Lightning checkpoint: EMA weights, projector renamed."""
    from repa.eval.checkpoints import read_weights

    model = _randomise(tiny_ddt(projector_out_dims=[8], align_depth=2, projector_dim=16))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    denoiser = {k: v for k, v in model.state_dict().items() if not k.startswith("projectors.")}
    lightning = {f"denoiser.{k}": v for k, v in denoiser.items()}
    lightning.update({f"ema_denoiser.{k}": ema[k] for k in denoiser})
    lightning.update({f"diffusion_trainer.proj.0.{k[len('projectors.0.'):]}": ema[k] for k in ema
                      if k.startswith("projectors.")})  # fmt: skip
    torch.save({"state_dict": lightning, "global_step": 10}, tmp_path / "last.ckpt.pt")
    state, config = read_weights(tmp_path / "last.ckpt.pt")
    assert config is None and state.keys() == ema.keys()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    load_state_dict_strict(tiny_ddt(projector_out_dims=[8], align_depth=2, projector_dim=16), state)


def test_flops_of_ddt_xl2_and_of_a_decoder_only_step():
    cost = model_cost("DDT-XL/2")
    assert cost.parameters == 674_646_352
    with torch.device("meta"):
        model = create_model("DDT-XL/2", input_size=32).eval()
        x, t, y = torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long)
        z = torch.zeros(1, 256, 1152)
    decoder_only = count_flops(model.decode, x, z)
    # 6 of 28 blocks, but with a per-token adaLN: 38.29 of 131.48 GFLOPs (29.1%), not 6/28 = 21%
    assert cost.flops == 131_481_059_328 and 0.28 < decoder_only / cost.flops < 0.30
    assert cost.flops == count_flops(model.velocity, x, t, y)


# ---- encoder sharing at sampling time ----------------------------------------------------------------


SAMPLERS = {
    "euler": dict(mode="ode", method="euler"),
    "heun": dict(mode="ode", method="heun"),
    "sde": dict(mode="sde", method="euler"),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_share_1_equals_the_unshared_sampler_bitwise(sampler):
    model = _randomise(tiny_ddt()).eval()
    labels, seeds = torch.tensor([1, 3]), [5, 7]
    # guidance on [0, 0.5]: calls of B rows, then of 2B rows
    options = dict(num_steps=5, cfg_scale=2.5, guidance_high=0.5, null_label=5, **SAMPLERS[sampler])
    plain = sample(model.velocity, (4, 4, 4), labels, seeds, **options)
    shared = sample(EncoderSharing(model, 1), (4, 4, 4), labels, seeds, **options)
    assert torch.equal(plain, shared)


def _count_block_calls(model):
    """Calls of the first encoder block and of the last decoder block, by forward pre-hooks."""
    counts = {"encoder": 0, "decoder": 0}

    def counter(part):
        return lambda *args: counts.__setitem__(part, counts[part] + 1)

    model.blocks[0].register_forward_pre_hook(counter("encoder"))
    model.blocks[-1].register_forward_pre_hook(counter("decoder"))
    return counts


def test_share_2_runs_the_encoder_half_as_often():
    model = _randomise(tiny_ddt()).eval()
    counts = _count_block_calls(model)
    labels, seeds = torch.tensor([1, 3]), [5, 7]
    options = dict(mode="ode", num_steps=8, cfg_scale=2.0, guidance_high=1.0, null_label=5)
    plain = sample(model.velocity, (4, 4, 4), labels, seeds, **options)
    assert counts == {"encoder": 8, "decoder": 8}
    sharing = EncoderSharing(model, 2)
    shared = sample(sharing, (4, 4, 4), labels, seeds, **options)
    assert counts == {"encoder": 8 + 4, "decoder": 8 + 8} and sharing.encoder_calls == 4
    assert not torch.equal(plain, shared)  # z was reused
    assert (shared - plain).abs().max() < 0.5 * plain.abs().max()


def test_the_guidance_interval_opening_between_refreshes_runs_the_encoder_once_more():
    """Grid 1, 5/6, ..., 1/6 with guidance for t <= 0.5: evaluation 3 is the first on [y; null]."""
    model = _randomise(tiny_ddt()).eval()
    options = dict(mode="ode", num_steps=6, cfg_scale=2.0, guidance_high=0.5, null_label=5)
    sharing = EncoderSharing(model, 2)
    sample(sharing, (4, 4, 4), torch.tensor([1, 3]), [5, 7], **options)
    assert sharing.encoder_calls == 4  # 0, 2, 4 and 3
    sharing = EncoderSharing(model, 2)  # guidance closing: the conditional half of z is reused
    # guidance for t >= 0.6: evaluations 0-2 on [y; null], 3 on y reuses the first half of 2's z
    sample(sharing, (4, 4, 4), torch.tensor([1, 3]), [5, 7], **{**options, "guidance_low": 0.6,
                                                                "guidance_high": 1.0})  # fmt: skip
    assert sharing.encoder_calls == 3


def test_the_dp_recorder_keeps_the_conditional_rows_of_every_evaluation():
    model = _randomise(tiny_ddt()).eval()
    labels, seeds = torch.tensor([1, 3]), [5, 7]
    recorder = EncoderSharing(model, None, record_rows=2)
    options = dict(mode="ode", num_steps=3, cfg_scale=2.0, guidance_high=1.0, null_label=5)
    sample(recorder, (4, 4, 4), labels, seeds, **options)  # every call on [x; x], [y; null]
    assert len(recorder.states) == 3 and recorder.encoder_calls == 3
    noise = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(recorder.states[0], model.encode(noise, torch.ones(2), labels))


def test_dp_schedule_is_the_least_cost_choice():
    rng = np.random.default_rng(0)
    n, k = 7, 3
    similarity = 1 - rng.uniform(0, 1, (n, n))
    error = 1 - similarity

    def cost(starts):
        ends = list(starts[1:]) + [n]
        return sum(error[m, j] for j, end in zip(starts, ends) for m in range(j, end))

    best = min(([0, *rest] for rest in itertools.combinations(range(1, n), k - 1)), key=cost)
    assert dp_schedule(similarity, k) == best
    assert dp_schedule(similarity, n) == list(range(n)) and dp_schedule(similarity, 1) == [0]


def test_repa_sample_settings_wire_uniform_and_dp_sharing():
    from repa.eval.sample import SamplerSettings, generate_batch
    from repa.tokenizers import create_tokenizer

    model = _randomise(tiny_ddt(size=8, in_channels=3)).eval()
    generator = Generator(model, create_tokenizer("pixels", resolution=8), 8, "linear")
    counts = _count_block_calls(model)
    labels, seeds = torch.tensor([0, 4]), [1, 2]
    base = dict(mode="ode", num_steps=6, cfg_scale=1.0, precision="fp32")
    plain = generate_batch(generator, labels, seeds, SamplerSettings(**base))
    unshared = SamplerSettings(**base, ddt_share=1, ddt_share_schedule="dp")
    assert unshared.to_dict() == SamplerSettings(**base).to_dict()  # records from before match
    uniform = generate_batch(generator, labels, seeds, SamplerSettings(**base, ddt_share=3))
    assert counts == {"encoder": 6 + 2, "decoder": 12}
    dp_settings = SamplerSettings(**base, ddt_share=3, ddt_share_schedule="dp")
    dp = generate_batch(generator, labels, seeds, dp_settings)
    # the dp run: 6 evaluations on the template (every one runs the encoder), then 2 on the batch
    assert counts == {"encoder": 8 + 6 + 2, "decoder": 12 + 6 + 6}
    assert plain.shape == uniform.shape == dp.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="--ddt-share"):
        SamplerSettings(**base, ddt_share=0)
    sit = create_model("SiT-S/2", input_size=8, in_channels=3, depth=1, **TINY).eval()
    with pytest.raises(ValueError, match="needs a DDT"):
        generate_batch(Generator(sit, generator.tokenizer, 8, "linear"), labels, seeds,
                       SamplerSettings(**base, ddt_share=2))  # fmt: skip


# ---- a tiny DDT trains through the loop, and `repa sample` reads its run -----------------------------


def test_tiny_ddt_trains_with_repa_and_samples_with_sharing(shards, encoder_file, tmp_path):  # noqa: F811
    """REPA through the loop, the tap after block 1 of the 2-block encoder (the encoder's 4x4
    tokens resampled to the model's 8x8 grid); then `repa sample` on the run with --ddt-share 2."""
    from safetensors.torch import load_file

    from repa.cli import main
    from repa.runs import latest_checkpoint
    from repa.train.logging import read_metrics
    from repa.train.loop import train

    steps = 60
    config = tiny_config(
        shards, tmp_path, encoder=encoder_file, max_train_steps=steps, checkpointing_steps=steps
    )
    config.model.name = "DDT-B/2"
    config.model.depth, config.model.ddt_encoder_depth, config.model.align_resample = 3, 2, True
    run = train(config)
    records = read_metrics(run.run_dir)
    losses = [record["loss"] for record in records]
    assert len(losses) == steps and "loss_align" in records[-1]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    ema = load_file(latest_checkpoint(run.run_dir / "checkpoints") / "ema.safetensors")
    assert {"s_embedder.proj.weight", "projectors.0.4.weight", "blocks.2.mlp.w1.weight"} <= set(ema)

    output = tmp_path / "samples.npz"
    argv = ["sample", str(run.run_dir), "--num-samples", "2", "--mode", "ode", "--num-steps", "4",
            "--cfg-scale", "1", "--ddt-share", "2", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    with np.load(output) as data:
        assert data["arr_0"].shape == (2, 16, 16, 3)
