"""The step protocol: a method defined here trains, resumes and exports through `repa train`'s code
path with no change to the loop; gradient accumulation gives the updates of one large batch; a
non-finite loss in any group on any rank updates nothing."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from repa.data.stream import Batch
from repa.train import checkpoint as ckpt
from repa.train.ema import EMA
from repa.train.logging import read_metrics
from repa.train.loop import train
from repa.train.methods import register_method
from repa.train.methods.base import GroupLoss, MethodContext, ParamGroup, TrainingMethod
from repa.train.methods.denoising import DenoisingMethod
from repa.train.randomness import StepNoise
from repa.train.setup import build_parts
from repa.train.step import StepRunner
from tests.test_train import (  # noqa: F401 (fixtures)
    RESOLUTION,
    assert_states_equal,
    encoder_file,
    final_state,
    shards,
    tiny_config,
)
from tests.test_train_repae import repae_config, vae_file  # noqa: F401 (fixture)


class PenaltyMethod(TrainingMethod):
    """The plain denoising loss, plus an L2 penalty on a tiny module of its own, trained by its
    own optimiser (SGD). `poison` = (group, step, rank) makes that group's loss NaN there while
    its gradients stay finite, so that only the loss check (and, across ranks, the agreement on
    it) can stop the update."""

    poison: tuple[str, int, int] | None = None
    aux_factor = 1.0  # a huge factor overflows the fp16 grad scaler's scaled gradients

    def __init__(self, denoising: DenoisingMethod, aux: nn.Module, aux_group: ParamGroup, rank: int):
        self.denoising, self.aux, self.aux_group, self.rank = denoising, aux, aux_group, rank
        self.steps = 0

    @classmethod
    def build(cls, context: MethodContext) -> "PenaltyMethod":
        aux = nn.Linear(3, 2).to(context.device)
        group = ParamGroup("aux", aux, torch.optim.SGD(aux.parameters(), lr=0.1, momentum=0.9))
        rank = torch.distributed.get_rank() if context.world_size > 1 else 0
        return cls(DenoisingMethod.build(context), aux, group, rank)

    def groups(self) -> list[ParamGroup]:
        return [*self.denoising.groups(), self.aux_group]

    def losses(self, model, batch, noise: StepNoise):
        for item in self.denoising.losses(model, batch, noise):
            yield self._maybe_poisoned(item)
        penalty = self.aux_factor * self.aux(noise.normal("aux_input", (3,))).square().mean()
        yield self._maybe_poisoned(GroupLoss("aux", penalty, {"loss_aux": penalty.detach()}))
        self.steps += 1

    def _maybe_poisoned(self, item: GroupLoss) -> GroupLoss:
        if self.poison == (item.group, self.steps, self.rank):
            item.loss = item.loss + float("nan") * item.loss.detach()
        return item

    def state_dict(self) -> dict:
        return {"aux": self.aux.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.aux.load_state_dict(state["aux"])
        self.steps = state["steps"]

    def export(self, ema_model, directory: Path) -> None:
        torch.save(self.aux.state_dict(), directory / "aux.pt")


register_method("l2-penalty", PenaltyMethod)


def penalty_config(shards, output_dir, **run):  # noqa: F811
    config = tiny_config(shards, output_dir, **run)
    config.run.method = "l2-penalty"
    return config


def test_a_method_defined_outside_the_library_trains_resumes_and_exports(shards, tmp_path):  # noqa: F811
    straight = train(penalty_config(shards, tmp_path / "a", max_train_steps=6, checkpointing_steps=3))
    records = read_metrics(straight.run_dir)
    assert {"loss", "loss_aux", "grad_norm", "grad_norm_aux"} <= records[-1].keys()
    assert records[-1]["loss_aux"] < records[0]["loss_aux"]  # its own optimiser trained it
    last = ckpt.latest_checkpoint(straight.run_dir / "checkpoints")
    state = ckpt.load_file(last / "model.pt")
    assert set(state["optimizers"]) == {"sit", "aux"} and state["method"]["steps"] == 6
    exported = torch.load(last / "aux.pt", weights_only=True)
    assert all(torch.equal(exported[k], state["method"]["aux"][k]) for k in exported)

    train(penalty_config(shards, tmp_path / "b", max_train_steps=3, checkpointing_steps=3))
    resumed = train(penalty_config(shards, tmp_path / "b", max_train_steps=6, checkpointing_steps=3))
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))
    resumed_state = ckpt.load_file(ckpt.latest_checkpoint(resumed.run_dir / "checkpoints") / "model.pt")
    for key, value in state["method"]["aux"].items():
        assert torch.equal(value, resumed_state["method"]["aux"][key]), key


def test_resuming_with_another_method_names_the_missing_group(shards, tmp_path):  # noqa: F811
    train(tiny_config(shards, tmp_path, max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(
        ValueError, match=r"no optimiser state for parameter group\(s\) \['aux'\].*another --method"
    ):
        train(penalty_config(shards, tmp_path, max_train_steps=4, checkpointing_steps=2))


def test_a_checkpoint_with_one_optimiser_in_the_old_layout_resumes(shards, tmp_path):  # noqa: F811
    straight = train(tiny_config(shards, tmp_path / "a", max_train_steps=4, checkpointing_steps=2))
    train(tiny_config(shards, tmp_path / "b", max_train_steps=2, checkpointing_steps=2))
    path = tmp_path / "b" / "run" / "checkpoints" / "step-00000002" / "model.pt"
    state = ckpt.load_file(path)
    state["optimizer"] = state.pop("optimizers")["sit"]  # as written before parameter groups
    torch.save(state, path)
    record = json.loads((path.parent / "COMPLETE.json").read_text())
    for key in ("checksum", "checksums"):  # nor did those checkpoints record checksums
        record.pop(key, None)
    (path.parent / "COMPLETE.json").write_text(json.dumps(record))
    resumed = train(tiny_config(shards, tmp_path / "b", max_train_steps=4, checkpointing_steps=2))
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))


def test_gradient_accumulation_matches_one_large_batch(shards, encoder_file, tmp_path):  # noqa: F811
    """REPA at global batch 8: 2 micro-batches of 4 train on the same samples, times and noise as
    one batch of 8, so the weights agree to float rounding."""
    runs = {}
    for accumulation in (1, 2):
        config = tiny_config(shards, tmp_path / str(accumulation), encoder=encoder_file, max_train_steps=4)
        config.optim.gradient_accumulation_steps = accumulation
        runs[accumulation] = final_state(train(config).run_dir)
    for key, value in runs[1]["model"].items():
        torch.testing.assert_close(runs[2]["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.equal(runs[2]["model"][k], v) for k, v in runs[1]["model"].items())  # not one path


def _repae_parts(config, seed: int = 0):
    from repa.train.methods.repae import REPAEMethod

    torch.manual_seed(seed)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"), REPAEMethod.model_options)
    method = REPAEMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    return method, model, EMA(model, decay=0.9)


def _images(count: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        images=torch.randint(
            0, 256, (count, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, generator=generator
        ),
        labels=torch.randint(0, 4, (count,), generator=generator),
        moments=None,
        features=None,
        keys=[str(k) for k in range(count)],
        flipped=torch.zeros(count, dtype=torch.bool),
    )


def _state(method, ema) -> dict[str, torch.Tensor]:
    """Every group's parameters, the diffusion model's buffers (REPA-E's latent statistics) and
    the EMA. (The discriminator's BatchNorm statistics are never read in training.)"""
    state = {}
    for group in method.groups():
        for name, tensor in group.module.named_parameters():
            state[f"{group.name}.{name}"] = tensor.detach().clone()
        if group.name == "sit":
            for name, tensor in group.module.named_buffers():
                state[f"{group.name}.{name}"] = tensor.clone()
    for name, tensor in ema.state_dict().items():
        state[f"ema.{name}"] = tensor.clone()
    return state


def test_repae_accumulation_matches_one_large_batch(shards, encoder_file, vae_file, tmp_path, monkeypatch):  # noqa: F811
    """REPA-E with 2 micro-batches against 1 batch: VAE, critic and SiT (and the SiT's BatchNorm
    statistics) agree after a few steps. Its BatchNorms normalise each micro-batch by its own
    statistics, so the batch here is two copies of one half, images and draws alike: each half's
    statistics are then the whole batch's, and what remains to compare is the accumulation."""
    config = repae_config(shards, encoder_file, vae_file, tmp_path)
    original_draw = StepNoise.draw

    def mirrored_draw(self, name, make):
        if name not in self._drawn:
            half = make(self.num_samples // 2, self.generator(name))
            self._drawn[name] = torch.cat([half, half])
        return original_draw(self, name, make)

    monkeypatch.setattr(StepNoise, "draw", mirrored_draw)
    states = {}
    for accumulation in (1, 2):
        method, model, ema = _repae_parts(config)
        runner = StepRunner(method, model, model, ema, accumulation=accumulation, seed=0)
        for step in range(3):
            half = _images(2, seed=step)
            whole = Batch(
                images=torch.cat([half.images, half.images]),
                labels=torch.cat([half.labels, half.labels]),
                moments=None,
                features=None,
                keys=half.keys + half.keys,
                flipped=torch.cat([half.flipped, half.flipped]),
            )
            outcome = runner.run(step, iter([whole] if accumulation == 1 else [half, half]))
            assert not outcome.skipped
        states[accumulation] = _state(method, ema)
    for key, value in states[1].items():
        # atol: a conv bias followed by GroupNorm has zero gradient up to rounding (~1e-10), which
        # Adam (eps 1e-8) turns into steps of ~lr/50 of either sign; a real difference in the
        # gradients moves weights by up to 2 x lr (1e-4) per step
        torch.testing.assert_close(states[2][key], value, rtol=1e-4, atol=3e-5, msg=key)


def test_repae_latent_statistics_match_torch_batchnorm():
    """REPA-E's SiT pass normalises like nn.BatchNorm2d in train mode, micro-batch by micro-batch,
    and moves the running statistics once per step as BatchNorm would over the whole step."""
    from types import SimpleNamespace

    from repa.train.methods.repae import REPAEMethod

    torch.manual_seed(0)
    ours = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    reference = copy.deepcopy(ours)
    ours.running_mean.uniform_(), ours.running_var.uniform_(1, 2)
    reference.load_state_dict(ours.state_dict())
    method = SimpleNamespace(sit=SimpleNamespace(bn=ours), world_size=1, _latent_moments=[])
    micro = [torch.randn(3, 4, 5, 5) * 2 + 1, torch.randn(3, 4, 5, 5) - 1]
    for z in micro:
        torch.testing.assert_close(
            REPAEMethod.normalize_by_batch(method, z), reference(z), rtol=1e-5, atol=1e-5
        )
    reference.load_state_dict(ours.state_dict())  # the per-micro-batch forwards moved it twice
    reference(torch.cat(micro))
    REPAEMethod.finish_step(method, updated=True)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    REPAEMethod.normalize_by_batch(method, micro[0])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    REPAEMethod.finish_step(method, updated=False)  # a skipped step moves nothing
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())
    assert method._latent_moments == []


def test_repae_skipped_or_failed_step_leaves_the_sit_as_it_was(shards, encoder_file, vae_file, tmp_path):  # noqa: F811
    config = repae_config(shards, encoder_file, vae_file, tmp_path)
    method, model, ema = _repae_parts(config)
    runner = StepRunner(method, model, model, ema, seed=0)
    assert not runner.run(0, iter([_images(4, seed=0)])).skipped
    before = _state(method, ema)

    original = method.vae_loss.generator_loss

    def nan_loss(*args):
        total, parts = original(*args)
        return total + float("nan") * total.detach(), parts

    method.vae_loss.generator_loss = nan_loss
    assert runner.run(1, iter([_images(4, seed=1)])).skipped
    after = _state(method, ema)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # BatchNorm statistics included

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("out of memory (simulated)")

    method.vae_loss.generator_loss = lambda *args: (
        FailingBackward.apply(original(*args)[0]),
        original(*args)[1],
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="simulated") as failure:
        runner.run(2, iter([_images(4, seed=2)]))
    # the VAE pass froze the SiT and put it in eval mode; the abandoned step undid both, also
    # while the exception (and its traceback's frames) is still held, as a notebook holds it
    assert failure.traceback
    assert model.training and [p for p in model.parameters() if p.requires_grad] == trainable
    assert all(p.requires_grad for p in method.vae_loss.discriminator.parameters())
    assert method._latent_moments == []


@pytest.mark.parametrize("group", ["sit", "aux"])
def test_a_nonfinite_loss_in_any_group_updates_nothing(shards, tmp_path, group):  # noqa: F811
    config = penalty_config(shards, tmp_path)
    torch.manual_seed(0)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    method = PenaltyMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    ema = EMA(model, decay=0.9)
    runner = StepRunner(method, model, model, ema, seed=0)
    batches = (_images(8, seed=step) for step in range(3))
    assert not runner.run(0, batches).skipped
    before = _state(method, ema)
    optimizer_states = [copy.deepcopy(g.optimizer.state_dict()) for g in method.groups()]
    method.poison = (group, 1, 0)
    outcome = runner.run(1, batches)
    assert outcome.skipped and outcome.nonfinite
    after = _state(method, ema)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for group_, saved in zip(method.groups(), optimizer_states):
        assert str(group_.optimizer.state_dict()) == str(saved), group_.name  # no moment moved either
    method.poison = None
    assert not runner.run(2, batches).skipped  # and training goes on


def test_a_scaler_overflow_in_one_group_skips_every_group_without_counting(shards, tmp_path):  # noqa: F811
    """fp16's loss scaling (one GradScaler for every group; run here on CPU in fp32): an overflow
    in the aux group's scaled gradients skips the SiT's update too, lowers the scale once, and
    does not count as a non-finite step."""
    config = penalty_config(shards, tmp_path)
    torch.manual_seed(0)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    method = PenaltyMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    ema = EMA(model, decay=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    runner = StepRunner(method, model, model, ema, seed=0, scaler=scaler)
    batches = (_images(8, seed=step) for step in range(3))
    assert not runner.run(0, batches).skipped
    before, scale = _state(method, ema), scaler.get_scale()
    method.aux_factor = 1e38  # finite loss, infinite once scaled
    outcome = runner.run(1, batches)
    assert outcome.skipped and not outcome.nonfinite
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(_state(method, ema)[k], v) for k, v in before.items())
    method.aux_factor = 1.0
    assert not runner.run(2, batches).skipped


def test_each_group_is_clipped_to_its_own_norm(shards, tmp_path, monkeypatch):  # noqa: F811
    config = penalty_config(shards, tmp_path)
    torch.manual_seed(0)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    method = PenaltyMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    method.aux_group.max_grad_norm = 0.01
    before = [p.detach().clone() for p in method.aux_group.params]
    clipped_to = {}
    original_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        clipped_to[max_norm] = len(params)
        return original_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    outcome = StepRunner(method, model, model, EMA(model, decay=0.9), seed=0).run(
        0, iter([_images(8, seed=0)])
    )
    assert outcome.grad_norms["aux"] > 0.1  # the norm is logged before clipping
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(method.aux_group.params, before)])
    assert moved.norm() == pytest.approx(0.1 * 0.01, rel=1e-3)  # SGD's first step: lr x clipped gradient
    assert clipped_to == {  # the other group keeps --max-grad-norm
        0.01: len(method.aux_group.params),
        config.optim.max_grad_norm: len(method.denoising.model_group.params),
    }


def test_a_group_that_no_loss_reached_steps_with_the_others_under_the_scaler(shards, tmp_path):  # noqa: F811
    """A method whose aux loss is off for a step (a warm-up, a conditional term): its group has no
    gradient there, which must neither crash the grad scaler nor change what the others do."""
    config = penalty_config(shards, tmp_path)
    torch.manual_seed(0)
    tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
    method = PenaltyMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu")))
    original_losses = PenaltyMethod.losses
    method.losses = lambda model, batch, noise: (  # only the denoising group's loss
        item for item in original_losses(method, model, batch, noise) if item.group != "aux"
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    runner = StepRunner(method, model, model, EMA(model, decay=0.9), seed=0, scaler=scaler)
    aux_before = [p.detach().clone() for p in method.aux_group.params]
    sit_before = [p.detach().clone() for p in method.denoising.model_group.params]
    outcome = runner.run(0, iter([_images(8, seed=0)]))
    assert not outcome.skipped and float(outcome.grad_norms["aux"]) == 0.0
    assert all(torch.equal(p, b) for p, b in zip(method.aux_group.params, aux_before))
    assert any(not torch.equal(p, b) for p, b in zip(method.denoising.model_group.params, sit_before))


PER_RANK_SCRIPT = """
import json, sys, torch
from accelerate import PartialState
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {root!r})
from repa.config import ExperimentConfig
from repa.train.ema import EMA
from repa.train.methods.base import MethodContext
from repa.train.setup import build_parts
from repa.train.step import StepRunner
from tests.test_methods import PenaltyMethod, _images, _state

state = PartialState(cpu=True)
rank, world = state.process_index, state.num_processes
config = ExperimentConfig.from_dict(json.loads(open(sys.argv[1]).read()))
torch.manual_seed(0)
tokenizer, encoders, model = build_parts(config, torch.device("cpu"))
method = PenaltyMethod.build(MethodContext(config, tokenizer, encoders, model, torch.device("cpu"), world))
ema = EMA(model, decay=0.9)
runner = StepRunner(method, DistributedDataParallel(model), model, ema, seed=0, rank=rank, world_size=world)
report = {{}}
for group in ("sit", "aux"):
    runner.run(0, iter([_images(4, seed=rank)]))
    before = _state(method, ema)
    method.poison = (group, method.steps, 1)  # NaN on rank 1 only
    outcome = runner.run(1, iter([_images(4, seed=10 + rank)]))
    method.poison = None
    after = _state(method, ema)
    unchanged = all(torch.equal(after[k], v) for k, v in before.items())
    report[group] = {{"skipped": outcome.skipped, "unchanged": unchanged}}
    outcome = runner.run(2, iter([_images(4, seed=20 + rank)]))
    report[group]["then_trains"] = not outcome.skipped
report["digest"] = float(sum(p.double().sum() for g in method.groups() for p in g.params))
open(sys.argv[2] + f".rank{{rank}}", "w").write(json.dumps(report))
"""


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_updates_nothing_on_any(shards, tmp_path):  # noqa: F811
    """torchrun, two CPU processes: NaN in one group on rank 1 only; both ranks skip the whole step
    (weights and EMA bitwise unchanged on each) and stay identical."""
    script = tmp_path / "ranks.py"
    script.write_text(PER_RANK_SCRIPT.format(root=str(Path(__file__).parents[1])))
    (tmp_path / "config.json").write_text(json.dumps(penalty_config(shards, tmp_path).to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29531", str(script), str(tmp_path / "config.json"),
               str(tmp_path / "report")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    reports = [json.loads((tmp_path / f"report.rank{rank}").read_text()) for rank in (0, 1)]
    for report in reports:
        for group in ("sit", "aux"):
            assert report[group] == {"skipped": True, "unchanged": True, "then_trains": True}, (group, report)
    assert reports[0]["digest"] == reports[1]["digest"]  # the ranks never diverged


def test_the_ema_file_is_the_ema_of_the_model_group(shards, tmp_path):  # noqa: F811
    result = train(penalty_config(shards, tmp_path, max_train_steps=2, checkpointing_steps=2))
    ema = load_file(ckpt.latest_checkpoint(result.run_dir / "checkpoints") / "ema.safetensors")
    assert ema.keys() == result.ema_model.state_dict().keys()
