"""`repa flops NAME [NAME ...] [--resolution R]`: parameters and forward GFLOPs as a table."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="model names such as SiT-XL/2 or DiT-B/4")
    parser.add_argument(
        "--resolution", type=int, default=256, help="image resolution in pixels (default 256)"
    )
    parser.add_argument(
        "--latent-downsample", type=int, default=8, help="tokenizer downsampling factor (default 8)"
    )
    parser.add_argument("--latent-channels", type=int, default=4, help="latent channels (default 4, SD-VAE)")
    parser.add_argument("--num-classes", type=int, default=1000)


def run(args: argparse.Namespace) -> int:
    from repa.analysis.flops import model_cost

    header = (
        f"{'name':<12} {'resolution':>10} {'latent':>7} {'params (M)':>11} {'GFLOPs':>9} {'adaLN share':>12}"
    )
    print(
        "FLOPs count one multiply-add as one FLOP (the DiT paper's convention); one image, one forward pass."
    )
    print(header)
    print("-" * len(header))
    for name in args.names:
        cost = model_cost(
            name,
            resolution=args.resolution,
            latent_downsample=args.latent_downsample,
            latent_channels=args.latent_channels,
            num_classes=args.num_classes,
        )
        print(
            f"{cost.name:<12} {cost.resolution:>10} {cost.latent_size:>7} {cost.parameters / 1e6:>11.1f} "
            f"{cost.flops / 1e9:>9.2f} {cost.adaln_share:>11.1%}"
        )
    return 0
