"""`repa flops NAME [NAME ...] [--resolution R]`: parameters and forward GFLOPs as a table.

NAME is a diffusion model (SiT-XL/2, DiT-B/4, ...) or a tokenizer (sd-vae-ft-mse, f16d32, ...);
tokenizers are reported as their encoder and decoder halves.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="+", metavar="NAME", help="model names (SiT-XL/2, DiT-B/4) or tokenizers"
    )
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
    from repa.models import list_models
    from repa.tokenizers import list_tokenizers
    from repa.tokenizers.flops import tokenizer_flops

    rows = []  # computed first, so a bad name fails before anything is printed
    for name in args.names:
        if name in list_tokenizers() and name != "pixels":
            halves = tokenizer_flops(name, resolution=args.resolution)
            for half in ("encoder", "decoder"):
                rows.append((f"{name} {half}", args.resolution, "", None, halves[half], None))
            rows.append(
                (f"{name} total", args.resolution, "", None, halves["encoder"] + halves["decoder"], None)
            )
        elif name in list_models():
            cost = model_cost(
                name,
                resolution=args.resolution,
                latent_downsample=args.latent_downsample,
                latent_channels=args.latent_channels,
                num_classes=args.num_classes,
            )
            rows.append(
                (name, cost.resolution, cost.latent_size, cost.parameters, cost.flops, cost.adaln_share)
            )
        else:
            choices = [*list_models(), *(t for t in list_tokenizers() if t != "pixels")]
            raise ValueError(f"unknown model or tokenizer {name!r}; choose from: {', '.join(choices)}")

    header = (
        f"{'name':<22} {'resolution':>10} {'latent':>7} {'params (M)':>11} {'GFLOPs':>9} {'adaLN share':>12}"
    )
    print(
        "FLOPs count one multiply-add as one FLOP (the DiT paper's convention); one image, one forward pass."
    )
    print(header)
    print("-" * len(header))
    for name, resolution, latent, params, flops, adaln in rows:
        params_text = f"{params / 1e6:.1f}" if params is not None else ""
        adaln_text = f"{adaln:.1%}" if adaln is not None else ""
        gflops = flops / 1e9
        print(f"{name:<22} {resolution:>10} {latent!s:>7} {params_text:>11} {gflops:>9.2f} {adaln_text:>12}")
    return 0
