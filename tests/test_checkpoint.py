"""Atomic checkpoints: completeness marker, pointer, retention, kill during save, RNG round trip;
the layout module both training and evaluation read, and the atomic-write helper."""

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from repa import runs
from repa.train import checkpoint as ckpt
from repa.utils.files import atomic_path, stale_temporaries, temporary_path, write_bytes_atomic


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


# ---- the layout, shared with evaluation ----------------------------------------------------------


def _fresh_modules(statement: str) -> set[str]:
    """Module names loaded by `statement` in a new interpreter (this one has imported everything)."""
    script = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(output.stdout.split())


def test_eval_does_not_import_train_and_the_layout_does_not_import_torch():
    loaded = _fresh_modules("import repa.eval")
    assert "repa.runs" in loaded
    assert sorted(name for name in loaded if name.startswith("repa.train")) == []
    assert "torch" not in _fresh_modules("import repa.runs")


def test_training_and_evaluation_share_one_layout(tmp_path):
    from repa.eval import checkpoints, curves

    for name in ("COMPLETE", "checkpoint_name", "is_complete", "list_checkpoints", "latest_checkpoint"):
        assert getattr(ckpt, name) is getattr(runs, name)
    assert checkpoints.list_checkpoints is runs.list_checkpoints
    assert curves.checkpoint_name is runs.checkpoint_name
    final = _save(tmp_path, 7, torch.zeros(1))
    assert runs.parse_checkpoint_name(final.name) == 7 and runs.parse_checkpoint_name("latest") is None
    assert ckpt.staging_dir(tmp_path, 7).name.startswith(runs.STAGING_PREFIX)


# ---- atomic writes -------------------------------------------------------------------------------


def test_atomic_write_replaces_the_target_only_when_the_writer_succeeds(tmp_path):
    target = tmp_path / "record.json"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temporary left behind
    with atomic_path(target, durable=False) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)  # writers that need a path
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_files_are_renamed_into_place_only_by_the_shared_helper():
    """One atomic-write protocol: a module renaming its own temporary file would bypass it (the
    checkpoint save renames a whole staging folder, which is its protocol)."""
    package = Path(runs.__file__).parent
    renaming = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "os.replace(" in path.read_text() or ".rename(" in path.read_text()
    )
    assert renaming == ["train/checkpoint.py", "utils/files.py"]


def test_stale_temporaries_are_the_names_the_writer_uses(tmp_path):
    target = tmp_path / "train-000001.tar"
    temporary_path(target).write_bytes(b"partial")  # as a killed writer leaves it
    (tmp_path / f".{target.name}.tmp-99999").write_bytes(b"partial")  # another process's
    (tmp_path / ".train-000010.tar.tmp-1").write_bytes(b"another file's")
    assert stale_temporaries(target) == sorted(
        [temporary_path(target), tmp_path / f".{target.name}.tmp-99999"]
    )
    assert not list(tmp_path.glob("*.tar"))  # readers listing by suffix never see a temporary
