"""Ready for many nodes (issue 18): `--eval-every` spread over every rank, the process group's
timeout, the start-up check that every rank sees the run directory, and the size estimate of
`repa data build`. (Loader workers that leave a job's SIGTERM to their rank: tests/test_train.py,
`test_signal_saves_at_the_stop_step_and_resumes_bitwise`.)

Run as `python -m torch.distributed.run ... -m tests.test_multinode CONFIG OUT`, this module is
the program of each rank (`_rank_main`)."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.config import ExperimentConfig
from repa.train import checkpoint as ckpt
from repa.train.distributed import process_group_timeout
from repa.train.logging import read_metrics
from tests.test_train import RESOLUTION, encoder_file, shards, tiny_config  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
EVAL_SAMPLES = 12


class FakeInception:
    """An Inception-shaped feature space (pool, logits, spatial) from fixed random projections of
    the pixels, computed in float64 so a sample's features do not depend on its batch."""

    name = "fake-inception"
    provides = ("pool", "logits", "spatial")

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.randn(3 * RESOLUTION * RESOLUTION, 14, generator=generator, dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        projected = (images.double().flatten(1) / 255) @ self.weights  # (B, 14)
        return {"pool": projected[:, :8].float(), "logits": projected[:, 8:12].float(),
                "spatial": projected[:, 12:].float()}  # fmt: skip


@contextlib.contextmanager
def fake_inception_evaluators():
    """Every Evaluator built inside scores in FakeInception's space, with 2 IS splits, no cache."""
    from repa.eval import metrics as eval_metrics

    original = eval_metrics.Evaluator.__init__

    def init(self, metrics, **kwargs):
        kwargs.update(spaces={"inception": FakeInception()}, isc_splits=2, cache_dir=False)
        original(self, metrics, **kwargs)

    eval_metrics.Evaluator.__init__ = init
    try:
        yield
    finally:
        eval_metrics.Evaluator.__init__ = original


def _rank_main(config_file: str, out: str) -> None:
    """One rank: (1) a start with rank 1 looking at another directory, which every rank must
    refuse; (2) a training with --eval-every, counting the images this rank samples; (3) the
    final EMA model scored again with batches of 2, so that the ranks' chunks interleave."""
    from repa.eval import sample as eval_sample
    from repa.eval.curves import evaluate_model
    from repa.eval.metrics import Evaluator
    from repa.tokenizers import create_tokenizer
    from repa.train.distributed import SharedDirectoryError
    from repa.train.loop import _sampler_for, train

    rank = int(os.environ["RANK"])
    timeouts = []
    init_process_group = torch.distributed.init_process_group

    def recording_init(*args, **kwargs):
        timeouts.append(kwargs["timeout"].total_seconds())
        return init_process_group(*args, **kwargs)

    torch.distributed.init_process_group = recording_init
    values = json.loads(Path(config_file).read_text())
    blind = ExperimentConfig.from_dict(values)
    if rank == 1:
        blind.run.output_dir += "-elsewhere"  # not the directory rank 0 writes
    try:
        with fake_inception_evaluators():
            train(blind)
        refused = ""
    except SharedDirectoryError as error:
        refused = str(error)

    made = [0]
    generate_batch = eval_sample.generate_batch

    def counting(generator, labels, *args, **kwargs):
        made[0] += len(labels)
        return generate_batch(generator, labels, *args, **kwargs)

    eval_sample.generate_batch = counting
    config = ExperimentConfig.from_dict(values)
    with fake_inception_evaluators():
        result = train(config)
        made_in_training = made[0]
        evaluator = Evaluator(config.run.eval_metrics.split(","), device="cpu")
        interleaved = evaluate_model(
            result.ema_model, create_tokenizer("pixels", resolution=RESOLUTION), resolution=RESOLUTION,
            num_samples=EVAL_SAMPLES, ref=config.run.eval_ref if rank == 0 else None, evaluator=evaluator,
            settings=_sampler_for(config, config.run.eval_num_steps, config.run.eval_cfg_scale),
            seed=config.run.seed, batch_size=2, device="cpu", rank=rank, world_size=2,
        )  # fmt: skip
    record = {"timeouts": timeouts, "refused": refused, "made": made_in_training, "interleaved": interleaved}
    Path(f"{out}.rank{rank}").write_text(json.dumps(record))


def test_the_default_collective_timeout_outlasts_the_watchdog():
    run = tiny_config("unused", "unused").run
    assert process_group_timeout(run).total_seconds() == 3720  # 3600 s long phase + 120
    run.long_phase_timeout, run.step_timeout = 7200, 600
    assert process_group_timeout(run).total_seconds() == 7320
    run.step_timeout = run.long_phase_timeout = 0  # watchdog off: still far above NCCL's 10 min
    assert process_group_timeout(run).total_seconds() == 3720
    run.dist_timeout = 900
    assert process_group_timeout(run).total_seconds() == 900
    with pytest.raises(ValueError, match="--dist-timeout"):
        ExperimentConfig.from_dict({"run": {"dist_timeout": -1}})


def test_the_shares_of_the_ranks_make_the_one_process_set():
    """generate_share: `repa sample`'s chunk split, in memory; the union over ranks is the set one
    process makes, whatever the world size."""
    from repa.eval.sample import generate_images, generate_share
    from tests.test_eval_sample import FAST, tiny_generator

    generator = tiny_generator()
    whole = torch.cat(list(generate_images(generator, 11, FAST, seed=3, batch_size=4)))
    for world in (2, 3, 12):
        shares = [generate_share(generator, 11, FAST, seed=3, batch_size=2, rank=r, world_size=world)
                  for r in range(world)]  # fmt: skip
        indices = np.concatenate([share_indices for share_indices, _ in shares])
        assert sorted(indices.tolist()) == list(range(11))
        if world == 2:  # chunks of 2 alternate: rank 0 holds 0, 1, 4, 5, 8, 9
            assert shares[0][0].tolist() == [0, 1, 4, 5, 8, 9]
        if world == 12:
            assert len(shares[11][0]) == 0  # more ranks than samples: the last has none
        images = torch.cat([batch for _, batches in shares for batch in batches])
        assert torch.equal(images[np.argsort(indices)], whole)


@pytest.mark.slow
def test_two_ranks_share_eval_every_and_check_the_run_directory(shards, tmp_path):  # noqa: F811
    """torchrun, 2 CPU processes (gloo): a rank that does not see rank 0's run directory stops
    every rank at start-up naming the shared-filesystem requirement; --eval-every samples on both
    ranks and logs the score one process gives the same EMA weights and seed; --dist-timeout
    reaches init_process_group."""
    from repa.eval.checkpoints import load_generator
    from repa.eval.curves import evaluate_generator
    from repa.eval.metrics import Evaluator
    from repa.train.loop import _sampler_for

    config = tiny_config(shards, tmp_path / "runs", max_train_steps=2, checkpointing_steps=2)
    config.run.eval_every, config.run.eval_ref, config.run.eval_metrics = 2, shards, "fid,is,prc"
    config.run.eval_num_samples, config.run.eval_num_steps, config.run.dist_timeout = EVAL_SAMPLES, 2, 4321
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    port = str(29700 + int.from_bytes(os.urandom(1), "little"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", port, "-m", "tests.test_multinode", str(tmp_path / "config.json"),
               str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.rank{rank}").read_text()) for rank in (0, 1)]

    for record in ranks:  # every rank stopped, with the same message
        assert record["timeouts"] == [4321.0]
        assert "1 of 2 ranks do not see the run directory" in record["refused"]
        assert "rank 1 on" in record["refused"] and "-elsewhere" in record["refused"]
        assert "one file system shared by all nodes" in record["refused"]
    assert not list((tmp_path / "runs" / "run").glob(".shared-fs-check-*"))  # the marker is removed

    assert [record["made"] for record in ranks] == [EVAL_SAMPLES // 2] * 2  # both ranks sampled
    run_dir = tmp_path / "runs" / "run"
    logged = [record for record in read_metrics(run_dir) if "eval/fid" in record]
    assert [record["step"] for record in logged] == [2] and logged[0]["eval/num_samples"] == EVAL_SAMPLES

    # One process, the same EMA weights (the step-2 checkpoint) and seed: the same scores.
    generator = load_generator(run_dir, checkpoint_step=2, device="cpu")
    with fake_inception_evaluators():
        evaluator = Evaluator(config.run.eval_metrics.split(","), device="cpu")
        alone = evaluate_generator(
            generator, evaluator, shards, num_samples=EVAL_SAMPLES, seed=config.run.seed, device="cpu",
            settings=_sampler_for(config, config.run.eval_num_steps, config.run.eval_cfg_scale),
        )  # fmt: skip
    assert alone["num_samples"] == EVAL_SAMPLES
    for name, value in alone.items():
        assert logged[0][f"eval/{name}"] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        for record in ranks:  # interleaved chunks, scores on every rank
            assert record["interleaved"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-00000002"


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_cleanly(shards, tmp_path):  # noqa: F811
    """A scheduler's SIGTERM to the whole process group of `repa train` with a loader worker: the
    worker ignores it, the main process saves a checkpoint at the step it stopped and exits 143,
    and no loader error is raised."""
    import signal
    import time

    import psutil

    from tests.test_train import _train_command

    command = _train_command(shards, tmp_path / "runs", tmp_path / "config.yaml", steps=200, ranks=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.log", "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
        run_dir = tmp_path / "runs" / "run"
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be signalled"
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 1  # the loader worker, in the same process group
        assert os.getpgid(workers[0].pid) == os.getpgid(process.pid) == process.pid
        os.killpg(process.pid, signal.SIGTERM)
        returncode = process.wait(timeout=60)
    stderr = (tmp_path / "stderr.log").read_text(errors="replace")
    assert returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "is killed by signal" not in stderr, stderr[-2000:]
    stopped_at = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert stopped_at is not None and (stopped_at / "COMPLETE.json").is_file()
    assert int(stopped_at.name.split("-")[1]) == max(record["step"] for record in read_metrics(run_dir))
    assert not psutil.pid_exists(workers[0].pid) or workers[0].status() == psutil.STATUS_ZOMBIE


def _written_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _printed_total(text: str) -> float:
    value, unit = re.search(r"^  total\s+([\d.]+) (B|KiB|MiB|GiB)$", text, re.M).groups()
    return float(value) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(unit)


def test_data_build_size_estimate_and_refusal(encoder_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    """`repa data build` prints its size per component before building (within 10% of what it
    writes) and refuses a build that does not fit, unless --ignore-disk-space."""
    from repa.cli import main
    from repa.data import estimate

    assert main(["data", "synthetic", str(tmp_path / "img"), "--num-images", "40", "--resolution", "32",
                 "--num-classes", "4"]) == 0  # fmt: skip
    build = ["data", "build", str(tmp_path / "img"), "--resolution", str(RESOLUTION), "--shard-size", "8",
             "--workers", "0", "--cache-features", encoder_file, "--cache-flipped-features"]  # fmt: skip
    capsys.readouterr()

    disk_usage = estimate.shutil.disk_usage
    with monkeypatch.context() as patch:  # a device with 20,000 bytes free
        patch.setattr(estimate.shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=20_000))
        assert main([*build[:3], str(tmp_path / "small"), *build[3:]]) == 2
        refusal = capsys.readouterr().err
        assert "19.5 KiB free" in refusal and "--ignore-disk-space" in refusal
        assert not list((tmp_path / "small").glob("*.tar"))  # refused before writing anything
        assert main([*build[:3], str(tmp_path / "small"), *build[3:], "--ignore-disk-space"]) == 0

    assert main([*build[:3], str(tmp_path / "out"), *build[3:]]) == 0
    output = capsys.readouterr().out
    assert re.search(r"features .* float16 16x24, and of the mirror", output)  # (T, D) of the tiny ViT
    assert "images (PNG, label, key)" in output
    total, written = _printed_total(output), _written_bytes(tmp_path / "out")
    assert abs(total - written) <= 0.1 * written, (total, written, output)
    print(f"estimated {total:.0f} bytes, wrote {written}")
    assert output.index("estimated output") < output.index("samples ->")  # printed before building


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
