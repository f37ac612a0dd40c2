"""Checked checkpoints (issue 21, part 4): COMPLETE.json records a BLAKE2b-256 checksum of every
file, hashed while it is written; resume verifies the checkpoint it picks, names a damaged file,
falls back to the previous intact checkpoint and still ends bitwise equal to a straight run, or
stops with an error naming what it checked; `repa sample` and curves refuse a damaged
ema.safetensors, naming it."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repa import runs
from repa.train import checkpoint as ckpt
from repa.utils.files import CHECKSUM, HashingWriter, file_checksum
from tests.test_eval_sample import write_fake_run
from tests.test_train import assert_states_equal, final_state, shards, tiny_config  # noqa: F401 (fixture)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Bit rot: invert one byte (default: the middle one) of a file in place."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _save(directory, step, payload):
    staging = ckpt.begin_save(directory, step, True, lambda: None)
    digests = {"model.pt": ckpt.save_file({"step": step, "payload": payload}, staging / "model.pt")}
    digests["ema.safetensors"] = ckpt.save_safetensors(
        {"w": payload}, staging / "ema.safetensors", {"k": "v"}
    )
    torch.save({"rank": 1}, staging / "rng-rank1.pt")  # as another rank writes it: hashed at commit
    return ckpt.commit_save(directory, step, 1, True, lambda: None, checksums=digests)


# ---- the record ----------------------------------------------------------------------------------


def test_checksums_are_hashed_while_writing_and_match_b2sum(tmp_path):
    with HashingWriter(tmp_path / "x.pt") as out:
        torch.save({"a": torch.arange(1000.0)}, out)
    assert out.hexdigest() == file_checksum(tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["a"], torch.arange(1000.0))

    final = _save(tmp_path, 4, torch.arange(10.0))
    record = runs.read_record(final)
    assert record["checksum"] == CHECKSUM == "blake2b-256"
    assert sorted(record["checksums"]) == record["files"] == ["ema.safetensors", "model.pt", "rng-rank1.pt"]
    for name, digest in record["checksums"].items():
        assert digest == file_checksum(final / name)
        b2sum = subprocess.run(["b2sum", "-l", "256", str(final / name)], capture_output=True, text=True)
        if b2sum.returncode == 0:  # coreutils' b2sum checks the same digest by hand
            assert b2sum.stdout.split()[0] == digest
    assert torch.equal(load_file(final / "ema.safetensors")["w"], torch.arange(10.0))
    assert ckpt.checkpoint_damage(final) == []


def test_a_save_reads_nothing_back(tmp_path, monkeypatch):
    """The files the main process writes are hashed as written: commit never hashes them again."""
    hashed = []
    real = ckpt.file_checksum
    monkeypatch.setattr(ckpt, "file_checksum", lambda path: hashed.append(Path(path).name) or real(path))
    _save(tmp_path, 4, torch.zeros(3))
    assert hashed == ["rng-rank1.pt"]  # only the file another rank wrote


def test_damage_and_missing_files_are_named(tmp_path):
    final = _save(tmp_path, 4, torch.arange(100.0))
    flip_byte(final / "model.pt")
    (final / "rng-rank1.pt").unlink()
    problems = ckpt.checkpoint_damage(final)
    assert len(problems) == 2
    assert problems[0].startswith("model.pt does not match its checksum in COMPLETE.json")
    assert problems[1] == "rng-rank1.pt is missing (COMPLETE.json lists it)"
    assert ckpt.checkpoint_damage(final, ["ema.safetensors"]) == []  # what a reader opens
    # a checkpoint named explicitly is never swapped for another
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"cannot resume from .*step-00000004.*model\.pt"):
        ckpt.resolve_resume("step:4", tmp_path)
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"step-00000004 is damaged: model\.pt does not"):
        runs.verify_checkpoint_file(final / "model.pt")
    runs.verify_checkpoint_file(final / "ema.safetensors")  # intact
    runs.verify_checkpoint_file(tmp_path / "elsewhere.pt")  # not in a checkpoint: nothing to check


def test_checkpoints_without_checksums_are_accepted_with_a_note(tmp_path, capsys):
    final = _save(tmp_path, 4, torch.zeros(3))
    record = runs.read_record(final)
    del record["checksums"], record["checksum"]  # as repa wrote COMPLETE.json before checksums
    (final / "COMPLETE.json").write_text(json.dumps(record))
    flip_byte(final / "model.pt")  # undetectable without a record
    assert ckpt.resolve_resume("auto", tmp_path) == final
    (note,) = capsys.readouterr().err.splitlines()  # one note, and no refusal
    assert note.startswith(f"note: resuming from {final}") and "not verified" in note


# ---- resume: fall back, or stop ------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):  # noqa: F811
    """The reference: 12 steps without interruption."""
    from repa.train.loop import train

    return final_state(train(tiny_config(shards, tmp_path_factory.mktemp("straight"))).run_dir)


@pytest.mark.parametrize("damaged", ["model.pt", "ema.safetensors"])
def test_a_flipped_byte_falls_back_bitwise(shards, straight_run, tmp_path, capsys, damaged):  # noqa: F811
    from repa.train.loop import train

    train(tiny_config(shards, tmp_path, max_train_steps=8))  # checkpoints 4 and 8 (2 kept)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in ckpt.list_checkpoints(checkpoints)] == [4, 8]
    flip_byte(checkpoints / "step-00000008" / damaged)
    capsys.readouterr()

    resumed = train(tiny_config(shards, tmp_path))
    err = capsys.readouterr().err
    (skipped,) = [line for line in err.splitlines() if "damaged checkpoint" in line]
    assert str(checkpoints / "step-00000008") in skipped
    assert f"{damaged} does not match its checksum in COMPLETE.json" in skipped
    assert f"resuming from {checkpoints / 'step-00000004'} instead" in err
    assert resumed.step == 12
    assert_states_equal(straight_run, final_state(resumed.run_dir))
    assert ckpt.checkpoint_damage(checkpoints / "step-00000008") == []  # saved again, intact


def test_resume_stops_with_a_clear_error_when_no_checkpoint_is_intact(shards, tmp_path, capsys):  # noqa: F811
    from repa.cli import main
    from repa.train.loop import train

    config = tiny_config(shards, tmp_path, max_train_steps=8)
    train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    flip_byte(checkpoints / "step-00000004" / "ema.safetensors")
    flip_byte(checkpoints / "step-00000008" / "model.pt")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(tiny_config(shards, tmp_path).to_dict()))
    capsys.readouterr()

    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (error,) = [line for line in err.splitlines() if line.startswith("repa train: error:")]
    assert f"no intact checkpoint to resume from in {checkpoints}; checked 2" in error
    assert "step-00000008: model.pt does not match" in error
    assert "step-00000004: ema.safetensors does not match" in error
    assert [step for step, _ in ckpt.list_checkpoints(checkpoints)] == [4, 8]  # nothing overwritten


# ---- readers: sample, curves ---------------------------------------------------------------------


def _fake_run_with_checksums(run_dir: Path, steps=(100, 200)) -> Path:
    """write_fake_run's checkpoints, with the checksums training records."""
    write_fake_run(run_dir, steps=steps)
    for _, folder in runs.list_checkpoints(run_dir / "checkpoints"):
        record = runs.read_record(folder)
        record["checksum"] = CHECKSUM
        record["checksums"] = {"ema.safetensors": file_checksum(folder / "ema.safetensors")}
        (folder / "COMPLETE.json").write_text(json.dumps(record))
    return run_dir


def test_sample_refuses_a_damaged_ema_naming_the_file(tmp_path, capsys):
    from repa.cli import main
    from repa.eval.checkpoints import load_generator

    run = _fake_run_with_checksums(tmp_path / "run")
    assert load_generator(run).step == 200  # intact: loads
    newest = run / "checkpoints" / "step-00000200"
    flip_byte(newest / "ema.safetensors")
    for source in (run, newest, newest / "ema.safetensors"):  # no silent fall-back to step 100
        with pytest.raises(ckpt.DamagedCheckpointError, match=r"step-00000200 is damaged: ema\.safetensors"):
            load_generator(source)
    assert load_generator(run, checkpoint_step=100).step == 100  # another one, asked for explicitly

    out = tmp_path / "samples.npz"
    assert main(["sample", str(run), "--num-samples", "4", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    (error,) = [line for line in err.splitlines() if line.startswith("repa sample: error:")]
    assert f"checkpoint {newest} is damaged: ema.safetensors does not match its checksum" in error


def test_a_tokenizer_file_from_a_checkpoint_is_verified_too(tmp_path):
    """REPA-E's exported VAE, passed as --tokenizer-weights from a checkpoint, is checked as well."""
    from repa.eval.checkpoints import load_generator

    run = _fake_run_with_checksums(tmp_path / "run", steps=(100,))
    folder = run / "checkpoints" / "step-00000100"
    torch.save({"decoder.w": torch.arange(64.0)}, folder / "e2e-vae.pt")
    record = runs.read_record(folder)
    record["checksums"]["e2e-vae.pt"] = file_checksum(folder / "e2e-vae.pt")
    (folder / "COMPLETE.json").write_text(json.dumps(record))
    flip_byte(folder / "e2e-vae.pt")
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"step-00000100 is damaged: e2e-vae\.pt does not"):
        load_generator(run, tokenizer_weights=str(folder / "e2e-vae.pt"))


def test_curves_stop_at_a_damaged_checkpoint_naming_it(tmp_path):
    from repa.eval.curves import build_curves
    from repa.eval.metrics import Evaluator
    from repa.eval.npz import write_npz_streaming
    from repa.eval.sample import SamplerSettings

    run = _fake_run_with_checksums(tmp_path / "run")
    flip_byte(run / "checkpoints" / "step-00000100" / "ema.safetensors")
    reference = tmp_path / "ref.npz"
    real = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    write_npz_streaming(reference, real.shape, [real])
    evaluator = Evaluator(
        ["fd"], feature_fn=lambda x: x.float().mean(dim=(2, 3)), feature_name="m3", cache_dir=tmp_path / "c"
    )
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"step-00000100 is damaged: ema\.safetensors"):
        build_curves(
            [run],
            tmp_path / "out",
            ref=reference,
            evaluator=evaluator,
            num_samples=4,
            settings=SamplerSettings(mode="ode", num_steps=2),
            batch_size=4,
            progress=False,
        )
