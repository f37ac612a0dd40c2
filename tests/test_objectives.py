"""The representation objectives beside REPA (docs/objectives.md): each loss against a slow
per-sample reference, where each gradient goes, the dispersive loss's gradient through the
cross-process gather, HASTE's end of alignment (no encoder built on a late resume), shuffled
targets, and each method training and resuming bitwise through `repa.train.loop.train`."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repa.align import (
    alignment_loss,
    derangement,
    dispersive_loss,
    self_alignment_loss,
    spatial_zscore,
)
from repa.config import ExperimentConfig, load_preset
from repa.train.logging import read_metrics
from repa.train.loop import train
from repa.train.methods import get_method
from repa.train.methods.base import MethodContext
from repa.train.methods.objectives import block_output
from repa.train.randomness import StepNoise
from repa.train.setup import build_parts
from repa.transport import interpolate
from repa.transport.objective import velocity_direction_loss
from tests.test_train import (  # noqa: F401 (fixtures)
    assert_states_equal,
    encoder_file,
    final_state,
    shards,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parents[1]


# ---- values against slow references ----------------------------------------------------------


def test_velocity_direction_loss_matches_a_per_pixel_loop():
    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    reference = torch.zeros(3)
    for b in range(3):
        for h in range(5):
            for w in range(5):
                u, v = pred[b, :, h, w], target[b, :, h, w]
                reference[b] += (1 - u.dot(v) / (u.norm() * v.norm())) / 25
    torch.testing.assert_close(velocity_direction_loss(pred, target), reference)
    # flipping both velocities (the other time convention) changes nothing
    torch.testing.assert_close(velocity_direction_loss(-pred, -target), reference)
    ours, slow = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    velocity_direction_loss(ours, target).sum().backward()
    sum(
        (1 - F.cosine_similarity(slow[b, :, h, w], target[b, :, h, w], dim=0)) / 25
        for b in range(3)
        for h in range(5)
        for w in range(5)
    ).backward()
    torch.testing.assert_close(ours.grad, slow.grad)


def test_spatial_zscore_matches_a_per_channel_loop():
    tokens = torch.randn(2, 9, 3) * 4 + 1
    out = spatial_zscore(tokens, gamma=0.6)
    for b in range(2):
        for d in range(3):
            column = tokens[b, :, d]
            mean = column.sum() / 9
            std = ((column - mean).square().sum() / 8).sqrt()  # unbiased, as iREPA's torch.std
            torch.testing.assert_close(out[b, :, d], (column - 0.6 * mean) / (std + 1e-6))


def test_dispersive_loss_matches_a_pairwise_loop():
    hidden = torch.randn(5, 4, 3)
    flat = [h.flatten() / h.flatten().norm() for h in hidden]
    terms = [torch.exp(-(flat[i] - flat[j]).square().sum() / 0.7) for i in range(5) for j in range(i + 1, 5)]
    reference = torch.log(sum(terms) / len(terms) + 1e-5)
    torch.testing.assert_close(dispersive_loss(hidden, temperature=0.7), reference)
    with pytest.raises(ValueError, match="at least 2 samples"):
        dispersive_loss(hidden[:1])


@pytest.mark.parametrize("form", ["per-token", "token-axis"])
def test_self_alignment_loss_both_forms_match_loops(form):
    student, teacher = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    total, count = 0.0, 0
    for b in range(2):
        if form == "per-token":
            pairs = [(student[b, i], teacher[b, i]) for i in range(6)]  # one cosine per token
        else:
            pairs = [(student[b, :, d], teacher[b, :, d]) for d in range(4)]  # one per channel
        for u, v in pairs:
            total += 1 - u.dot(v) / (u.norm() * v.norm())
            count += 1
    torch.testing.assert_close(self_alignment_loss(student, teacher, form), total / count)


def test_conv_projector_matches_a_per_token_neighbourhood_sum():
    from repa.models.projectors import ConvProjector

    projector = ConvProjector(3, 2, kernel_size=3)
    tokens = torch.randn(1, 16, 3)  # a 4x4 grid
    out = projector(tokens)
    weight, bias = projector.conv.weight, projector.conv.bias  # (2, 3, 3, 3)
    grid = tokens[0].view(4, 4, 3)
    for row in range(4):
        for col in range(4):
            expected = bias.clone()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, col + dc
                    if 0 <= r < 4 and 0 <= c < 4:  # zero padding outside the grid
                        expected += weight[:, :, dr + 1, dc + 1] @ grid[r, c]
            torch.testing.assert_close(out[0, row * 4 + col], expected, rtol=1e-5, atol=1e-6)


def test_attention_distillation_matches_a_per_query_loop():
    from repa.align import attention_distillation_loss

    student, teacher = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    total = 0.0
    for b in range(2):
        for h in range(3):
            for i in range(5):
                p = torch.exp(teacher[b, h, i]) / torch.exp(teacher[b, h, i]).sum()
                q = torch.exp(student[b, h, i]) / torch.exp(student[b, h, i]).sum()
                total += -(p * q.log()).sum() / 30
    torch.testing.assert_close(attention_distillation_loss(student, teacher), total)


@pytest.mark.parametrize("kind", ["sit-rope-qknorm", "timm"])
def test_attention_taps_reproduce_the_attention_output(kind):
    """softmax(captured logits) @ v, projected, is what the attention module returned: the logits
    are the ones it used (qk-norm and RoPE included for repa's, timm's for the encoder)."""
    from einops import rearrange

    from repa.models import create_model
    from repa.train.methods.objectives import AttentionTaps

    if kind == "timm":
        from repa.encoders import build_local_vit

        kwargs = {
            "img_size": 16,
            "patch_size": 4,
            "embed_dim": 24,
            "depth": 2,
            "num_heads": 2,
            "num_classes": 0,
        }
        net, prefix = build_local_vit("vit_tiny_patch16_224", kwargs), 1
        run = lambda: net(torch.randn(2, 3, 16, 16))  # noqa: E731
    else:
        net = create_model("SiT-S/4", input_size=16, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                           num_classes=4, qk_norm=True, rope=True).eval()  # fmt: skip
        prefix = 0
        run = lambda: net.velocity(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randint(0, 4, (2,)))  # noqa: E731
    taps = AttentionTaps(net.blocks, [2], prefix_tokens=0)
    attention, seen = net.blocks[1].attn, {}
    attention.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with taps.capturing() as parts:
        run()
    logits = taps.logits(parts)[2]  # (B, H, T, T)
    v = rearrange(attention.qkv(seen["x"]), "b t (three h d) -> three b h t d", three=3, h=2)[2]
    mixed = rearrange(logits.softmax(dim=-1) @ v, "b h t d -> b t (h d)")
    torch.testing.assert_close(attention.proj(mixed), seen["out"], rtol=1e-4, atol=1e-5)
    if prefix:  # the encoder's class token is dropped from both axes
        with taps.capturing() as parts:
            run()
        taps.prefix_tokens = prefix
        assert taps.logits(parts)[2].shape[-1] == logits.shape[-1] - prefix


def test_derangement_gives_every_sample_another_one():
    for seed in range(20):
        keys = torch.rand(7, generator=torch.Generator().manual_seed(seed))
        source = derangement(keys)
        assert sorted(source.tolist()) == list(range(7)) and (source != torch.arange(7)).all()


# ---- gradients ---------------------------------------------------------------------------------


def _parts(shards, tmp_path, encoder="none", **objective):  # noqa: F811
    values = tiny_config(shards, tmp_path, encoder=encoder).to_dict()
    values["model"].update(depth=4, class_dropout_prob=0.0)
    values["objective"] = objective
    if "sra_student_depth" in objective:
        values["run"]["method"] = "sra"
    config = ExperimentConfig.from_dict(values).validate()
    method_class = get_method(config.method)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    from repa.train.ema import EMA

    ema = EMA(model, decay=0.9)
    context = MethodContext(config, tokenizer, encoders, model, torch.device("cpu"), 1, ema.model)
    return method_class.build(context), model, ema


def _grad_blocks(model) -> list[bool]:
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in model.blocks]


def test_dispersive_gradient_reaches_the_blocks_up_to_its_depth_only(shards, tmp_path):  # noqa: F811
    method, model, _ = _parts(shards, tmp_path, dispersive_weight=0.5, dispersive_depth=2)
    x, t, y = torch.randn(4, 3, 16, 16), torch.rand(4), torch.randint(0, 4, (4,))
    with method.taps.capturing() as hidden:
        model(x, t, y)
    dispersive_loss(hidden[2]).backward()
    assert _grad_blocks(model) == [True, True, False, False]
    assert all(p.grad is None for p in model.final_layer.parameters())


def test_sra_gradient_reaches_the_student_blocks_and_head_never_the_teacher(shards, tmp_path):  # noqa: F811
    method, model, ema = _parts(shards, tmp_path, sra_student_depth=2, sra_teacher_depth=3)
    with torch.no_grad():  # a teacher that differs from the student
        for p in ema.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher_before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    latents, eps = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    t, labels = torch.rand(4), torch.randint(0, 4, (4,))
    x_t, _ = interpolate("linear", latents, eps, t)
    noise = StepNoise(0, 4, "cpu")
    with method.taps.capturing() as hidden:
        model(x_t, t, labels)
    loss, metrics = method.extra_terms(hidden, latents, eps, t, labels, None, noise)
    loss.backward()
    assert _grad_blocks(model) == [True, True, False, False]
    assert all(p.grad is not None for p in method.heads.parameters())
    assert all(p.grad is None and not p.requires_grad for p in ema.model.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in ema.model.state_dict().items())
    # the value: the head on the student's block 2 against the teacher's block 3 at the lower t
    t_teacher = (t - 0.2 * noise.uniform("sra_t")).clamp(0, 1)
    assert (t_teacher <= t).all() and (t_teacher < t).any()
    x_teacher, _ = interpolate("linear", latents, eps, t_teacher)
    captured = {}
    handle = ema.model.blocks[2].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    ema.model(x_teacher, t_teacher, labels)  # the full forward
    handle.remove()
    expected = self_alignment_loss(method.heads["sra_head"](hidden[2]), captured["h"])
    torch.testing.assert_close(metrics["loss_sra"], expected.detach())
    assert method._head_terms  # the head's own loss, on the detached student state


WEIGHTED_TERMS = {
    "loss_cos": {"cos_loss_weight": 0.7},
    "loss_dispersive": {"dispersive_weight": 0.5, "dispersive_depth": 2},
    "loss_sra": {"sra_student_depth": 2, "sra_teacher_depth": 3},
    "loss_attn": {"encoder": True, "attn_distill_weight": 0.5, "attn_distill_layers": "2:1"},
}


@pytest.mark.parametrize("term", list(WEIGHTED_TERMS))
def test_each_term_is_in_the_sit_loss_with_its_weight_and_gradient(shards, encoder_file, tmp_path, term):  # noqa: F811
    """model_loss with the option against the same step without it: the total differs by exactly
    weight x the logged term, and so does the SiT's gradient (the term is not detached)."""
    from repa.data.stream import Batch

    options = dict(WEIGHTED_TERMS[term])
    encoder = encoder_file if options.pop("encoder", False) else "none"
    weight = next(v for k, v in options.items() if k.endswith("weight")) if term != "loss_sra" else 0.5
    latents, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    batch = Batch(images=images, labels=labels, moments=None, features=None, keys=list("abcd"),
                  flipped=torch.zeros(4, dtype=torch.bool))  # fmt: skip
    results = []
    for with_term in (True, False):
        torch.manual_seed(0)
        method, model, _ = _parts(shards, tmp_path, encoder=encoder, **options)
        targets = method.target_tokens(batch, images)  # the encoder's attention too, when distilling
        if not with_term:
            method.objective.cos_loss_weight = method.objective.dispersive_weight = 0.0
            method.objective.sra_weight = method.objective.attn_distill_weight = 0.0
        item = method.model_loss(model, latents, labels, targets, StepNoise(3, 4, "cpu"))
        item.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((item, grads))
    (full, full_grads), (bare, bare_grads) = results
    torch.testing.assert_close(full.loss - bare.loss, weight * full.metrics[term])
    assert not torch.allclose(full_grads, bare_grads)


def test_attention_distillation_pairs_blocks_and_keeps_the_sits_first_heads(shards, encoder_file, tmp_path):  # noqa: F811
    """HASTE's term: the mean over block pairs of the cross-entropy on the first min(heads) heads
    (here the SiT's first 2 of 4 against the encoder's 2), the encoder's class token dropped."""
    from repa.align import attention_distillation_loss
    from repa.data.stream import Batch

    values = tiny_config(shards, tmp_path, encoder=encoder_file).to_dict()
    values["model"].update(depth=3, num_heads=4, class_dropout_prob=0.0)
    values["objective"] = {"attn_distill_weight": 0.5, "attn_distill_layers": "1:1,3:1"}
    config = ExperimentConfig.from_dict(values).validate()
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    method = get_method("repa").build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    images, labels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 3])
    stale = torch.zeros(2, 16, 24)
    batch = Batch(images=images, labels=labels, moments=None, features=stale, keys=["a", "b"],
                  flipped=torch.zeros(2, dtype=torch.bool))  # fmt: skip
    # attention maps are never cached: the encoder runs on the images whatever the shards hold
    assert method.batch_fields(frozenset({"features"})) == {"images"}
    targets = method.target_tokens(batch, images)
    torch.testing.assert_close(targets[0], encoders[0](images).float())
    teacher = method._teacher_logits[1]
    assert teacher.shape == (2, 2, 16, 16)  # 16 patch tokens, the class token dropped
    latents = torch.randn(2, 3, 16, 16)
    item = method.model_loss(model, latents, labels, targets, StepNoise(5, 2, "cpu"))
    noise = StepNoise(5, 2, "cpu")
    t = noise.draw("t", lambda n, g: method.time_sampler(n, "linear", generator=g))
    x_t, _ = interpolate("linear", latents, noise.normal("noise", (3, 16, 16)), t)
    with method.student_attention.capturing() as parts:
        model(x_t, t, labels)
    student = method.student_attention.logits(parts)
    assert student[1].shape == (2, 4, 16, 16)
    expected = (
        attention_distillation_loss(student[1][:, :2], teacher)
        + attention_distillation_loss(student[3][:, :2], teacher)
    ) / 2
    torch.testing.assert_close(item.metrics["loss_attn"], expected.detach())


def test_a_truncated_teacher_forward_runs_no_block_after_its_own(shards, tmp_path):  # noqa: F811
    _, model, _ = _parts(shards, tmp_path)
    model.eval()
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, index=index: calls.append(index))
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randint(0, 4, (2,))
    output = block_output(model, 2, x, t, y)
    assert calls == [0, 1]
    calls.clear()
    captured = {}
    handle = model.blocks[1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    model(x, t, y)
    handle.remove()
    assert calls == [0, 1, 2, 3] and torch.equal(output, captured["h"])


def test_shuffled_targets_align_each_sample_to_another_samples_tokens(shards, encoder_file, tmp_path):  # noqa: F811
    method, model, _ = _parts(shards, tmp_path, encoder=encoder_file, align_target="shuffled")
    latents, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    targets = [torch.randn(4, 16, 24)]
    item = method.model_loss(model, latents, labels, targets, StepNoise(7, 4, "cpu"))
    noise = StepNoise(7, 4, "cpu")  # the same draws again
    t = noise.draw("t", lambda n, g: method.time_sampler(n, "linear", generator=g))
    x_t, _ = interpolate("linear", latents, noise.normal("noise", (3, 16, 16)), t)
    _, projections = model(x_t, t, labels)
    source = derangement(noise.uniform("align_shuffle"))
    assert (source != torch.arange(4)).all()
    shuffled = alignment_loss(projections, [targets[0][source]])
    torch.testing.assert_close(item.metrics["loss_align"], shuffled.detach())
    assert not torch.allclose(shuffled, alignment_loss(projections, targets))


def test_zscore_reaches_the_targets_and_the_conv_projector_the_heads_group(shards, encoder_file, tmp_path):  # noqa: F811
    method, model, _ = _parts(
        shards, tmp_path, encoder=encoder_file, projector="conv", target_norm="zscore", target_norm_gamma=0.8
    )
    assert len(model.projectors) == 0  # the SiT (and its EMA file) holds no projector
    assert [g.name for g in method.groups()] == ["sit", "heads"]
    from repa.data.stream import Batch

    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    batch = Batch(images=images, labels=torch.zeros(2, dtype=torch.long), moments=None, features=None,
                  keys=["a", "b"], flipped=torch.zeros(2, dtype=torch.bool))  # fmt: skip
    raw = method.encoders[0](images).float()
    torch.testing.assert_close(method.target_tokens(batch, images)[0], spatial_zscore(raw, 0.8))
    items = list(method.losses(model, batch, StepNoise(0, 2, "cpu")))
    assert [i.group for i in items] == ["sit", "heads"]
    items[1].loss.backward()  # the heads' own loss: its value is the alignment term's
    torch.testing.assert_close(items[1].loss.detach(), 0.5 * items[0].metrics["loss_align"])
    assert all(p.grad is not None for p in method.heads.parameters())


# ---- the gather: gradient across processes ---------------------------------------------------


def _gather_worker(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    everything = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    mine = everything[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    dispersive_loss(mine).backward()
    torch.save({"grad": mine.grad}, f"{path}.rank{rank}")
    dist.destroy_process_group()


def test_dispersive_gradient_flows_through_the_gather_to_every_rank(tmp_path):
    """Two gloo processes, two samples each: each rank's gradient is its slice of the one-process
    gradient of the 4-sample loss, times 2 (the gather's backward sums both ranks' identical
    losses; DDP's average divides by 2 again). With a gather that carries no gradient (the DDT
    code's) the cross-rank pairs would contribute nothing."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(port, str(tmp_path / "g")), nprocs=2, start_method="fork")
    everything = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    dispersive_loss(everything).backward()
    for rank in (0, 1):
        grad = torch.load(tmp_path / f"g.rank{rank}")["grad"]
        torch.testing.assert_close(grad, 2 * everything.grad[2 * rank : 2 * rank + 2])
    local = everything[:2].detach().clone().requires_grad_(True)
    dispersive_loss(local).backward()  # rank 0's pair alone: another gradient
    assert not torch.allclose(local.grad, everything.grad[:2])


# ---- training, HASTE, resume ------------------------------------------------------------------


def _run_config(shards, output_dir, encoder="none", method="", steps=8, **objective):  # noqa: F811
    values = tiny_config(shards, output_dir, encoder=encoder, max_train_steps=steps).to_dict()
    values["model"]["depth"] = 3
    values["run"].update(method=method, checkpointing_steps=4)
    values["objective"] = objective
    return ExperimentConfig.from_dict(values)


ARMS = {
    "cos-loss": ({"cos_loss_weight": 1.0}, "loss_cos"),
    "dispersive": (
        {"method": "dispersive", "dispersive_weight": 0.5, "dispersive_depth": 2},
        "loss_dispersive",
    ),
    "irepa": ({"encoder": True, "projector": "conv", "target_norm": "zscore"}, "loss_align"),
    "shuffled": ({"encoder": True, "align_target": "shuffled"}, "loss_align"),
    "sra": ({"method": "sra", "sra_student_depth": 1, "sra_teacher_depth": 2}, "loss_sra"),
    "attn-distill": (
        {"encoder": True, "attn_distill_weight": 0.5, "attn_distill_layers": "1:1,2:1"},
        "loss_attn",
    ),
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_objective_trains_and_resumes_bitwise(shards, encoder_file, tmp_path, arm):  # noqa: F811
    options, term = ARMS[arm]
    options = dict(options)
    encoder = encoder_file if options.pop("encoder", False) else "none"
    method = options.pop("method", "")

    def config(name, steps):
        return _run_config(shards, tmp_path / name, encoder, method, steps, **options)

    straight = train(config("straight", 8))
    records = read_metrics(straight.run_dir)
    assert all(term in r for r in records)
    first, last = records[0][term], min(r[term] for r in records[-3:])
    assert last < first, (arm, [r[term] for r in records])  # the method's own term falls
    train(config("resumed", 4))
    resumed = train(config("resumed", 8))
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))
    from repa.eval.checkpoints import load_generator

    load_generator(straight.run_dir)  # the EMA file samples as any SiT's: no heads, no conv projector


def test_align_until_step_ends_alignment_and_a_late_resume_builds_no_encoder(
    shards,  # noqa: F811
    encoder_file,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    import repa.encoders

    straight = train(_run_config(shards, tmp_path / "a", encoder_file, steps=6, align_until_step=3))
    logged = [r["step"] for r in read_metrics(straight.run_dir) if "loss_align" in r]
    assert logged == [1, 2, 3]
    train(_run_config(shards, tmp_path / "b", encoder_file, steps=4, align_until_step=3))
    built = []
    original = repa.encoders.create_encoders
    monkeypatch.setattr(
        repa.encoders, "create_encoders", lambda *a, **k: built.append(a) or original(*a, **k)
    )
    resumed = train(_run_config(shards, tmp_path / "b", encoder_file, steps=6, align_until_step=3))
    assert built == []  # resumed at step 4 > 3: no encoder built
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))
    train(_run_config(shards, tmp_path / "c", encoder_file, steps=2, align_until_step=3))
    train(_run_config(shards, tmp_path / "c", encoder_file, steps=4, align_until_step=3))
    assert len(built) == 2  # a start, and a resume before the end, build it


def test_objective_flags_name_what_is_missing():
    with pytest.raises(ValueError, match="--projector conv .* set --encoder"):
        ExperimentConfig.from_dict(
            {"encoder": {"encoder": "none"}, "objective": {"projector": "conv"}}
        ).validate()
    with pytest.raises(ValueError, match="--dispersive-weight > 0"):
        ExperimentConfig.from_dict({"run": {"method": "dispersive"}}).validate()
    with pytest.raises(ValueError, match="--sra-teacher-depth 40 is out of range"):
        ExperimentConfig.from_dict(
            {"encoder": {"encoder": "none"}, "run": {"method": "sra"}, "objective": {"sra_teacher_depth": 40}}
        ).validate()
    with pytest.raises(ValueError, match="--projector-kernel must be odd"):
        ExperimentConfig.from_dict({"objective": {"projector_kernel": 2}})


PRESETS = ["sra_sit_xl2", "dispersive_sit_xl2", "irepa_sit_xl2", "haste_sit_xl2", "lightningdit_xl1_vavae"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    ExperimentConfig.from_dict(load_preset(ROOT / "configs" / f"{name}.yaml")).validate()


@pytest.mark.slow
def test_two_processes_train_every_term_together(shards, encoder_file, tmp_path):  # noqa: F811
    """torchrun, two CPU processes (gloo), SRA + REPA + HASTE's attention distillation + dispersive +
    velocity direction, alignment ending at step 2 of 4: DDP's every-parameter reduction holds
    after the end (the projector's zero-weighted use), the heads' group is averaged by hand, the
    dispersive gather runs inside the backward pass; the ranks end identical."""
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(
        "import json, os, sys\n"
        "from repa.config import ExperimentConfig\n"
        "from repa.train.loop import train\n"
        "result = train(ExperimentConfig.from_dict(json.loads(open(sys.argv[1]).read())))\n"
        "digest = [float(p.double().sum()) for p in result.model.parameters()]\n"
        "open(sys.argv[2] + '.rank' + os.environ['RANK'], 'w').write(json.dumps(digest))\n"
    )
    config = _run_config(
        shards, tmp_path / "two", encoder_file, "sra", steps=4, sra_student_depth=1, sra_teacher_depth=2,
        dispersive_weight=0.5, cos_loss_weight=1.0, align_until_step=2, attn_distill_weight=0.5,
        attn_distill_layers="1:1",
    )  # fmt: skip
    (tmp_path / "two.json").write_text(json.dumps(config.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29541", str(script), str(tmp_path / "two.json"),
               str(tmp_path / "digest")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = [json.loads((tmp_path / f"digest.rank{rank}").read_text()) for rank in (0, 1)]
    assert digests[0] == digests[1]
    records = read_metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in records if "loss_sra" in r] == [1, 2]
    assert [r["step"] for r in records if "loss_attn" in r] == [1, 2]
    assert all("loss_dispersive" in r and "loss_cos" in r for r in records)
