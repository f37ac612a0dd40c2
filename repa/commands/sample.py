"""`repa sample RUN_OR_CHECKPOINT --num-samples N --output FILE.npz`: samples for the ADM evaluator.

Runs as one process or under `accelerate launch -m repa sample ...` / `torchrun -m repa sample ...`;
the sample set is the same either way, and an interrupted run resumes when rerun.
REPA's and REPA-E's generate.py flags work too (repa.dropin, docs/dropin.md).
"""

from __future__ import annotations

import argparse

from repa.config import PRECISIONS, parse_bool


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampler flags shared by `repa sample` and `repa curves` (defaults: REPA's published settings)."""
    group = parser.add_argument_group("sampler (defaults: REPA's SDE 250 steps, CFG 1.8 on [0, 0.7])")
    group.add_argument("--mode", choices=("sde", "ode"), default="sde", help="SDE (Euler-Maruyama) or ODE")
    group.add_argument("--method", choices=("euler", "heun"), default="euler", help="ODE integrator")
    group.add_argument("--num-steps", type=int, default=250, help="sampling steps (default 250)")
    group.add_argument("--cfg-scale", type=float, default=1.8, help="classifier-free guidance scale")
    group.add_argument(
        "--cls-cfg-scale",
        type=float,
        default=None,
        help="REG checkpoints: guidance scale of the generated class token, applied where the image's "
        "is (default: --cfg-scale; 0: none, as REG's flag)",
    )
    group.add_argument("--guidance-low", type=float, default=0.0, help="guidance interval start (t=0 data)")
    group.add_argument("--guidance-high", type=float, default=0.7, help="guidance interval end (t=1 noise)")
    group.add_argument(
        "--cfg-channels",
        type=int,
        default=None,
        metavar="N",
        help="guide only the first N latent channels, the rest take the conditional prediction "
        "(DiT, SiT, LightningDiT and PixArt use 3, so their CFG scales need it); default: all",
    )
    group.add_argument(
        "--time-shift",
        type=float,
        default=None,
        metavar="K",
        help="timestep shift: grid times t -> K t / (1 + (K - 1) t) (t=1 noise; K > 1 spends more steps "
        "at high noise, as SD3's shift); default: the run's --time-shift, else 1 (none)",
    )
    group.add_argument(
        "--timestep-shift",
        type=float,
        default=None,
        metavar="S",
        help="LightningDiT's timestep_shift, in its convention (t=1 data): --time-shift 1/S (0: none)",
    )
    group.add_argument(
        "--ddt-share",
        type=int,
        default=1,
        metavar="K",
        help="DDT checkpoints: run the condition encoder at every K-th model evaluation and reuse its "
        "output in between, only the decoder running (default 1: no sharing)",
    )
    group.add_argument(
        "--ddt-share-schedule",
        choices=("uniform", "dp"),
        default="uniform",
        help="which evaluations run the encoder with --ddt-share K: every K-th (uniform) or DDT's "
        "statistical choice of as many, measured once on 8 template samples (dp)",
    )
    group.add_argument(
        "--mixed-precision",
        "--precision",
        dest="precision",
        choices=PRECISIONS,
        default="auto",
        help="model precision; auto: bf16 where the GPU or CPU multiplies it natively, fp16 on older "
        "GPUs, else fp32 (REPA's published samples: fp32)",
    )
    group.add_argument("--labels", choices=("balanced", "random"), default="balanced", help="class labels")
    group.add_argument("--seed", type=int, default=0, help="seed of the whole sample set")
    group.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch, split across processes")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Overrides for checkpoints without a config (published REPA / REPA-E files)."""
    group = parser.add_argument_group("model (only needed for checkpoints without a config)")
    group.add_argument("--model", default=None, help="size name, e.g. SiT-XL/2 (inferred when unique)")
    group.add_argument("--tokenizer", default=None, help="decoding tokenizer, e.g. sd-vae-ft-ema or a path")
    group.add_argument("--tokenizer-weights", default=None, help="local tokenizer weights file or folder")
    group.add_argument("--tokenizer-stats", default=None, help="latents-stats file (REPA-E format)")
    group.add_argument("--path-type", choices=("linear", "cosine"), default=None, help="interpolant")
    group.add_argument(
        "--reverse-time",
        nargs="?",
        const=True,
        default=None,
        type=parse_bool,
        metavar="BOOL",
        help="the weights were trained with t=1 data and v = x - e (SiT/LightningDiT convention); "
        "default: yes for LightningDiT-* checkpoints without our config",
    )


def resolve_time_shift(args: argparse.Namespace, default: float = 1.0) -> float:
    """--time-shift K, or LightningDiT's --timestep-shift S (K = 1/S in our convention; S = 0: none),
    or `default` (the run's config)."""
    shift, theirs = args.time_shift, args.timestep_shift
    if shift is not None and theirs is not None:
        raise ValueError("give --time-shift or --timestep-shift (LightningDiT's, = 1/K), not both")
    if theirs is not None:
        if theirs < 0:
            raise ValueError(f"--timestep-shift must be >= 0 (0: none), got {theirs}")
        return 1.0 if theirs == 0 else 1.0 / theirs
    return default if shift is None else shift


def sampler_settings_from_args(args: argparse.Namespace, default_time_shift: float = 1.0):
    """The sampler the flags ask for; default_time_shift: the shift when no flag gives one."""
    from repa.eval.sample import SamplerSettings

    return SamplerSettings(
        mode=args.mode,
        method=args.method,
        num_steps=args.num_steps,
        cfg_scale=args.cfg_scale,
        guidance_low=args.guidance_low,
        guidance_high=args.guidance_high,
        precision=args.precision,
        cfg_channels=args.cfg_channels,
        cls_cfg_scale=args.cls_cfg_scale,
        time_shift=resolve_time_shift(args, default_time_shift),
        ddt_share=args.ddt_share,
        ddt_share_schedule=args.ddt_share_schedule,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repa.dropin import add_sample_arguments

    parser.add_argument(
        "source",
        nargs="?",
        metavar="RUN_OR_CHECKPOINT",
        help="run dir, checkpoint folder, or weights file (or REPA's --ckpt, REPA-E's --exp-path)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="images to sample (default 50000; with --prompts / --captions-from, one per caption)",
    )
    parser.add_argument("--output", default=None, help="the .npz to write (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("--checkpoint-step", type=int, default=None, help="step of a run (default: newest)")
    parser.add_argument("--grid", default=None, help="also save a PNG grid of the first 64 images")
    parser.add_argument(
        "--chunk-size", type=int, default=500, help="images per resumable chunk file (default 500)"
    )
    parser.add_argument("--keep-parts", action="store_true", help="keep the chunk files after merging")
    text = parser.add_argument_group("text models (docs/text_to_image.md)")
    text.add_argument(
        "--prompts",
        default=None,
        metavar="FILE.txt",
        help="one prompt per line, encoded by the run's text encoder (its shards' --cache-text); one image "
        "per prompt (--num-samples defaults to their count; more cycles through them); written beside "
        "the .npz as OUTPUT.prompts.txt",
    )
    text.add_argument(
        "--captions-from",
        default=None,
        metavar="SHARDS",
        help="sample the first caption of each image of these shards, from their cached embeddings "
        "(e.g. COCO val2014 built with the run's --cache-text)",
    )
    text.add_argument(
        "--text-encoder-weights",
        default=None,
        metavar="DIR",
        help="--prompts: a local transformers folder of the run's text encoder (default: packaged or hub)",
    )
    add_sampler_arguments(parser)
    add_model_arguments(parser)
    add_sample_arguments(parser)  # after the flags they alias, whose defaults stand


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from repa.dropin import check_architecture, resolve_sample_source, sample_batch_size, sample_output_path
    from repa.eval.checkpoints import load_generator
    from repa.eval.sample import sample_to_npz

    source = resolve_sample_source(args)
    output_path = sample_output_path(args, source["path"])
    if not output_path.endswith(".npz"):
        raise ValueError(f"--output must be a .npz file (the ADM evaluator's format), got {output_path}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    generator = load_generator(source.pop("path"), **source)
    check_architecture(generator, args)
    num_samples, labels = args.num_samples or 50_000, args.labels
    if args.prompts or args.captions_from:
        generator = with_text(generator, args)
        labels = "ordered"  # image i takes caption i mod N
        num_samples = args.num_samples or generator.num_classes  # default: one image per caption
    elif generator.text_conditioned:
        raise ValueError("this is a text model: give --prompts FILE.txt or --captions-from SHARDS")
    # the model's own timestep shift (its config's --time-shift) unless a flag gives one
    time_shift = generator.config.transport.time_shift if generator.config is not None else 1.0
    output = sample_to_npz(
        generator,
        output_path,
        num_samples=num_samples,
        settings=sampler_settings_from_args(args, time_shift),
        seed=args.seed,
        labels=labels,
        batch_size=sample_batch_size(args, int(os.environ.get("WORLD_SIZE", "1"))),
        chunk_size=args.chunk_size,
        grid=args.grid,
        keep_parts=args.keep_parts,
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {output} ({num_samples} samples, step {generator.step})")
    return 0


def with_text(generator, args: argparse.Namespace):
    """The generator sampling --prompts (encoded now) or --captions-from's cached captions."""
    from repa.eval.captions import captions_from_shards, encode_prompts, read_prompts, run_text_encoder

    if args.prompts and args.captions_from:
        raise ValueError("give --prompts FILE.txt or --captions-from SHARDS, not both")
    if args.prompts:
        prompts = read_prompts(args.prompts)
        encoder = run_text_encoder(generator.config, weights=args.text_encoder_weights)
        return generator.with_captions(*encode_prompts(encoder, prompts, generator.model), prompts)
    return generator.with_captions(*captions_from_shards(args.captions_from, None, generator.model))
