"""Atomic checkpoints: completeness marker, pointer, retention, kill during save, RNG round trip."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from repa.train import checkpoint as ckpt


def _save(directory, step, payload, keep_last=2, keep_every=0):
    staging = ckpt.begin_save(directory, step, True, lambda: None)
    ckpt.save_file({"step": step, "payload": payload}, staging / "model.pt")
    return ckpt.commit_save(
        directory, step, 1, True, lambda: None, keep_last=keep_last, keep_every=keep_every
    )


def test_commit_marks_complete_and_moves_latest(tmp_path):
    final = _save(tmp_path, 10, torch.ones(3))
    assert final.name == "step-00000010" and ckpt.is_complete(final)
    assert (tmp_path / "latest").read_text() == "step-00000010"
    assert ckpt.load_file(final / "model.pt")["step"] == 10  # weights_only loading works
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_folders_are_ignored(tmp_path):
    _save(tmp_path, 10, torch.ones(1))
    (tmp_path / "step-00000020").mkdir()  # e.g. copied by hand, or a foreign tool's half-write
    (tmp_path / ".tmp-step-00000030").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-00000010"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint.*step-00000010"):
        ckpt.resolve_resume(str(tmp_path / "step-00000020"), tmp_path)
    ckpt.remove_stale_staging(tmp_path)
    assert not (tmp_path / ".tmp-step-00000030").exists()


def test_retention_keeps_newest_two_and_multiples(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, torch.zeros(1), keep_last=2, keep_every=20)
    steps = [step for step, _ in ckpt.list_checkpoints(tmp_path)]
    assert steps == [20, 40, 50]


def test_keep_last_is_never_below_two(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, torch.zeros(1), keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]


def test_resume_modes(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None
    assert ckpt.resolve_resume("none", tmp_path) is None
    _save(tmp_path, 5, torch.zeros(1))
    assert ckpt.resolve_resume("step:5", tmp_path).name == "step-00000005"
    with pytest.raises(FileNotFoundError, match="step-00000005"):
        ckpt.resolve_resume("step:6", tmp_path)


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A process writing a large checkpoint is SIGKILLed mid-write; the previous one survives."""
    _save(tmp_path, 10, torch.arange(5.0))
    script = textwrap.dedent(
        f"""
        import torch, sys
        from repa.train import checkpoint as ckpt
        staging = ckpt.begin_save(__import__("pathlib").Path({str(tmp_path)!r}), 20, True, lambda: None)
        print("writing", flush=True)
        with open(staging / "model.pt", "wb") as handle:
            while True:  # an endless write, killed from outside
                handle.write(b"x" * (1 << 20))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    while not (tmp_path / ".tmp-step-00000020" / "model.pt").exists() or os.path.getsize(
        tmp_path / ".tmp-step-00000020" / "model.pt"
    ) < (4 << 20):
        pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    latest = ckpt.resolve_resume("auto", tmp_path)
    assert latest.name == "step-00000010"
    assert torch.equal(ckpt.load_file(latest / "model.pt")["payload"], torch.arange(5.0))


def test_rng_state_round_trip():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    ckpt.restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
