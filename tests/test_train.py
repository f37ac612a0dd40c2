"""End-to-end training on tiny synthetic shards: learning, REPA alignment, resume, pre-emption,
non-finite steps, two processes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from repa.config import ExperimentConfig
from repa.train import checkpoint as ckpt
from repa.train.logging import read_metrics
from repa.train.loop import NonFiniteError, train

RESOLUTION = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from repa.data.build import build_shards
    from repa.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root / "images", num_images=32, resolution=RESOLUTION, num_classes=4, seed=0)
    build_shards(str(root / "images"), root / "shards", resolution=RESOLUTION, shard_size=4, workers=0)
    return str(root / "shards")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A tiny random-weight ViT saved as a local encoder file: 4x4 tokens at 16px."""
    from repa.encoders.local import build_local_vit, save_local_encoder

    arch_kwargs = {"img_size": RESOLUTION, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    vit = build_local_vit("vit_tiny_patch16_224", {**arch_kwargs, "num_classes": 0})
    path = tmp_path_factory.mktemp("encoder") / "tiny-encoder.safetensors"
    save_local_encoder(
        str(path), vit, arch="vit_tiny_patch16_224", arch_kwargs={**arch_kwargs, "num_classes": 0},
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=RESOLUTION, patch_size=4,
    )  # fmt: skip
    return str(path)


def tiny_config(shards, output_dir, encoder="none", **run) -> ExperimentConfig:
    values = {
        "model": {"name": "SiT-S/4", "hidden_size": 32, "depth": 2, "num_heads": 2, "align_depth": 1,
                  "num_classes": 4, "projector_dim": 32},
        "data": {"data": shards, "resolution": RESOLUTION, "batch_size": 8, "num_workers": 0,
                 "shuffle_buffer": 8},
        "tokenizer": {"tokenizer": "pixels"},
        "encoder": {"encoder": encoder},
        "optim": {"learning_rate": 1e-3, "ema_decay": 0.9},
        "run": {"output_dir": str(output_dir), "exp_name": "run", "max_train_steps": 12,
                "checkpointing_steps": 4, "mixed_precision": "no", "log_every": 1, "sample_every": 0, **run},
    }  # fmt: skip
    return ExperimentConfig.from_dict(values)


def final_state(run_dir: Path) -> dict:
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    state = ckpt.load_file(last / "model.pt")
    return {"step": state["step"], "model": state["model"], "ema": load_file(last / "ema.safetensors")}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


@pytest.mark.slow
def test_tiny_sit_learns_and_repa_aligns(shards, encoder_file, tmp_path):
    steps = 120
    sit = train(tiny_config(shards, tmp_path / "sit", max_train_steps=steps, checkpointing_steps=steps))
    losses = [record["loss"] for record in read_metrics(sit.run_dir)]
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:5]) / 5

    repa = train(
        tiny_config(
            shards, tmp_path / "repa", encoder=encoder_file, max_train_steps=steps, checkpointing_steps=steps
        )
    )
    records = read_metrics(repa.run_dir)
    cosines = [record["cos_sim_0"] for record in records]
    assert sum(cosines[-20:]) / 20 > sum(cosines[:5]) / 5 + 0.3
    assert records[-1]["loss_align"] == pytest.approx(-records[-1]["cos_sim_0"], abs=1e-5)
    # the run directory holds what the docs promise
    for name in ("config.yaml", "environment.json", "metrics.jsonl"):
        assert (repa.run_dir / name).is_file()
    ema = load_file(ckpt.latest_checkpoint(repa.run_dir / "checkpoints") / "ema.safetensors")
    assert "projectors.0.4.weight" in ema and "pos_embed" in ema


def test_resume_continues_bitwise(shards, tmp_path):
    """Straight to 12 steps == 8 steps, stop, resume to 12 (in-process stop; see the kill test)."""
    straight = train(tiny_config(shards, tmp_path / "straight"))
    train(tiny_config(shards, tmp_path / "resumed", max_train_steps=8))
    resumed = train(tiny_config(shards, tmp_path / "resumed"))
    assert resumed.step == 12
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))


def test_skipped_samples_are_logged_and_keep_counting_after_a_resume(shards, tmp_path):
    import shutil
    import tarfile

    from tests.test_data_stream import _rewrite_shard

    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    first = sorted(damaged.glob("*.tar"))[0]
    with tarfile.open(first) as archive:
        png = [member.name for member in archive if member.name.endswith(".png")][-1]
    _rewrite_shard(first, tmp_path / "damaged.tar", png)  # flipped bytes in the last image's data
    shutil.move(tmp_path / "damaged.tar", first)

    def config(**run):
        values = tiny_config(str(damaged), tmp_path / "out", **run).to_dict()
        values["data"]["shuffle_buffer"] = 1  # read in order: the count follows from where it lies
        return ExperimentConfig.from_dict(values)

    with pytest.warns(UserWarning, match="skipping corrupt data"):
        train(config(max_train_steps=8))
        resumed = train(config())
    skipped = {record["step"]: record["data_skipped"] for record in read_metrics(resumed.run_dir)}
    # Read in order, each 4 steps of 8 samples finish one pass over the 31 good ones and take the
    # first samples of the next, which are not the damaged one (last in its shard): each 4 steps
    # meet it exactly once, before and after the resume at step 8. (A checkpoint, every 4 steps,
    # restarts the stream with a fresh pass; the count is the same whether it does or not.)
    assert [skipped[step] for step in (4, 8, 12)] == [1, 2, 3]
    # The resumed run starts from the checkpoint's count instead of from zero, and counts go up by 1.
    steps = sorted(skipped)
    assert steps == list(range(1, 13)) and skipped[1] in (0, 1) and skipped[9] in (2, 3)
    assert all(skipped[b] - skipped[a] in (0, 1) for a, b in zip(steps, steps[1:]))


@pytest.mark.slow
def test_killed_process_resumes_to_identical_weights(shards, tmp_path):
    """`repa train` SIGKILLed after a checkpoint, rerun, ends bitwise equal to an uninterrupted
    `repa train` (both in subprocesses, so both use the same kernels)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(name):
        config = tiny_config(shards, tmp_path / name, max_train_steps=40)
        (tmp_path / f"{name}.yaml").write_text(json.dumps(config.to_dict()))  # JSON is YAML
        return [sys.executable, "-m", "repa", "train", "--config", str(tmp_path / f"{name}.yaml")]

    subprocess.run(
        command("reference"), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed = command("killed")
    process = subprocess.Popen(killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(checkpoints) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = ckpt.latest_checkpoint(checkpoints)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 40
    subprocess.run(killed, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_states_equal(final_state(tmp_path / "reference" / "run"), final_state(tmp_path / "killed" / "run"))


def test_sigterm_saves_and_exits(shards, tmp_path, monkeypatch):
    config = tiny_config(shards, tmp_path, max_train_steps=1000, checkpointing_steps=1000)
    # Deliver SIGTERM to ourselves once training has started: the handler only sets a flag; the
    # loop agrees on it, saves one checkpoint and returns.
    from repa.train.step import StepRunner

    original = StepRunner.run

    def run_with_signal(self, step, *args):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, *args)

    monkeypatch.setattr(StepRunner, "run", run_with_signal)
    result = train(config)
    assert result.preempted and result.step == 6
    assert ckpt.latest_checkpoint(result.run_dir / "checkpoints").name == "step-00000006"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_nonfinite_steps_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    from repa.train.methods.denoising import DenoisingMethod

    original = DenoisingMethod.model_loss
    calls = {"n": 0}

    def poisoned(self, *args):
        item = original(self, *args)
        calls["n"] += 1
        if calls["n"] in (3,) or calls["n"] >= 6:
            item.loss = item.loss * float("nan")
        return item

    monkeypatch.setattr(DenoisingMethod, "model_loss", poisoned)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(tiny_config(shards, tmp_path, max_train_steps=20, checkpointing_steps=4, max_nonfinite_steps=3))
    records = read_metrics(tmp_path / "run")
    assert records[2]["nonfinite_steps"] == 1  # step 3 skipped and counted, training went on
    # the checkpoint at step 4 exists; nothing was written after the failures began at step 6
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


def test_repeated_nonfinite_steps_write_no_checkpoint(shards, tmp_path, monkeypatch):
    from repa.train.methods.denoising import DenoisingMethod

    original = DenoisingMethod.model_loss

    def infinite(self, *args):
        item = original(self, *args)
        item.loss = item.loss * float("inf")
        return item

    monkeypatch.setattr(DenoisingMethod, "model_loss", infinite)
    with pytest.raises(NonFiniteError):
        train(tiny_config(shards, tmp_path / "a", max_train_steps=4, max_nonfinite_steps=2))
    assert ckpt.list_checkpoints(tmp_path / "a" / "run" / "checkpoints") == []


def test_token_mismatch_is_reported_before_training(shards, encoder_file, tmp_path):
    config = tiny_config(shards, tmp_path, encoder=encoder_file)
    config.model.name = "SiT-S/2"  # 8x8 tokens against the encoder's 4x4
    with pytest.raises(ValueError, match="token count mismatch.*use patch size 4"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # opting in interpolates the encoder's 4x4 tokens to the model's 8x8 grid
    config.model.align_resample = True
    config.run.max_train_steps = 2
    result = train(config)
    assert result.step == 2 and "cos_sim_0" in read_metrics(result.run_dir)[-1]


def test_missing_data_is_reported(tmp_path):
    config = tiny_config(str(tmp_path / "nowhere-{000000..000003}.tar"), tmp_path)
    with pytest.raises(FileNotFoundError, match="4 of 4 training shards do not exist"):
        train(config)


@pytest.mark.slow
def test_two_processes_match_one(shards, tmp_path):
    """torchrun, two CPU processes (gloo): ranks stay identical and track the one-process run."""
    script = tmp_path / "two.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from repa.config import ExperimentConfig\n"
        "from repa.train.loop import train\n"
        "config = ExperimentConfig.from_dict(json.loads(open(sys.argv[1]).read()))\n"
        "result = train(config)\n"
        "digest = [float(p.double().sum()) for p in result.model.parameters()]\n"
        "rank = int(os.environ.get('RANK', 0))\n"
        "open(sys.argv[2] + f'.rank{rank}', 'w').write(json.dumps(digest))\n"
    )
    config = tiny_config(shards, tmp_path / "two", max_train_steps=10, checkpointing_steps=10)
    config.optim.learning_rate = 1e-4
    (tmp_path / "two.json").write_text(json.dumps(config.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", str(script), str(tmp_path / "two.json"),
               str(tmp_path / "digest")]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    environment = json.loads((tmp_path / "two" / "run" / "environment.json").read_text())
    assert environment["world_size"] == 2  # really distributed, not two lone processes
    rank0 = json.loads((tmp_path / "digest.rank0").read_text())
    rank1 = json.loads((tmp_path / "digest.rank1").read_text())
    assert rank0 == rank1  # parameters identical on both ranks

    single_config = tiny_config(shards, tmp_path / "one", max_train_steps=10, checkpointing_steps=10)
    single_config.optim.learning_rate = 1e-4
    single = train(single_config)
    two_loss = read_metrics(tmp_path / "two" / "run")[-1]["loss"]
    one_loss = read_metrics(single.run_dir)[-1]["loss"]
    # Same global batch and steps; the ranks read other samples, so the runs agree to a tolerance.
    assert two_loss == pytest.approx(one_loss, rel=0.25)
    two_state = final_state(tmp_path / "two" / "run")
    one_state = final_state(single.run_dir)
    for key, value in one_state["model"].items():
        change = (value - two_state["model"][key]).abs().max()
        assert change < 5e-3, key


def test_resolution_mismatch_with_shards_is_reported(shards, tmp_path):
    config = tiny_config(shards, tmp_path)
    config.data.resolution = 32
    with pytest.raises(ValueError, match="hold 16px images but --resolution is 32"):
        train(config)


def test_preview_grid_and_periodic_eval(shards, tmp_path):
    """--sample-every writes EMA grids; --eval-every logs metrics from the eval code path."""
    from repa.eval import metrics as eval_metrics

    reference = str(Path(shards))
    config = tiny_config(shards, tmp_path, max_train_steps=4, checkpointing_steps=4)
    config.run.sample_every, config.run.sample_steps = 2, 3
    config.run.eval_every, config.run.eval_ref, config.run.eval_num_samples = 2, reference, 8
    config.run.eval_metrics, config.run.eval_num_steps = "fd", 2
    features = torch.nn.Linear(3, 5)
    original = eval_metrics.Evaluator.__init__

    def with_features(self, metrics, **kwargs):  # the demo-style pluggable feature space
        kwargs["feature_fn"] = lambda images: features(images.float().mean(dim=(2, 3))).double()
        original(self, metrics, **kwargs)

    eval_metrics.Evaluator.__init__ = with_features
    try:
        result = train(config)
    finally:
        eval_metrics.Evaluator.__init__ = original
    assert sorted(p.name for p in (result.run_dir / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    evals = [r for r in read_metrics(result.run_dir) if "eval/fd" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval/fd"] >= 0 for r in evals)


def test_eval_every_needs_a_reference(shards, tmp_path):
    values = tiny_config(shards, tmp_path).to_dict()
    values["run"]["eval_every"] = 2
    with pytest.raises(ValueError, match="--eval-ref"):
        ExperimentConfig.from_dict(values)


def _train_command(
    shards, output_dir: Path, config_file: Path, steps: int, ranks: int, checkpointing_steps: int = 1000
) -> list[str]:
    """`repa train` with one loader worker per rank (the workers are what a group signal hits),
    under torchrun when ranks > 1."""
    config = tiny_config(shards, output_dir, max_train_steps=steps, checkpointing_steps=checkpointing_steps)
    config.data.num_workers = 1
    config_file.write_text(json.dumps(config.to_dict()))  # JSON is YAML
    train_args = ["-m", "repa", "train", "--config", str(config_file)]
    if ranks == 1:
        return [sys.executable, *train_args]
    port = str(29600 + int.from_bytes(os.urandom(1), "little"))
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", port, *train_args]  # fmt: skip


def _process_tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranks, signal_number, target",
    [
        (2, signal.SIGTERM, "launcher"),  # what a scheduler sends the job's main process
        (2, signal.SIGTERM, "every process"),  # scancel / Slurm pre-emption: each rank and worker
        (1, signal.SIGINT, "every process"),  # Ctrl-C in a terminal: the whole foreground group
    ],
)
def test_signal_saves_at_the_stop_step_and_resumes_bitwise(shards, tmp_path, ranks, signal_number, target):
    """Loader workers ignore the job's stop signals, so the rank that owns them stops at the end
    of a step, saves a checkpoint there and exits; resumed, the run ends bitwise equal to a
    straight run that checkpointed at the same step.

    (A checkpoint restarts the data stream from (seed, rank, batches consumed), so the straight
    run must have one at that step too: a resume continues a run exactly only from a step where
    that run saved.)"""
    import psutil

    steps = 150
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    command = _train_command(shards, tmp_path / "signalled", tmp_path / "signalled.yaml", steps, ranks)
    # a file, not a pipe that nobody reads while the run writes its progress bar into it
    log = open(tmp_path / "signalled.log", "wb")  # noqa: SIM115 - closed once every process is gone
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    run_dir = tmp_path / "signalled" / "run"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be signalled"
    tree = _process_tree(process.pid)
    assert len(tree) == (1 if ranks > 1 else 0) + 2 * ranks  # torchrun, the ranks, one worker each
    signalled_at = time.time()
    for member in tree if target == "every process" else tree[:1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal_number)
    gone, alive = psutil.wait_procs(tree, timeout=25)
    log.close()
    stderr = (tmp_path / "signalled.log").read_text(errors="replace")
    # psutil reaped the launcher, so its exit status is psutil's to report
    returncode = next(member.returncode for member in gone if member.pid == process.pid)
    assert not alive, f"still running 25 s after the signal: {alive}\n{stderr[-2000:]}"
    assert time.time() - signalled_at < 25
    assert "is killed by signal" not in stderr, stderr[-2000:]
    if ranks == 1:
        assert returncode == 128 + signal_number, stderr[-1500:]
    stopped_at = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert stopped_at is not None, f"no checkpoint at the stop step\n{stderr[-2000:]}"
    stop_step = int(stopped_at.name.split("-")[1])
    assert 5 <= stop_step < steps
    assert stop_step == max(record["step"] for record in read_metrics(run_dir))

    resumed = _train_command(
        shards, tmp_path / "signalled", tmp_path / "signalled.yaml", steps, ranks, stop_step
    )
    reference = _train_command(shards, tmp_path / "reference", tmp_path / "ref.yaml", steps, ranks, stop_step)
    for run in (resumed, reference):
        done = subprocess.run(run, **quiet)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert_states_equal(final_state(tmp_path / "reference" / "run"), final_state(run_dir))


def test_loader_workers_leave_stop_signals_to_the_rank():
    from repa.data.stream import _leave_stop_signals_to_the_rank

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        with mock.patch("ctypes.CDLL"):  # no parent-death signal on the test process itself
            _leave_stop_signals_to_the_rank(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # survived
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_full_disk_stops_with_one_message_and_the_rerun_resumes(shards, tmp_path, monkeypatch, capsys):
    import errno

    from repa.cli import main

    config = tiny_config(shards, tmp_path / "full")
    config_file = tmp_path / "full.yaml"
    config_file.write_text(json.dumps(config.to_dict()))
    real_save_file = ckpt.save_file

    def disk_full_at_step_8(obj, path):
        if path.name == "model.pt" and obj.get("step") == 8:
            real_save_file(obj, path)  # a partial write: the staging folder holds something
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(obj, path)

    monkeypatch.setattr(ckpt, "save_file", disk_full_at_step_8)
    assert main(["train", "--config", str(config_file)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if line.startswith("repa train: error:")]
    checkpoints = tmp_path / "full" / "run" / "checkpoints"
    assert "saving step 8" in error and "MiB are free" in error
    assert f"{checkpoints / 'step-00000004'}, is intact" in error and "rerun the same command" in error
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp")] == []  # space given back
    assert ckpt.latest_checkpoint(checkpoints).name == "step-00000004"

    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    assert main(["train", "--config", str(config_file)]) == 0  # resumes from step 4
    straight = train(tiny_config(shards, tmp_path / "straight"))
    assert_states_equal(final_state(straight.run_dir), final_state(tmp_path / "full" / "run"))


def test_low_disk_space_is_warned_about_once_before_a_save(shards, tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    train(tiny_config(shards, tmp_path))  # saves at steps 4, 8 and 12; the last two see 1000 bytes free
    warnings = [line for line in capsys.readouterr().err.splitlines() if "MiB free on the device" in line]
    assert len(warnings) == 1 and "a checkpoint takes about" in warnings[0]
