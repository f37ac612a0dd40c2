"""The run directory's checkpoint layout: names, the completeness marker, listing and resume.

Training writes this layout (repa.train.checkpoint, the save protocol) and evaluation reads it
(repa.eval.checkpoints, repa.eval.curves); it lives here so that neither imports the other.
No torch: listing checkpoints costs a directory read.

Layout of a run directory's `checkpoints/`:

    step-00010000/          a committed checkpoint
        COMPLETE.json       written last, by the main process: step, world size, time, files
                            and a BLAKE2b-256 checksum of each file (`b2sum -l 256 FILE`)
        model.pt            online model, EMA, optimisers, scaler, schedule, step, config (main)
        rng-rank{R}.pt      each process's RNG states and data-stream position
        ema.safetensors     the EMA weights in the published key layout (for REPA tools)
    latest                  text file naming the newest committed checkpoint (write-then-rename)
    .tmp-step-00020000/     a save in progress; never read, removed on the next start

A checkpoint exists only once COMPLETE.json is in it: everything here skips folders without it,
so a kill at any moment of a save leaves the previous checkpoint the newest one.

A checkpoint is intact when every file COMPLETE.json records matches its checksum (bit rot, a
bad copy). `resolve_resume("auto")` skips damaged checkpoints, saying which file, and falls back
to the newest intact one; an explicitly named checkpoint (a step, a path, a weights file read by
evaluation: `verify_checkpoint_file`) that is damaged is an error naming the file. Checkpoints
written before checksums existed record none and are accepted unverified.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from repa.utils.files import CHECKSUM, file_checksum

COMPLETE = "COMPLETE.json"
LATEST = "latest"
STAGING_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a checkpoint folder's name, or None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"{STAGING_PREFIX}{checkpoint_name(step)}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


# A tokenizer that training changed is saved inside each checkpoint (REPA-E exports its jointly
# trained VAE, with the latent statistics of the EMA model's BatchNorm): samples of that
# checkpoint decode with it.
TRAINED_TOKENIZER = "e2e-vae.pt"
TRAINED_TOKENIZER_STATS = "e2e-vae-latents-stats.pt"


def decode_tokenizer(config: dict, checkpoint_dir: Path | None) -> dict:
    """What decodes a checkpoint's samples, from its config (ExperimentConfig.to_dict()): the run's
    --decode-tokenizer when set, else the tokenizer the training latents came from, which is the
    checkpoint's own trained VAE when it holds one. {"tokenizer", "weights", "stats",
    "in_checkpoint"}: with in_checkpoint, tokenizer and stats are file names in the checkpoint (the
    file names the architecture and holds the weights)."""
    section = config.get("tokenizer") or {}
    chosen = section.get("decode_tokenizer") or section.get("tokenizer")
    trained = checkpoint_dir is not None and (checkpoint_dir / TRAINED_TOKENIZER).is_file()
    if trained and not section.get("decode_tokenizer"):
        return {"tokenizer": TRAINED_TOKENIZER, "weights": None, "stats": TRAINED_TOKENIZER_STATS,
                "in_checkpoint": True}  # fmt: skip
    return {"tokenizer": chosen, "weights": section.get("tokenizer_weights"),
            "stats": section.get("tokenizer_stats"), "in_checkpoint": False}  # fmt: skip


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints as (step, path), oldest first. Incomplete folders are ignored."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        step = parse_checkpoint_name(path.name)
        if step is not None and path.is_dir() and is_complete(path):
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer is a hint; completeness decides)."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file does not match the checksum its COMPLETE.json records (or is missing)."""


def read_record(path: Path) -> dict:
    """The COMPLETE.json of the checkpoint folder `path`."""
    return json.loads((path / COMPLETE).read_text())


def checkpoint_damage(path: Path, names: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the files of the complete checkpoint `path`: one entry per damaged or
    missing file, naming it; [] when all match. `names`: only these files (those a reader opens);
    default every file the record lists. A record without checksums (written before they
    existed) has nothing to check: []. Each file is hashed by streaming it (file_checksum)."""
    record = read_record(path)
    checksums = record.get("checksums")
    if not checksums:
        return []
    if record.get("checksum", CHECKSUM) != CHECKSUM:
        return [f"{COMPLETE} records {record['checksum']} checksums; this repa checks {CHECKSUM}"]
    problems = []
    for name in sorted(checksums) if names is None else names:
        if name not in checksums:
            continue  # not part of the checkpoint: the reader reports the missing file itself
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing ({COMPLETE} lists it)")
            continue
        actual = file_checksum(file)
        if actual != checksums[name]:
            problems.append(
                f"{name} does not match its checksum in {COMPLETE} ({CHECKSUM} recorded "
                f"{checksums[name][:16]}..., the file has {actual[:16]}...)"
            )
    return problems


def has_checksums(path: Path) -> bool:
    return bool(read_record(path).get("checksums"))


def verify_checkpoint_file(path: str | Path) -> None:
    """Check one file a reader is about to load (e.g. RUN/checkpoints/step-N/ema.safetensors)
    against its checkpoint's record; raise DamagedCheckpointError naming the file and the
    checkpoint on a mismatch. Files outside a complete checkpoint, or in one written before
    checksums, pass unchecked: there is nothing to compare with."""
    path = Path(path)
    folder = path.parent
    if not is_complete(folder):
        return
    problems = checkpoint_damage(folder, [path.name])
    if problems:
        raise DamagedCheckpointError(
            f"checkpoint {folder} is damaged: {'; '.join(problems)}. Restore the file from a copy, or "
            "pick another checkpoint"
        )


def resolve_resume(resume: str, checkpoints_dir: Path) -> Path | None:
    """`auto` -> newest complete and intact checkpoint or None; `none` -> None; `step:N` or a path
    -> that one, which must be complete and intact.

    The checkpoint picked is verified against its checksums (every file, by streaming it).
    With `auto` a damaged one is skipped with one line on stderr naming the file and the
    checkpoint, and the previous one is tried, saying so; if none is intact,
    DamagedCheckpointError names each checkpoint checked and what is wrong with it. A named
    checkpoint that is damaged is an error: falling back to another would silently not do what
    was asked. Call it on one process (the training loop's main one) and share its pick."""

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if resume in ("", "none"):
        return None
    if resume == "auto":
        damaged: list[tuple[Path, list[str]]] = []
        for _, path in reversed(list_checkpoints(checkpoints_dir)):
            problems = checkpoint_damage(path)
            if not problems:
                unverified = (
                    "" if has_checksums(path) else " (no checksums, written by an older repa: not verified)"
                )
                if damaged:
                    say(f"resuming from {path} instead, the newest intact checkpoint{unverified}")
                elif unverified:
                    say(f"note: resuming from {path}{unverified}")
                return path
            say(f"warning: skipping damaged checkpoint {path}: {'; '.join(problems)}")
            damaged.append((path, problems))
        if damaged:
            checked = "; ".join(f"{path.name}: {', '.join(problems)}" for path, problems in damaged)
            raise DamagedCheckpointError(
                f"no intact checkpoint to resume from in {checkpoints_dir}; checked {len(damaged)}: "
                f"{checked}. Restore the damaged files from a copy, or move the checkpoints aside to "
                "start this run over"
            )
        return None
    if resume.startswith("step:"):
        path = checkpoints_dir / checkpoint_name(int(resume[len("step:") :]))
    else:
        path = Path(resume)
    if not is_complete(path):
        available = ", ".join(p.name for _, p in list_checkpoints(checkpoints_dir)) or "none"
        raise FileNotFoundError(
            f"cannot resume from {path}: not a complete checkpoint (no {COMPLETE}); "
            f"complete ones: {available}"
        )
    problems = checkpoint_damage(path)
    if problems:
        available = ", ".join(p.name for _, p in list_checkpoints(checkpoints_dir)) or "none"
        raise DamagedCheckpointError(
            f"cannot resume from {path}: it is damaged: {'; '.join(problems)}. Restore the file from a "
            f"copy, or resume from another checkpoint (complete ones: {available})"
        )
    if not has_checksums(path):
        say(f"note: resuming from {path} (no checksums, written by an older repa: not verified)")
    return path
