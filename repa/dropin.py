"""REPA's and REPA-E's training flags that are not repa config fields: each is converted into
the config it means, or refused with the repa equivalent and the reason (docs/dropin.md).

Flags that are plain renames (`--enc-type`, `--cfg-prob`, `--vae-ckpt`, ...) are aliases declared
on their config field in repa/config.py; the ones here need a conversion (`--epochs` reads the
dataset size, `--legacy` changes the label-dropout probability, `--loss-cfg-path` reads REPA-E's
loss YAML) or have no repa counterpart. Torch-free: `repa train --help` builds this parser.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEST = "dropin."  # namespace prefix of these flags' values (config fields use "section.name")


class DropinError(ValueError):
    """A REPA / REPA-E flag that repa refuses; the message names the equivalent."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """REPA train.py / REPA-E train_repae.py, train_ldm_only.py flags without a config field."""
    group = parser.add_argument_group("REPA / REPA-E flags converted or refused (docs/dropin.md)")
    add = group.add_argument
    suppress = argparse.SUPPRESS
    add("--prediction", dest=DEST + "prediction", default=suppress, metavar="v",
        help="REPA: only 'v' (accepted)")  # fmt: skip
    add("--fused-attn", dest=DEST + "fused_attn", action="store_const", const=True, default=suppress,
        help="REPA: accepted; repa's attention is always scaled_dot_product_attention")  # fmt: skip
    add("--no-fused-attn", dest=DEST + "fused_attn", action="store_const", const=False, default=suppress,
        help="REPA: accepted; the same attention maths (float rounding aside)")  # fmt: skip
    add("--legacy", dest=DEST + "legacy", action="store_const", const=True, default=suppress,
        help="REPA: labels dropped twice, i.e. --class-dropout-prob 1 - (1 - p)^2")  # fmt: skip
    add("--no-legacy", dest=DEST + "legacy", action="store_const", const=False, default=suppress,
        help="REPA: the default (labels dropped once)")  # fmt: skip
    add("--epochs", dest=DEST + "epochs", type=int, default=suppress, metavar="E",
        help="REPA: caps --max-train-steps at EPOCHS x (dataset size // --batch-size), the size read "
        "from the shards' manifest")  # fmt: skip
    add("--loss-cfg-path", dest=DEST + "loss_cfg_path", default=suppress, metavar="YAML",
        help="REPA-E: its loss YAML, read into --l1-weight, --lpips-weight, --kl-weight, "
        "--gan-weight")  # fmt: skip
    add("--vae-latents-name", dest=DEST + "vae_latents_name", default=suppress, metavar="NAME",
        help="REPA-E: accepted; repa picks the cached latents in the shards made by --tokenizer")  # fmt: skip
    for flag in ("--logging-dir", "--continue-train-exp-dir", "--wandb-history-path"):
        add(
            flag,
            dest=DEST + flag[2:].replace("-", "_"),
            default=suppress,
            metavar="X",
            help="REPA: refused (docs/dropin.md)",
        )


# Refused flags: why, and what to use instead.
REFUSED = {
    "logging_dir": "--logging-dir is not used: repa writes its logs (metrics.jsonl, TensorBoard with "
    "--report-to tensorboard, the console log) into the run directory --output-dir/--exp-name; drop the flag",
    "continue_train_exp_dir": "--continue-train-exp-dir is not used: repa resumes a run in place (rerun the "
    "same command), or from a checkpoint directory with --resume PATH",
    "wandb_history_path": "--wandb-history-path is not used: repa's metrics history is RUN/metrics.jsonl, "
    "appended on resume; drop the flag",
}


def _dataset_size(data: str) -> int:
    from repa.data.shards import locate_manifest, read_manifest

    manifest_path = locate_manifest(data) if data else None
    try:
        if manifest_path is None:
            raise FileNotFoundError(data)
        return int(read_manifest(manifest_path)["num_samples"])
    except FileNotFoundError:
        raise DropinError(
            f"--epochs needs the dataset size, read from the shards' manifest.json, but --data {data!r} "
            "has none: pass --max-train-steps instead"
        ) from None


def _loss_weights(path: str) -> dict[str, float]:
    """REPA-E's loss YAML (configs/l1_lpips_kl_gan.yaml) -> our VAE loss weights; what repa's
    loss cannot do is refused."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"--loss-cfg-path {path} does not exist")
    losses = dict((yaml.safe_load(Path(path).read_text()) or {}).get("losses") or {})
    fixed = {
        "reconstruction_loss": "l1",
        "perceptual_loss": "lpips",
        "discriminator_start": 0,
        "discriminator_factor": 1.0,
        "lecam_regularization_weight": 0.0,
    }
    for key, value in fixed.items():
        if key in losses and losses[key] != value:
            raise DropinError(
                f"--loss-cfg-path {path}: {key}: {losses[key]!r} is not supported; repa's REPA-E loss is "
                f"L1 + LPIPS + KL + GAN with the discriminator on from step 0 ({key}: {value!r})"
            )
    known = set(fixed) | {"reconstruction_weight", "perceptual_weight", "kl_weight", "discriminator_weight",
                          "quantizer_weight", "logvar_init", "lecam_ema_decay"}  # fmt: skip
    unknown = sorted(set(losses) - known)
    if unknown:
        raise DropinError(f"--loss-cfg-path {path}: unknown loss keys {unknown}")
    names = {"reconstruction_weight": "l1_weight", "perceptual_weight": "lpips_weight",
             "kl_weight": "kl_weight", "discriminator_weight": "gan_weight"}  # fmt: skip
    return {ours: float(losses[theirs]) for theirs, ours in names.items() if theirs in losses}


def apply_train_flags(values: dict[str, dict], given: dict[str, Any]) -> None:
    """Write the meaning of the given drop-in flags (name -> value) into the nested config values
    (preset merged with the config flags), or raise DropinError naming the repa equivalent."""
    for name in REFUSED:
        if name in given:
            raise DropinError(REFUSED[name])
    prediction = given.get("prediction", "v")
    if prediction != "v":
        raise DropinError(
            f"--prediction {prediction!r}: repa trains velocity prediction only, as REPA ('v'; "
            "REPA's own parser accepts nothing else)"
        )
    from repa.config import SECTIONS

    model, run, vae, data = (values.setdefault(key, {}) for key in ("model", "run", "vae", "data"))

    def value(section: dict, name: str, section_name: str):  # as given, else the field's default
        return section[name] if name in section else getattr(SECTIONS[section_name](), name)

    if given.get("legacy"):
        # REPA's --legacy drops labels in train.py and again in the model, independently: a label
        # survives both with probability (1 - p)^2.
        p = float(value(model, "class_dropout_prob", "model"))
        model["class_dropout_prob"] = 1.0 - (1.0 - p) ** 2
    if "loss_cfg_path" in given:
        vae.update(_loss_weights(given["loss_cfg_path"]))
    if not run.get("method") and ("loss_cfg_path" in given or vae.get("disc_pretrained_ckpt")):
        run["method"] = "repa-e"  # train_repae.py's own flags: its method
    if "epochs" in given:
        epochs = given["epochs"]
        if epochs < 1:
            raise DropinError(f"--epochs must be >= 1, got {epochs}")
        batch_size = int(value(data, "batch_size", "data"))
        steps_per_epoch = _dataset_size(str(value(data, "data", "data"))) // batch_size
        if steps_per_epoch < 1:
            raise DropinError(f"--epochs: the dataset holds fewer samples than one --batch-size {batch_size}")
        # REPA loops over epochs and stops at --max-train-steps, whichever ends first.
        run["max_train_steps"] = min(int(value(run, "max_train_steps", "run")), epochs * steps_per_epoch)


# ---- repa sample: REPA's and REPA-E's generate.py flags ------------------------------------------


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """generate.py flags (REPA, REPA-E) that `repa sample` does not spell the same way."""
    group = parser.add_argument_group("REPA / REPA-E generate.py flags (docs/dropin.md)")
    add = group.add_argument
    add("--ckpt", default=None, help="REPA: the weights file (RUN_OR_CHECKPOINT)")
    add(
        "--exp-path",
        default=None,
        help="REPA-E: its experiment directory (args.json, checkpoints/), or a run",
    )
    add("--train-steps", dest="checkpoint_step", type=int, help="REPA-E: --checkpoint-step")
    add("--num-fid-samples", dest="num_samples", type=int, help="REPA: --num-samples")
    add(
        "--sample-dir", default=None, help="REPA: write SAMPLE_DIR/<name from the settings>.npz (no --output)"
    )
    add("--global-seed", dest="seed", type=int, help="REPA: --seed")
    add("--per-proc-batch-size", "--pproc-batch-size", dest="per_proc_batch_size", type=int, default=None,
        metavar="N", help="REPA / REPA-E: batch per process, i.e. --batch-size N x processes")  # fmt: skip
    add("--heun", dest="method", action="store_const", const="heun", help="REPA: --method heun")
    add("--no-heun", dest="method", action="store_const", const="euler", help=argparse.SUPPRESS)
    add("--vae", choices=("ema", "mse"), default=None, help="REPA: --tokenizer sd-vae-ft-ema / sd-vae-ft-mse")
    add("--tf32", nargs="?", const=True, default=False, type=_parse_bool, metavar="BOOL",
        help="TF32 matmuls on Ampere+ GPUs (REPA's generate.py: on; here off by default)")  # fmt: skip
    add("--no-tf32", dest="tf32", action="store_const", const=False, help=argparse.SUPPRESS)
    add("--time-convention", choices=("repa", "sit"), default=None,
        help="time convention of the weights: repa (t=1 noise) or sit (t=1 data: original SiT and "
        "LightningDiT checkpoints), i.e. --reverse-time false / true")  # fmt: skip
    # Architecture flags: repa reads these off the weights; given ones are checked against them.
    add("--num-classes", type=int, default=None, help="REPA: checked against the weights")
    add("--encoder-depth", type=int, default=None, help="REPA: checked against the run (the REPA tap)")
    add("--resolution", type=int, default=None, help="REPA: checked (image side in pixels)")
    add("--projector-embed-dims", default=None, help="REPA: checked against the projector widths")
    add("--qk-norm", dest="qk_norm", action="store_const", const=True, default=None, help="REPA: checked")
    add("--no-qk-norm", dest="qk_norm", action="store_const", const=False, help=argparse.SUPPRESS)
    add("--fused-attn", "--no-fused-attn", dest="fused_attn", action="store_const", const=None,
        help="REPA: accepted; repa always calls scaled_dot_product_attention (the same maths)")  # fmt: skip
    add("--legacy", "--no-legacy", dest="legacy", action="store_const", const=None,
        help="REPA: accepted; old REPA keys (decoder_blocks.*) are converted whenever found")  # fmt: skip


def _parse_bool(text: str) -> bool:
    from repa.config import parse_bool

    return parse_bool(text)


def _repae_experiment(exp_path: Path, train_steps: int | None) -> dict | None:
    """REPA-E's experiment layout (args.json, checkpoints/NNNNNNN.pt) -> load_generator arguments,
    read as its generate.py reads it: the VAE from the checkpoint when it holds one (REPA-E
    training), else args.json's --vae-ckpt (LDM-only training). None when it is not one."""
    args_file = exp_path / "args.json"
    if not args_file.is_file() or not any((exp_path / "checkpoints").glob("*.pt")):
        return None  # a repa run directory (checkpoints/step-N/) or a checkpoint folder
    import torch

    if train_steps is None:
        raise ValueError(f"--exp-path {exp_path} is a REPA-E experiment: give --train-steps")
    weights = exp_path / "checkpoints" / f"{train_steps:07d}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"--exp-path {exp_path} --train-steps {train_steps}: no {weights}")
    their = json.loads(args_file.read_text())
    vae_ckpt = their.get("vae_ckpt")
    with torch.serialization.safe_globals([argparse.Namespace]):  # its checkpoints keep "args"
        holds_vae = "vae" in torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    return dict(
        path=str(weights),
        model=their.get("model"),
        tokenizer=their.get("vae", "f8d4"),
        tokenizer_weights=str(weights) if holds_vae else vae_ckpt,
        # A REPA-E model decodes through its BatchNorm's statistics; the stats file only builds the VAE.
        tokenizer_stats=str(Path(vae_ckpt).with_name(Path(vae_ckpt).stem + "-latents-stats.pt"))
        if vae_ckpt
        else None,
        path_type=their.get("path_type"),
    )


def resolve_sample_source(args: argparse.Namespace) -> dict:
    """load_generator's arguments from the flags, in repa's, REPA's or REPA-E's spelling."""
    sources = [s for s in (args.source, args.ckpt, args.exp_path) if s]
    if len(sources) != 1:
        raise ValueError("name the weights once: RUN_OR_CHECKPOINT, REPA's --ckpt or REPA-E's --exp-path")
    if args.vae and args.tokenizer:
        raise ValueError("give --tokenizer or REPA's --vae, not both")
    reverse_time = args.reverse_time
    if args.time_convention:
        if reverse_time is not None:
            raise ValueError("give --time-convention or --reverse-time, not both")
        reverse_time = args.time_convention == "sit"
    vae = args.vae
    if args.ckpt and str(args.ckpt).endswith(".pt") and not (vae or args.tokenizer):
        vae = "ema"  # REPA's generate.py default for its train.py checkpoints (they carry no config)
    found = dict(
        path=sources[0],
        model=args.model,
        tokenizer=f"sd-vae-ft-{vae}" if vae else args.tokenizer,
        tokenizer_weights=args.tokenizer_weights,
        tokenizer_stats=args.tokenizer_stats,
        path_type=args.path_type,
    )
    experiment = _repae_experiment(Path(args.exp_path), args.checkpoint_step) if args.exp_path else None
    for key, value in (experiment or {}).items():  # flags given win over args.json
        found[key] = value if key == "path" or not found[key] else found[key]
    return dict(found, reverse_time=reverse_time, checkpoint_step=args.checkpoint_step)


def sample_output_path(args: argparse.Namespace, source: str) -> str:
    """--output, or under REPA's --sample-dir a name made of the weights and the settings."""
    if args.output and args.sample_dir:
        raise ValueError("give --output FILE.npz or REPA's --sample-dir DIR, not both")
    if args.output:
        return args.output
    if not args.sample_dir:
        raise ValueError("give --output FILE.npz (or REPA's --sample-dir DIR)")
    name = Path(source.rstrip("/")).name.replace(".safetensors", "").replace(".pt", "")
    step = f"-{args.checkpoint_step:07d}" if args.checkpoint_step is not None else ""
    guidance = f"cfg-{args.cfg_scale}-{args.guidance_low}-{args.guidance_high}"
    return str(Path(args.sample_dir) / f"{name}{step}-{guidance}-seed-{args.seed}-{args.mode}.npz")


def sample_batch_size(args: argparse.Namespace, world_size: int) -> int:
    """The global batch: --batch-size, or REPA's per-process batch times the processes."""
    return args.per_proc_batch_size * world_size if args.per_proc_batch_size else args.batch_size


def check_architecture(generator, args: argparse.Namespace) -> None:
    """REPA's generate.py architecture flags must agree with what repa read off the weights."""
    config = generator.model.config
    found = {
        "--num-classes": getattr(config, "num_classes", 0),  # an MMDiT has no labels, no qk norm
        "--encoder-depth": config.align_depth,
        "--resolution": generator.resolution,
        "--projector-embed-dims": ",".join(str(d) for d in config.projector_out_dims),
        "--qk-norm": getattr(config, "qk_norm", False),
    }
    given = {
        "--num-classes": args.num_classes,
        "--encoder-depth": args.encoder_depth,
        "--resolution": args.resolution,
        "--projector-embed-dims": (args.projector_embed_dims or "").replace(" ", "") or None,
        "--qk-norm": args.qk_norm,
    }
    for flag, value in given.items():
        if value is not None and value != found[flag]:
            raise ValueError(
                f"{flag} {value} disagrees with the weights ({found[flag]}): repa reads the architecture "
                "off the checkpoint, so drop the flag or pick the matching checkpoint"
            )
