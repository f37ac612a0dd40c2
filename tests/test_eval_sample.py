"""repa.eval.sample / checkpoints: per-sample seeds and labels, world- and batch-size independence,
the ADM .npz layout and rounding, resumable chunks, loading runs and published checkpoints.

Tiny SiT (hidden 32, depth 2, patch 2) on 8x8 RGB with the `pixels` tokenizer; a few ODE steps.
The helpers `tiny_model` and `write_fake_run` are reused by test_eval_curves.py.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from repa.config import ExperimentConfig
from repa.eval.checkpoints import Generator, infer_architecture, load_generator, resolve_checkpoint
from repa.eval.sample import (
    SamplerSettings,
    class_labels,
    generate_batch,
    generate_images,
    merge_chunks,
    pending_chunks,
    sample_chunks,
    sample_seed,
    sample_to_npz,
)
from repa.models import create_model
from repa.tokenizers import create_tokenizer

TINY = dict(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4)
FAST = SamplerSettings(mode="ode", method="euler", num_steps=3, cfg_scale=1.5, guidance_high=0.7)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, projector_dims=(), scale: float = 0.05):
    """A tiny SiT with small random weights everywhere (the zero-initialised output layer would
    make every sample equal to its noise)."""
    torch.manual_seed(seed)
    model = create_model("SiT-S/2", **TINY, projector_out_dims=list(projector_dims), align_depth=1)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, scale)
    return model.eval()


def tiny_generator(seed: int = 0) -> Generator:
    return Generator(tiny_model(seed), create_tokenizer("pixels", resolution=8), 8, "linear")


def tiny_config(encoder: str = "none", batch_size: int = 16) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "model": {
                "name": "SiT-S/2",
                "hidden_size": 32,
                "depth": 2,
                "num_heads": 2,
                "num_classes": 4,
                "align_depth": 1,
            },
            "data": {"resolution": 8, "batch_size": batch_size},
            "tokenizer": {"tokenizer": "pixels"},
            "encoder": {"encoder": encoder},
        }
    )


def write_fake_run(
    run_dir: Path,
    steps=(100, 200),
    encoder: str = "none",
    batch_size: int = 16,
    start_time: float = 1e9,
    log_time: bool = False,
) -> Path:
    """A run directory as training writes it: config.yaml, metrics.jsonl, committed checkpoints
    (COMPLETE.json + ema.safetensors with the config in its metadata), one incomplete folder.
    Checkpoint k (from 1) is committed at start_time + k * 1800 s; with `log_time` the metrics
    records carry a wall-clock "time" starting at start_time."""
    import yaml

    config = tiny_config(encoder, batch_size)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step in range(10, max(steps) + 1, 10):
            record = {"step": step, "loss": 1.0 / step, "samples_seen": step * batch_size}
            if log_time:
                record["time"] = start_time + step
            handle.write(json.dumps(record) + "\n")
    projector_dims = (16,) if encoder != "none" else ()
    for index, step in enumerate(steps):
        folder = run_dir / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        # Later checkpoints: smaller weights, so runs and steps give different samples.
        state = tiny_model(seed=step, projector_dims=projector_dims, scale=0.05 / (index + 1)).state_dict()
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, folder / "ema.safetensors", metadata={"config": json.dumps(config.to_dict())})
        record = {"step": step, "world_size": 1, "time": start_time + 1800 * (index + 1), "files": []}
        (folder / "COMPLETE.json").write_text(json.dumps(record))
    (run_dir / "checkpoints" / f"step-{max(steps) + 100:08d}").mkdir()  # a save that never committed
    return run_dir


# ---- labels and seeds ----------------------------------------------------------------------------


def test_balanced_labels_hold_every_class_once_per_block():
    labels = class_labels(40, 4, seed=3)
    assert labels.dtype == np.int64 and labels.shape == (40,)
    for block in labels.reshape(10, 4):
        assert sorted(block) == [0, 1, 2, 3]
    assert np.array_equal(class_labels(12, 4, seed=3), labels[:12])  # prefix-stable
    assert not np.array_equal(class_labels(40, 4, seed=4), labels)  # seeded
    assert np.bincount(class_labels(50_000, 1000, seed=0), minlength=1000).tolist() == [50] * 1000
    random_labels = class_labels(1000, 4, seed=3, scheme="random")
    assert random_labels.min() == 0 and random_labels.max() == 3
    with pytest.raises(ValueError, match="balanced, random"):
        class_labels(4, 4, 0, scheme="uniform")


def test_sample_seeds_are_deterministic_and_distinct():
    seeds = [sample_seed(0, i) for i in range(1000)] + [sample_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(7, 5) == sample_seed(7, 5)


# ---- the sample set ------------------------------------------------------------------------------


def _sample_set(tmp_path: Path, name: str, world_size: int, batch_size: int, num_samples=10, chunk=3):
    """Simulate `world_size` processes in this one: each runs its share, then rank 0 merges."""
    generator = tiny_generator()
    parts = tmp_path / f"{name}.parts"
    parts.mkdir()
    pending = pending_chunks(parts, num_samples, chunk)
    for rank in range(world_size):
        sample_chunks(
            generator,
            parts,
            num_samples=num_samples,
            settings=FAST,
            batch_size=batch_size,
            chunk_size=chunk,
            rank=rank,
            world_size=world_size,
            pending=pending,
        )
    output = merge_chunks(parts, tmp_path / f"{name}.npz", num_samples, chunk)
    with np.load(output) as data:
        return data["arr_0"], data["labels"]


def test_sample_set_independent_of_world_size_and_batch_size(tmp_path):
    reference, labels = _sample_set(tmp_path, "w1-b8", world_size=1, batch_size=8)
    assert reference.std() > 10  # not a constant image
    assert np.array_equal(labels, class_labels(10, 4, seed=0))
    for world_size, batch_size in [(2, 3), (3, 1), (1, 1)]:
        images, other_labels = _sample_set(tmp_path, f"w{world_size}-b{batch_size}", world_size, batch_size)
        assert np.array_equal(images, reference), (world_size, batch_size)
        assert np.array_equal(other_labels, labels)
    # Guidance makes a difference (the CFG branch is exercised), and the in-memory stream agrees.
    streamed = torch.cat(list(generate_images(tiny_generator(), 10, FAST, batch_size=4)))
    assert np.array_equal(streamed.permute(0, 2, 3, 1).numpy(), reference)


def test_npz_layout_nhwc_uint8_and_rounding(tmp_path):
    generator = tiny_generator()
    output = sample_to_npz(
        generator, tmp_path / "s.npz", num_samples=5, settings=FAST, batch_size=2, chunk_size=2
    )
    with np.load(output) as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        images = data["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert not (tmp_path / "s.npz.parts").exists()  # merged, then cleaned up
    # NHWC of exactly what the decoder returns (NCHW) for sample 3
    labels = torch.from_numpy(class_labels(5, 4, 0))
    direct = generate_batch(generator, labels[3:4], [sample_seed(0, 3)], FAST)
    assert np.array_equal(images[3], direct[0].permute(1, 2, 0).numpy())
    # Rounding, not truncation: latents mapping to 10.6 and 200.4 give 11 and 200.
    latents = torch.full((1, 3, 8, 8), 10.6 / 127.5 - 1.0)
    latents[0, 1] = 200.4 / 127.5 - 1.0
    decoded = generator.decode(latents)
    assert decoded.dtype == torch.uint8
    assert decoded[0, 0, 0, 0].item() == 11 and decoded[0, 1, 0, 0].item() == 200
    # Rerunning with the same settings leaves the finished file alone; other settings are refused.
    assert (
        sample_to_npz(generator, output, num_samples=5, settings=FAST, batch_size=2, chunk_size=2) == output
    )
    with pytest.raises(FileExistsError):
        sample_to_npz(generator, output, num_samples=6, settings=FAST, batch_size=2, chunk_size=2)


def test_a_failed_npz_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from repa.eval.npz import write_npz_streaming

    images = np.zeros((4, 2, 2, 3), np.uint8)
    path = write_npz_streaming(tmp_path / "set.npz", images.shape, [images])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="wrote 2 rows, expected 4"):
        write_npz_streaming(path, images.shape, [np.ones((2, 2, 2, 3), np.uint8)])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["set.npz"]


def test_interrupted_sampling_resumes_without_duplicates(tmp_path):
    generator = tiny_generator()
    options = dict(num_samples=11, settings=FAST, chunk_size=3)
    reference = sample_to_npz(generator, tmp_path / "ref.npz", batch_size=4, **options)

    class Interrupted(Exception):
        pass

    done: list[int] = []

    def interrupt_after_two(chunk):
        done.append(chunk)
        if len(done) == 2:
            raise Interrupted

    output = tmp_path / "out.npz"
    with pytest.raises(Interrupted):
        sample_to_npz(generator, output, batch_size=4, on_chunk=interrupt_after_two, **options)
    parts = tmp_path / "out.npz.parts"
    assert not output.exists()
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]
    assert not list(parts.glob(".*tmp*"))  # chunk files appear atomically

    with pytest.raises(ValueError, match="other settings"):  # resuming with other settings is refused
        sample_to_npz(
            generator, output, batch_size=4, num_samples=11, settings=SamplerSettings(), chunk_size=3
        )

    resumed: list[int] = []
    sample_to_npz(generator, output, batch_size=1, on_chunk=resumed.append, keep_parts=True, **options)
    assert resumed == [2, 3]  # only the missing chunks were sampled
    with np.load(output) as data, np.load(reference) as ref:
        assert data["arr_0"].shape == (11, 8, 8, 3)
        assert np.array_equal(data["arr_0"], ref["arr_0"])
        assert np.array_equal(data["labels"], ref["labels"])


def test_repa_e_models_decode_through_their_batchnorm_statistics():
    """REPA-E: samples live in BatchNorm-normalised latent space; decoding undoes the EMA
    running statistics and skips the tokenizer's own normalisation."""
    model = create_model("SiT-S/2", **TINY, latent_batchnorm=True).eval()
    model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model.bn.running_var.copy_(torch.tensor([0.25, 0.5, 0.1]))
    generator = Generator(model, create_tokenizer("pixels", resolution=8), 8, "linear")
    latents = torch.randn(2, 3, 8, 8) * 0.5
    std = torch.sqrt(model.bn.running_var + model.bn.eps).view(1, 3, 1, 1)
    expected = ((latents * std + model.bn.running_mean.view(1, 3, 1, 1) + 1) * 127.5).round().clamp(0, 255)
    assert torch.equal(generator.decode(latents), expected.to(torch.uint8))


def test_bf16_sampling_gives_images_close_to_fp32():
    generator = tiny_generator()
    labels, seeds = torch.tensor([0, 1]), [sample_seed(0, 0), sample_seed(0, 1)]
    full = generate_batch(generator, labels, seeds, FAST)
    half = generate_batch(
        generator, labels, seeds, SamplerSettings(**{**FAST.to_dict(), "precision": "bf16"})
    )
    assert half.dtype == torch.uint8 and half.shape == full.shape
    assert (half.int() - full.int()).abs().float().mean() < 8


# ---- checkpoints ---------------------------------------------------------------------------------


def test_load_generator_from_run_checkpoint_and_step(tmp_path):
    run = write_fake_run(tmp_path / "run", steps=(100, 200))
    weights, step = resolve_checkpoint(run)
    assert step == 200 and weights.parent.name == "step-00000200"  # step-300 never committed
    generator = load_generator(run, checkpoint_step=100)
    assert generator.step == 100 and generator.resolution == 8 and generator.num_classes == 4
    expected = tiny_model(seed=100, scale=0.05)
    for key, value in expected.state_dict().items():
        assert torch.equal(generator.model.state_dict()[key], value), key
    assert load_generator(run / "checkpoints" / "step-00000200").step == 200
    with pytest.raises(FileNotFoundError, match="complete steps: 100, 200"):
        load_generator(run, checkpoint_step=300)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_generator(run / "checkpoints" / "step-00000300")


def test_load_published_style_checkpoint_without_config(tmp_path):
    model = tiny_model(seed=5, projector_dims=(16,))
    path = tmp_path / "last.pt"
    # REPA's layout: {"model", "ema", "opt", "args"} with args an argparse Namespace.
    torch.save({"model": {}, "ema": model.state_dict(), "opt": {}, "args": argparse.Namespace(a=1)}, path)
    architecture = infer_architecture(model.state_dict())
    assert architecture["num_classes"] == 4 and architecture["patch_size"] == 2
    assert architecture["input_size"] == 8 and architecture["projector_out_dims"] == [16]
    with pytest.raises(ValueError, match="--tokenizer"):
        load_generator(path)
    with pytest.raises(ValueError, match="--model"):  # hidden 32 / depth 2 is no registered size
        load_generator(path, tokenizer="pixels")
    generator = load_generator(path, tokenizer="pixels", model="SiT-S/2", num_heads=2)
    assert generator.resolution == 8 and generator.step is None
    labels = torch.tensor([1])
    assert torch.equal(
        generate_batch(generator, labels, [3], FAST),
        generate_batch(Generator(model, generator.tokenizer, 8, "linear"), labels, [3], FAST),
    )


def test_cli_sample_writes_npz_and_grid(tmp_path):
    from repa.cli import main

    run = write_fake_run(tmp_path / "run")
    output, grid = tmp_path / "samples.npz", tmp_path / "grid.png"
    start = time.perf_counter()
    argv = ["sample", str(run), "--num-samples", "6", "--mode", "ode", "--num-steps", "2"]
    argv += ["--batch-size", "4", "--output", str(output), "--grid", str(grid), "--seed", "1"]
    assert main(argv) == 0
    assert time.perf_counter() - start < 30
    with np.load(output) as data:
        assert data["arr_0"].shape == (6, 8, 8, 3)
        assert np.array_equal(data["labels"], class_labels(6, 4, seed=1))
    assert grid.is_file()
    record = json.loads(Path(f"{output}.json").read_text())
    assert record["sampling"]["step"] == 200 and record["sampling"]["settings"]["num_steps"] == 2


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_set(tmp_path):
    """The real launcher: 2 CPU processes (gloo) write the same file as 1 process."""
    import os
    import subprocess
    import sys

    run = write_fake_run(tmp_path / "run")
    common = ["sample", str(run), "--num-samples", "13", "--num-steps", "4", "--chunk-size", "3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "repa"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.npz"
    subprocess.run(torchrun + common + ["--batch-size", "4", "--output", str(two)], check=True, env=env)
    from repa.cli import main

    one = tmp_path / "one.npz"
    assert main(common + ["--batch-size", "5", "--output", str(one)]) == 0
    with np.load(two) as a, np.load(one) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert json.loads(Path(f"{two}.json").read_text())["world_size"] == 2
