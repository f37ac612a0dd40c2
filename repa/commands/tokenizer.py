"""`repa tokenizer stats TOKENIZER --data SHARDS --output STATS.pt`: per-channel latent statistics."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="tokenizer_action", metavar="ACTION")
    actions.required = True
    stats = actions.add_parser(
        "stats",
        help="per-channel mean/std of a tokenizer's latents, written in REPA-E's -latents-stats.pt format",
    )
    stats.add_argument(
        "tokenizer", metavar="TOKENIZER", help="registered name (sd-vae-ft-mse, f8d4, ...) or path"
    )
    stats.add_argument(
        "--data", required=True, help="webdataset shards (folder, brace pattern, URL) or an image folder"
    )
    stats.add_argument("--output", required=True, help="stats file to write (e.g. NAME-latents-stats.pt)")
    stats.add_argument(
        "--tokenizer-weights", default=None, help="weights file or folder for a registered name"
    )
    stats.add_argument("--resolution", type=int, default=256)
    stats.add_argument("--batch-size", type=int, default=32)
    stats.add_argument(
        "--max-images", type=int, default=None, help="stop after this many images (default: all)"
    )
    stats.add_argument(
        "--posterior-mean", action="store_true", help="use the posterior mean instead of sampled latents"
    )
    stats.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    stats.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.tokenizers import compute_latent_stats, create_tokenizer, save_latent_stats
    from repa.tokenizers.stats import iter_stats_input

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = create_tokenizer(
        args.tokenizer, resolution=args.resolution, weights=args.tokenizer_weights, require_stats=False
    ).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stats = compute_latent_stats(
        tokenizer,
        iter_stats_input(args.data, args.resolution, args.batch_size),
        max_images=args.max_images,
        sample_posterior=not args.posterior_mean,
        generator=generator,
    )
    path = save_latent_stats(args.output, stats["mean"], stats["std"])
    print(f"{tokenizer.name}: {stats['num_images']} images, {tokenizer.latent_channels} channels -> {path}")
    print("mean:", " ".join(f"{v:.4f}" for v in stats["mean"].tolist()))
    print("std: ", " ".join(f"{v:.4f}" for v in stats["std"].tolist()))
    return 0
