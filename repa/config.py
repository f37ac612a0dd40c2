"""The typed configuration of a training run: dataclasses, YAML presets, command-line flags.

Precedence: dataclass defaults < YAML preset (`--config configs/NAME.yaml`, nested by section)
< flags given on the command line. Every field is declared once, here, with its flag name, its
aliases (REPA's spellings) and its help text; the argument parser and the README's configuration
reference are generated from these declarations, so they cannot drift apart.

Fields with a fixed set of values are typed `Literal[...]` (a comma list of such values:
`CommaList[Literal[...]]`). The annotation is the only list of valid values: one check,
`check_choice`, reads it for the argument parser, for presets and for `ExperimentConfig.from_dict`
(every section runs it first in `__post_init__`), and the flag help and the README list it.

Each section validates itself in `__post_init__`; `ExperimentConfig.validate()` checks what
spans sections. Messages say what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml


def option(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), choices=None):
    """A config field with its command-line spelling (default: --field-name) and aliases.

    Valid values come from the field's `Literal` annotation, never from here: `choices` is
    accepted only as None."""
    if choices is not None:
        raise TypeError("declare a field's valid values with a Literal annotation, not choices=")
    metadata = {"help": help, "flag": flag, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CommaList:
    """`CommaList[L]`: a string of comma-separated names (possibly none), each a value of Literal L."""

    literal: Any

    def __class_getitem__(cls, literal):
        return Annotated[str, cls(literal)]


# The fixed sets of values. Torch-free copies of lists kept elsewhere; tests assert they agree.
PathType = Literal["linear", "cosine"]
# repa.transport.objective: TIME_SAMPLERS, then TIME_SAMPLER_ALIASES (REPA's `--weighting lognormal`).
TimeSamplerName = Literal["uniform", "logit-normal", "lognormal", "logit_normal"]
LRSchedule = Literal["constant", "cosine"]
Precision = Literal["auto", "no", "fp32", "bf16", "fp16"]  # repa.precision.CHOICES
Logger = Literal["wandb", "tensorboard"]  # repa.train.logging
EvalMetric = Literal["fid", "sfid", "is", "prc", "fd-dinov2", "fd"]  # repa.eval.metrics.METRICS
WandbMode = Literal["online", "offline"]
AdaLNMode = Literal["block", "single"]  # repa.models.sit.ADALN_MODES
NullContextMode = Literal["empty", "learned", "fixed"]  # repa.models.cross_attention.NULL_CONTEXT_MODES
AlignTarget = Literal["encoder", "shuffled"]
ProjectorKind = Literal["mlp", "conv"]
TargetNorm = Literal["none", "zscore"]
SRACosine = Literal["per-token", "token-axis"]  # repa.align.SRA_COSINES

PRECISIONS: tuple[str, ...] = get_args(Precision)
TIME_SAMPLER_NAMES: tuple[str, ...] = get_args(TimeSamplerName)
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)


@functools.cache
def _hints(section_type: type) -> dict[str, Any]:
    return get_type_hints(section_type, include_extras=True)


def _choices(section_type: type, name: str) -> tuple[tuple[str, ...], bool] | None:
    """(valid values, whether the field is a comma list of them), or None when any value goes."""
    hint = _hints(section_type)[name]
    if get_origin(hint) is Literal:
        return get_args(hint), False
    if get_origin(hint) is Annotated:
        for extra in hint.__metadata__:
            if isinstance(extra, CommaList):
                return get_args(extra.literal), True
    return None


def _section_name(section_type: type) -> str:
    return next(name for name, known in SECTIONS.items() if known is section_type)


def check_choice(section_type: type, name: str, value: Any) -> None:
    """THE check of every fixed-set field: `value` (each item of a comma list) must be one of the
    values of the field's Literal annotation. Flags, presets and from_dict all end up here."""
    choices = _choices(section_type, name)
    if choices is None:
        return
    valid, is_list = choices
    items = [item.strip() for item in value.split(",")] if is_list and isinstance(value, str) else [value]
    for item in items:
        if item not in valid and not (is_list and item == ""):
            f = next(f for f in dataclasses.fields(section_type) if f.name == name)
            hint = ""
            if isinstance(item, bool):
                hint = " (YAML reads unquoted no/yes/off/on as booleans: quote the value)"
            raise ValueError(
                f"{_flag_name(f)} {item!r} is not one of: {', '.join(valid)} "
                f"(config key {_section_name(section_type)}.{name}){hint}"
            )


class _Section:
    """Base of the config sections: their fixed-set fields are checked before anything else."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_choice(type(self), f.name, getattr(self, f.name))


@dataclass
class ModelOptions(_Section):
    name: str = option(
        "SiT-XL/2",
        "diffusion backbone from the registry (SiT-{S,B,L,XL}/{1,2,4,8}, "
        "LightningDiT-{B,L,XL,1p0B,1p6B}/{1,2}, DDT-{B,L,XL}/{1,2})",
        flag="--model",
    )
    align_depth: int = option(
        8, "REPA tap: block after which hidden tokens are aligned (1-based)", aliases=("--encoder-depth",)
    )
    proj_coeff: float = option(0.5, "weight of the alignment loss (REPA's lambda)")
    align_resample: bool = option(
        False, "interpolate encoder tokens to the model's token grid when their counts differ (opt-in)"
    )
    projector_dim: int = option(2048, "hidden width of the REPA projector MLP")
    num_classes: int = option(1000, "number of classes; the null class for CFG is this index")
    class_dropout_prob: float = option(
        0.1, "label dropout for classifier-free guidance", aliases=("--cfg-prob",)
    )
    # Text-to-image (docs/text_to_image.md): cross-attention to the shards' cached caption embeddings.
    context_dim: int | None = option(
        None,
        "text models: width of the cached caption embeddings the SiT cross-attends to (default: the "
        "shards' cached text width when they hold text (repa data build --cache-text), else 0; 0: no "
        "text, class labels instead); the caption drops to the null caption at --class-dropout-prob",
    )
    null_context: NullContextMode = option(
        "empty",
        "text models: the null caption of CFG: empty = the text encoder's embedding of the empty caption "
        "(REPA's, the shards' null_text.npy), learned, fixed (PixArt's random buffer)",
    )
    qk_norm: bool | None = option(
        None,
        "norm on queries and keys in attention (LayerNorm, or RMSNorm with --rmsnorm); default: as "
        "registered (on for DDT-*)",
    )
    # LightningDiT's block options; None keeps the registered model's (on for LightningDiT-*).
    swiglu: bool | None = option(
        None,
        "SwiGLU FFN (LightningDiT's w12/w3, hidden 2/3 of 4D) in place of the GELU MLP "
        "(default: as registered)",
    )
    rmsnorm: bool | None = option(
        None, "RMSNorm with a learned scale in place of the affine-free LayerNorms (default: as registered)"
    )
    rope: bool | None = option(
        None, "2-D rotary position embedding on queries and keys (default: as registered)"
    )
    wo_shift: bool = option(False, "adaLN without shifts: scale and gate only (LightningDiT's wo_shift)")
    adaln: AdaLNMode = option(
        "block",
        "block: adaLN-Zero MLP per block; single: PixArt's shared adaLN MLP plus a (6, D) table per block",
    )
    ddt_encoder_depth: int | None = option(
        None,
        "DDT: blocks 1..k form the condition encoder, the rest the velocity decoder (0: a plain SiT; "
        "default: as registered, 22 for DDT-XL/2)",
    )
    grad_checkpointing: bool = option(
        False, "recompute each block's activations in the backward pass (less memory, same numbers)"
    )
    tread_ratio: float = option(
        0.0,
        "TREAD token routing (training only): the fraction of tokens that skips blocks --tread-start.."
        "--tread-end (0: off; published: 0.5); evaluation and sampling never route",
    )
    tread_start: int = option(2, "TREAD: first routed block, 0-based (TREAD's start_layer_idx)")
    tread_end: int | None = option(
        None, "TREAD: last routed block, 0-based, inclusive (default: depth - 4, e.g. 24 of XL's 28)"
    )
    # Width overrides for small models (tests, the CPU demo); None keeps the registered size.
    hidden_size: int | None = option(None, "override the registered hidden size")
    depth: int | None = option(None, "override the registered number of blocks")
    num_heads: int | None = option(None, "override the registered number of heads")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_coeff < 0:
            raise ValueError(f"--proj-coeff must be >= 0, got {self.proj_coeff}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"--class-dropout-prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.num_classes < 1:
            raise ValueError(f"--num-classes must be >= 1, got {self.num_classes}")


@dataclass
class DataOptions(_Section):
    data: str = option(
        "", "training shards: a directory, a brace pattern or URL list", aliases=("--data-dir",)
    )
    resolution: int = option(256, "image resolution in pixels")
    batch_size: int = option(256, "GLOBAL batch size, split across processes (as in REPA)")
    num_workers: int = option(4, "data-loader workers per process")
    shuffle_buffer: int = option(1000, "samples in the shuffle buffer of each worker")
    random_flip: bool = option(False, "random horizontal flips (uses cached flipped latents when present)")
    use_cached_latents: bool = option(True, "use VAE moments cached in the shards when present")
    use_cached_features: bool = option(True, "use encoder features cached in the shards when present")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")


@dataclass
class TokenizerOptions(_Section):
    tokenizer: str = option(
        "sd-vae-ft-mse",
        "latent space: sd-vae-ft-mse | sd-vae-ft-ema | f8d4 | f16d32 | pixels | PATH",
        aliases=("--vae",),
    )
    tokenizer_weights: str | None = option(
        None,
        "local weights file or folder for the tokenizer (its NAME-latents-stats.pt beside it is read)",
        aliases=("--vae-ckpt",),
    )
    tokenizer_stats: str | None = option(
        None, "latents-stats file (REPA-E format) for per-channel normalisation"
    )
    decode_tokenizer: str | None = option(
        None,
        "tokenizer that decodes samples (default: --tokenizer, the one the training latents came "
        "from; REPA's published pairing: sd-vae-ft-mse latents decoded with sd-vae-ft-ema)",
    )


@dataclass
class EncoderOptions(_Section):
    encoder: str = option(
        "dinov2-b",
        "frozen target encoder(s), comma-separated; 'none' = plain SiT; NAME:random = NAME's architecture "
        "with seeded random weights (the random-teacher control)",
        aliases=("--enc-type",),
    )
    encoder_weights: str | None = option(None, "local weights file for the encoder (one encoder only)")
    encoder_cache_dir: str | None = option(None, "hub cache directory for encoder weights")

    @property
    def enabled(self) -> bool:
        return self.encoder.strip().lower() not in ("", "none")


@dataclass
class TransportOptions(_Section):
    path_type: PathType = option("linear", "interpolant between data and noise")
    time_sampler: TimeSamplerName = option(
        "uniform",
        "training-time distribution (lognormal and logit_normal: REPA's names for logit-normal)",
        aliases=("--weighting",),
    )
    time_loc: float = option(0.0, "logit-normal location")
    time_scale: float = option(1.0, "logit-normal scale")
    time_shift: float = option(
        1.0,
        "sampling timestep shift k: grid times t -> k t / (1 + (k - 1) t), 1 = none (repa sample's "
        "--time-shift default for this model; LightningDiT's timestep_shift s is k = 1/s)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.time_shift > 0:
            raise ValueError(f"--time-shift must be > 0 (1 = no shift), got {self.time_shift}")


@dataclass
class ObjectiveOptions(_Section):
    """Representation objectives beside (or instead of) REPA's: docs/objectives.md."""

    cos_loss_weight: float = option(
        0.0, "weight of LightningDiT's velocity-direction term 1 - cos(v_pred, v) over channels (its: 1)"
    )
    align_target: AlignTarget = option(
        "encoder",
        "encoder: each sample aligns to its own encoder tokens; shuffled (control arm): to another "
        "sample's tokens of the micro-batch (a seeded random cycle)",
    )
    align_until_step: int = option(
        0,
        "HASTE: end every alignment term (encoder and SRA) after this many steps, with no encoder "
        "forward after it; a run resumed there builds no encoder (0: never; HASTE: 250000)",
    )
    projector: ProjectorKind = option(
        "mlp", "alignment projector: mlp (REPA's, in the model) | conv (iREPA's, one conv on the token grid)"
    )
    projector_kernel: int = option(3, "kernel size of the conv projector (iREPA's README: 3)")
    target_norm: TargetNorm = option(
        "none", "normalisation of the target tokens: zscore = iREPA's spatial z-score over the tokens"
    )
    target_norm_gamma: float = option(
        0.6,
        "iREPA's z-score: the share of the token mean subtracted (default: its latent-SiT code's 0.6, "
        "the setting repa trains; its JiT pixel code uses 0.8)",
    )
    dispersive_weight: float = option(
        0.0, "weight of the dispersive loss on a block's hidden state (0: off; DDT's code: 0.5)"
    )
    dispersive_temperature: float = option(1.0, "dispersive loss temperature (DDT's code: 1.0)")
    dispersive_depth: int = option(
        0, "block (1-based) whose output the dispersive loss spreads (0: --align-depth)"
    )
    attn_distill_weight: float = option(
        0.0,
        "HASTE's attention distillation: weight of the cross-entropy between the SiT's attention and the "
        "encoder's over the patch tokens (0: off; HASTE: 0.5)",
    )
    attn_distill_layers: str = option(
        "5:9,6:10,7:11,8:12",
        "HASTE: SiT block:encoder block pairs, 1-based (HASTE for SiT-XL/2 and DINOv2-B); the first "
        "min(heads) heads of each",
    )
    cls_loss_weight: float = option(
        0.03,
        "--method reg: weight of the class token's denoising loss (REG's --cls: 0.03)",
        aliases=("--cls",),
    )
    sra_weight: float = option(0.5, "--method sra: weight of the self-alignment term (SRA's cos: 0.5)")
    sra_t_max: float = option(
        0.2, "--method sra: the teacher sees t - sra_t_max * U(0,1), clamped to [0, 1] (less noise)"
    )
    sra_student_depth: int = option(8, "--method sra: student block (1-based; SRA for XL: 8)")
    sra_teacher_depth: int = option(20, "--method sra: EMA teacher block (1-based; SRA for XL: 20)")
    sra_cosine: SRACosine = option(
        "per-token",
        "--method sra: per-token cosine over features, or token-axis (SRA's code: each channel's "
        "spatial pattern)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "cos_loss_weight",
            "dispersive_weight",
            "sra_weight",
            "target_norm_gamma",
            "attn_distill_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.align_until_step < 0:
            raise ValueError(f"--align-until-step must be >= 0 (0: never), got {self.align_until_step}")
        if self.projector_kernel < 1 or self.projector_kernel % 2 == 0:
            raise ValueError(f"--projector-kernel must be odd and >= 1, got {self.projector_kernel}")
        if not self.dispersive_temperature > 0:
            raise ValueError(f"--dispersive-temperature must be > 0, got {self.dispersive_temperature}")
        if self.dispersive_depth < 0:
            raise ValueError(
                f"--dispersive-depth must be >= 0 (0: --align-depth), got {self.dispersive_depth}"
            )
        if not 0 < self.sra_t_max <= 1:
            raise ValueError(f"--sra-t-max must be in (0, 1], got {self.sra_t_max}")
        self.attention_pairs()  # a readable --attn-distill-layers
        if self.sra_student_depth < 1 or self.sra_teacher_depth < 1:
            raise ValueError("--sra-student-depth and --sra-teacher-depth count blocks from 1")

    def attention_pairs(self) -> list[tuple[int, int]]:
        """--attn-distill-layers as (SiT block, encoder block) pairs, 1-based."""
        try:
            pairs = [tuple(int(n) for n in item.split(":")) for item in self.attn_distill_layers.split(",")]
        except ValueError:
            pairs = []
        if not pairs or any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
            raise ValueError(
                f"--attn-distill-layers {self.attn_distill_layers!r} must list SIT:ENCODER block pairs, "
                "1-based, e.g. 5:9,6:10,7:11,8:12"
            )
        return pairs


@dataclass
class OptimOptions(_Section):
    learning_rate: float = option(1e-4, "AdamW learning rate", aliases=("--lr",))
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(0.0, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    lr_schedule: LRSchedule = option("constant", "learning-rate schedule after the linear warmup")
    lr_warmup_steps: int = option(0, "linear learning-rate warmup steps")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step")
    ema_decay: float = option(0.9999, "EMA decay per optimiser step")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"--gradient-accumulation-steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"--ema-decay must be in [0, 1], got {self.ema_decay}")


@dataclass
class VAEOptions(_Section):
    """REPA-E's end-to-end VAE training (method repa-e). Weights: docs/conventions.md, "REPA-E training"."""

    vae_learning_rate: float = option(1e-4, "VAE AdamW learning rate")
    disc_learning_rate: float = option(1e-4, "discriminator AdamW learning rate")
    vae_max_grad_norm: float | None = option(
        None, "gradient clipping norm of the VAE (default: --max-grad-norm)"
    )
    disc_max_grad_norm: float | None = option(
        None, "gradient clipping norm of the discriminator (default: --max-grad-norm)"
    )
    vae_align_coeff: float = option(
        1.5, "alignment weight in the VAE loss", aliases=("--vae-align-proj-coeff",)
    )
    l1_weight: float = option(1.0, "reconstruction L1 weight")
    lpips_weight: float = option(1.0, "LPIPS weight")
    kl_weight: float = option(1e-6, "KL weight")
    gan_weight: float = option(0.1, "generator adversarial weight (constant from step 0)")
    disc_layers: int = option(3, "PatchGAN discriminator layers (REPA-E: 3)")
    disc_pretrained_ckpt: str | None = option(
        None, "start the discriminator from this state dict (REPA-E's layout, loaded strictly)"
    )
    bn_momentum: float = option(0.1, "momentum of the SiT's latent BatchNorm running statistics (REPA-E)")
    lpips_legacy_rescale: bool = option(
        False,
        "LPIPS as REPA-E's published runs computed it: inputs rescaled x -> 2x - 1 a second time "
        "(off: the fixed LPIPS)",
    )
    lpips_weights: str | None = option(None, "LPIPS linear-layer weights file (lpips v0.1 vgg.pth)")
    vgg_weights: str | None = option(None, "torchvision VGG16 weights file for LPIPS")


@dataclass
class RunOptions(_Section):
    method: str = option(
        "",
        "training method from the registry (repa/train/methods): sit | repa | repa-e | ldm | dispersive | "
        "sra | reg (default: repa with an encoder, sit without)",
    )
    output_dir: str = option("runs", "parent directory of run directories")
    exp_name: str = option("", "run directory name under --output-dir (default: derived from the config)")
    max_train_steps: int = option(400_000, "optimiser steps to train")
    checkpointing_steps: int = option(50_000, "save a checkpoint every N steps")
    keep_checkpoints: int = option(
        2, "complete checkpoints kept (>= 2; older ones deleted after a new one commits)"
    )
    keep_every: int = option(
        0, "also keep every checkpoint whose step is a multiple of N (0: none), for curves"
    )
    resume: str = option("auto", "auto (newest complete checkpoint) | none | PATH of a checkpoint directory")
    seed: int = option(0, "global seed; per-process streams derive from (seed, rank, step)")
    mixed_precision: Precision = option(
        "auto",
        "no = fp32; auto: bf16 on GPUs and CPUs that multiply it natively, fp16 on older GPUs (with a "
        "grad scaler), else fp32",
    )
    allow_tf32: bool = option(False, "TF32 matmuls on Ampere+ GPUs")
    compile: bool = option(False, "torch.compile the diffusion model (slower on small CPU models)")
    max_nonfinite_steps: int = option(10, "stop after this many non-finite steps in a row")
    step_timeout: float = option(
        600.0,
        "seconds a training step may take before the rank writes its stacks to the run directory and "
        "exits (0 disables)",
    )
    long_phase_timeout: float = option(
        3600.0,
        "the same for start-up with the first step (compilation), checkpoint saves, previews and "
        "--eval-every evaluations",
    )
    dist_timeout: float = option(
        0.0,
        "seconds a collective waits for the other ranks before torch.distributed fails the job; 0: "
        "120 s above the larger of --step-timeout and --long-phase-timeout (at least 3720 s), so a "
        "frozen rank is reported by the watchdog and rank 0's longest phase fits",
    )
    lease_stale_after: float = option(
        300.0, "seconds without a heartbeat after which another start takes over the run directory"
    )
    log_every: int = option(10, "log metrics every N steps")
    sample_every: int = option(
        10_000, "write an EMA sample grid every N steps (0 disables)", aliases=("--sampling-steps",)
    )
    sample_steps: int = option(50, "Euler ODE steps for preview grids")
    sample_cfg_scale: float = option(4.0, "CFG scale for preview grids")
    eval_every: int = option(0, "score the EMA model every N steps during training (0 disables)")
    eval_ref: str = option("", "reference for --eval-every: images, shards, .npz or statistics")
    eval_metrics: CommaList[EvalMetric] = option(
        "fid", "metrics for --eval-every (fd: a feature space given in code)"
    )
    eval_num_samples: int = option(5000, "samples per --eval-every evaluation")
    eval_num_steps: int = option(50, "Euler ODE steps for --eval-every samples")
    eval_cfg_scale: float = option(1.0, "CFG scale for --eval-every samples")
    report_to: CommaList[Logger] = option("", "extra loggers (metrics.jsonl is always written)")
    wandb_project: str = option("repa", "wandb project")
    wandb_mode: WandbMode = option("online", "wandb mode")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_train_steps < 0:
            raise ValueError(f"--max-train-steps must be >= 0, got {self.max_train_steps}")
        if self.checkpointing_steps < 1:
            raise ValueError(f"--checkpointing-steps must be >= 1, got {self.checkpointing_steps}")
        if self.step_timeout < 0 or self.long_phase_timeout < 0:
            raise ValueError("--step-timeout and --long-phase-timeout must be >= 0 (0 disables)")
        if self.dist_timeout < 0:
            raise ValueError(f"--dist-timeout must be >= 0 (0: derived), got {self.dist_timeout}")
        if self.lease_stale_after <= 0:
            raise ValueError(f"--lease-stale-after must be > 0, got {self.lease_stale_after}")
        if self.keep_checkpoints < 2:
            raise ValueError(
                f"--keep-checkpoints must be >= 2, got {self.keep_checkpoints}: the newest may be mid-save "
                "when a job dies, so the one before it must survive"
            )
        if self.eval_every and not self.eval_ref:
            raise ValueError("--eval-every needs --eval-ref (reference images, shards, .npz or statistics)")


SECTIONS: dict[str, type] = {
    "model": ModelOptions,
    "data": DataOptions,
    "tokenizer": TokenizerOptions,
    "encoder": EncoderOptions,
    "transport": TransportOptions,
    "objective": ObjectiveOptions,
    "optim": OptimOptions,
    "vae": VAEOptions,
    "run": RunOptions,
}


@dataclass
class ExperimentConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    encoder: EncoderOptions = field(default_factory=EncoderOptions)
    transport: TransportOptions = field(default_factory=TransportOptions)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    vae: VAEOptions = field(default_factory=VAEOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @property
    def method(self) -> str:
        """The method, defaulting to repa when an encoder is set and sit otherwise."""
        if self.run.method:
            return self.run.method
        return "repa" if self.encoder.enabled else "sit"

    def validate(self) -> ExperimentConfig:
        """Checks across sections that need no weights or data, the training method's included.
        Returns self."""
        from repa.train.methods import get_method  # (loads the method's module, and torch)

        get_method(self.method).check_config(self)
        if self.data.batch_size % self.optim.gradient_accumulation_steps:
            raise ValueError(
                f"--batch-size {self.data.batch_size} is not divisible by "
                f"--gradient-accumulation-steps {self.optim.gradient_accumulation_steps}"
            )
        if self.encoder.encoder_weights and "," in self.encoder.encoder:
            raise ValueError("--encoder-weights names one file, but --encoder lists several encoders")
        from repa.models import config_for  # the registry validates name, align depth and sizes

        # Encoder widths are known only once encoders load; any width checks the align depth.
        num_encoders = len(self.encoder.encoder.split(",")) if self.encoder.enabled else 0
        config_for(
            self.model.name, **self.model_overrides(input_size=None, projector_dims=[1] * num_encoders)
        )
        return self

    def class_token_dim(self, encoder_widths=()) -> int:
        """REG's class-token width: the (single) encoder's token width for --method reg, else 0.
        The method's name decides it here, torch-free, because eval rebuilds models from configs
        without importing the training methods (eval/checkpoints.py also reads it off the weights)."""
        return int(encoder_widths[0]) if self.method == "reg" and len(encoder_widths) else 0

    def model_overrides(
        self, input_size: int | None, in_channels: int = 4, projector_dims=(), text_shape=None
    ) -> dict:
        """Keyword overrides for repa.models.create_model from this config. `text_shape`: (L, D)
        of the training shards' cached caption embeddings (their manifest's text_shape), or None."""
        overrides = dict(
            align_depth=self.model.align_depth,
            projector_dim=self.model.projector_dim,
            num_classes=self.model.num_classes,
            class_dropout_prob=self.model.class_dropout_prob,
            wo_shift=self.model.wo_shift,
            adaln=self.model.adaln,
            grad_checkpointing=self.model.grad_checkpointing,
            tread_ratio=self.model.tread_ratio,
            tread_start=self.model.tread_start,
            tread_end=self.model.tread_end,
            # iREPA's conv projector belongs to the method (repa/train/methods/denoising.py), not the model
            projector_out_dims=list(projector_dims) if self.objective.projector == "mlp" else [],
            in_channels=in_channels,
            # REG (--method reg): the encoder's class token, as wide as its tokens, enters as token 0
            class_token_dim=self.class_token_dim(projector_dims),
        )
        if input_size is not None:
            overrides["input_size"] = input_size
        overrides.update(self.text_overrides(text_shape))
        for name in ("hidden_size", "depth", "num_heads", "swiglu", "rmsnorm", "rope", "qk_norm",
                     "ddt_encoder_depth"):  # fmt: skip
            if getattr(self.model, name) is not None:
                overrides[name] = getattr(self.model, name)
        return overrides

    def text_overrides(self, text_shape=None) -> dict:
        """A text model's options: cross-attention to captions of width --context-dim (default: the
        shards' cached width D of text_shape (L, D)), as many null-caption rows as the captions have
        tokens, no label embedder. {} for a class-conditional model."""
        context_dim = self.model.context_dim
        if context_dim is None:
            context_dim = int(text_shape[1]) if text_shape else 0
        elif context_dim and text_shape and int(text_shape[1]) != context_dim:
            raise ValueError(
                f"--context-dim {context_dim}, but the shards cache {int(text_shape[1])}-wide text "
                "embeddings: leave --context-dim unset (it is read from the shards) or rebuild them"
            )
        if context_dim < 0:
            raise ValueError(f"--context-dim must be >= 0 (0: no text), got {context_dim}")
        if not context_dim:
            return {}
        overrides = {"context_dim": context_dim, "null_context": self.model.null_context, "num_classes": 0}
        if text_shape:
            overrides["context_length"] = int(text_shape[0])
        return overrides

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        unknown = set(values) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
        sections = {}
        for name, section_type in SECTIONS.items():
            section_values = values.get(name) or {}
            known = {f.name for f in dataclasses.fields(section_type)}
            bad = set(section_values) - known
            if bad:
                raise ValueError(
                    f"unknown key(s) {sorted(bad)} in config section '{name}'; valid: {sorted(known)}"
                )
            types = {f.name: f for f in dataclasses.fields(section_type)}
            sections[name] = section_type(
                **{key: _coerce(section_type, types[key], value) for key, value in section_values.items()}
            )
        return cls(**sections)


# ----------------------------------------------------------------------------------------------
# Flags


def _coerce(section_type: type, f: dataclasses.Field, value: Any) -> Any:
    """YAML values to the field's type. PyYAML reads `1e-4` (no dot) as a string, for example.
    Values of fixed-set fields pass unchanged: the section's `check_choice` judges them."""
    if value is None or _choices(section_type, f.name) is not None:
        return value
    section = _section_name(section_type)
    convert = _value_type(section_type, f)
    if convert is str:
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bool) and convert is not parse_bool:
        raise ValueError(f"config '{section}.{f.name}': expected a number, got {value!r}")
    try:
        return convert(value) if not isinstance(value, str) or convert is not int else int(float(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(
            f"config '{section}.{f.name}': cannot read {value!r} as {convert.__name__}"
        ) from None


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def iter_options():
    """(section name, dataclass field) for every option, in declaration order."""
    for section_name, section_type in SECTIONS.items():
        for f in dataclasses.fields(section_type):
            yield section_name, f


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _value_type(section_type: type, f: dataclasses.Field):
    """The parser of a field's values, from its annotation (`X | None` reads as X)."""
    hint = _hints(section_type)[f.name]
    if isinstance(hint, UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    return {bool: parse_bool, int: int, float: float}.get(hint, str)


def _help(section_type: type, f: dataclasses.Field) -> str:
    """A field's help text, ending with its valid values when they are a fixed set."""
    choices = _choices(section_type, f.name)
    if choices is None:
        return f.metadata["help"]
    valid, is_list = choices
    return f"{f.metadata['help']}; {'comma list of' if is_list else 'one of'}: {', '.join(valid)}"


def _checked_by(parser: argparse.ArgumentParser, section_type: type, f: dataclasses.Field):
    """The argparse `type` of a fixed-set flag: `check_choice`, its message as the parser's error."""

    def check(text: str) -> str:
        try:
            check_choice(section_type, f.name, text)
        except ValueError as error:
            parser.error(str(error))
        return text

    return check


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --config and one flag per option. Unset flags stay absent from the namespace."""
    parser.add_argument("--config", default=None, help="YAML preset (e.g. configs/repa_sit_xl2.yaml)")
    groups = {name: parser.add_argument_group(name) for name in SECTIONS}
    for section_name, f in iter_options():
        section_type = SECTIONS[section_name]
        kwargs: dict[str, Any] = dict(
            dest=f"{section_name}.{f.name}", default=argparse.SUPPRESS, help=_help(section_type, f)
        )
        value_type = _value_type(section_type, f)
        choices = _choices(section_type, f.name)
        if value_type is parse_bool:
            # `--random-flip` alone means true; `--random-flip false` also works; `--no-random-flip`
            # too (REPA's BooleanOptionalAction spelling).
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
            negations = ["--no-" + name[2:] for name in (_flag_name(f), *f.metadata.get("aliases", ()))]
            groups[section_name].add_argument(
                *negations, dest=kwargs["dest"], action="store_const", const=False, default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )  # fmt: skip
        elif choices is not None:
            kwargs.update(type=_checked_by(parser, section_type, f))
            if not choices[1]:  # a single value: --help shows {a,b}
                kwargs["choices"] = choices[0]
        else:
            kwargs.update(type=value_type)
        groups[section_name].add_argument(_flag_name(f), *f.metadata.get("aliases", ()), **kwargs)
    # REPA's --resume-step N: resume from that step's checkpoint.
    parser.add_argument("--resume-step", type=int, default=None, help="REPA alias: resume from this step")
    from repa.dropin import add_train_arguments

    add_train_arguments(parser)  # REPA / REPA-E flags that convert or are refused


def load_preset(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config preset {path} not found (presets live in configs/)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config preset {path} must be a mapping of sections")
    return values


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults, then the preset, then the flags that were given."""
    values: dict[str, dict] = {}
    if getattr(args, "config", None):
        values = {k: dict(v or {}) for k, v in load_preset(args.config).items()}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            values.setdefault(section, {})[name] = value
    if getattr(args, "resume_step", None) is not None:
        # REPA's --resume-step 0 (its default) starts from scratch
        values.setdefault("run", {})["resume"] = f"step:{args.resume_step}" if args.resume_step else "none"
    from repa.dropin import DEST, apply_train_flags

    apply_train_flags(values, values.pop(DEST.rstrip("."), {}))  # the "dropin.NAME" dests
    return ExperimentConfig.from_dict(values).validate()


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_reference_markdown() -> str:
    """The README's configuration reference: one row per flag, generated from the dataclasses."""
    lines = ["| flag | aliases | default | section | meaning |", "|---|---|---|---|---|"]
    for section_name, f in iter_options():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        aliases = ", ".join(f"`{a}`" for a in f.metadata.get("aliases", ()))
        # A bare | would split the table cell.
        help_text = _help(SECTIONS[section_name], f).replace("|", "\\|")
        cells = [f"`{_flag_name(f)}`", aliases, f"`{json.dumps(default)}`", section_name, help_text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())
