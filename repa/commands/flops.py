"""`repa flops NAME [NAME ...] [--resolution R] [model options]`: parameters and forward GFLOPs.

NAME is a diffusion model (SiT-XL/2, DiT-B/4, LightningDiT-XL/1, ...) or a tokenizer
(sd-vae-ft-mse, f16d32, ...); tokenizers are reported as their encoder and decoder halves.
Model options (--adaln single, --swiglu, --rmsnorm, --rope, --qk-norm, --wo-shift, --context-dim,
--tread) add a row per model with the options, under the row of the model as registered:

    repa flops SiT-XL/2 --adaln single
    repa flops SiT-XL/2 --tread 0.5            # a TREAD training pass, route 2 -> depth - 4
    repa flops SiT-XL/2 --adaln single --context-dim 4096 --num-classes 0   # PixArt-style text model
"""

from __future__ import annotations

import argparse
from typing import get_args

from repa.config import AdaLNMode, parse_bool

# Boolean architecture options: SiTConfig field = flag without dashes.
MODEL_SWITCHES = {
    "--swiglu": "SwiGLU FFN",
    "--rmsnorm": "RMSNorm with a learned scale",
    "--rope": "2-D RoPE on queries and keys",
    "--qk-norm": "qk-norm",
    "--wo-shift": "adaLN without shifts",
}


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
    options = parser.add_argument_group(
        "model options (each model is printed as registered and, below it, with these)"
    )
    options.add_argument("--adaln", choices=get_args(AdaLNMode), default=None, help="adaLN: block or single")
    for flag, help_text in MODEL_SWITCHES.items():
        options.add_argument(
            flag, nargs="?", const=True, default=None, type=parse_bool, metavar="BOOL", help=help_text
        )
    options.add_argument(
        "--context-dim",
        type=int,
        default=None,
        help="cross-attention to a context of this width (T5-XXL: 4096), counted at --context-length tokens",
    )
    options.add_argument(
        "--context-length", type=int, default=None, help="context tokens (default 120, PixArt's T5 captions)"
    )
    options.add_argument(
        "--tread",
        dest="tread_ratio",
        type=float,
        default=None,
        metavar="RATIO",
        help="TREAD: fraction of tokens routed around blocks --tread-start..--tread-end; the row counts a "
        "training forward pass (sampling is unchanged)",
    )
    options.add_argument(
        "--tread-start", type=int, default=None, help="first routed block, 0-based (default 2)"
    )
    options.add_argument(
        "--tread-end",
        type=int,
        default=None,
        help="last routed block, 0-based, inclusive (default depth - 4)",
    )


def model_options(args: argparse.Namespace) -> dict:
    """SiTConfig overrides from the option flags that were given."""
    options = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in MODEL_SWITCHES
    }
    options["adaln"] = args.adaln
    for name in ("context_dim", "context_length", "tread_ratio", "tread_start", "tread_end"):
        options[name] = getattr(args, name)
    return {key: value for key, value in options.items() if value is not None}


def _label(name: str, options: dict) -> str:
    words = [
        key.replace("_", "-") if value is True else f"{key.replace('_', '-')}={str(value).lower()}"
        for key, value in options.items()
    ]
    return f"{name} {' '.join(words)}"


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
                rows.append((f"{name} {half}", args.resolution, "", None, halves[half], None, None, None))
            total = halves["encoder"] + halves["decoder"]
            rows.append((f"{name} total", args.resolution, "", None, total, None, None, None))
        elif name in list_models():
            options = model_options(args)
            registered = None
            for label, overrides in [(name, {})] + ([(_label(name, options), options)] if options else []):
                cost = model_cost(
                    name,
                    resolution=args.resolution,
                    latent_downsample=args.latent_downsample,
                    latent_channels=args.latent_channels,
                    num_classes=args.num_classes,
                    **overrides,
                )
                if registered is None:
                    registered, changes = cost, (None, None)
                else:
                    changes = (cost.flops / registered.flops - 1, cost.parameters / registered.parameters - 1)
                rows.append(
                    (label, cost.resolution, cost.latent_size, cost.parameters, cost.flops, cost.adaln_share)
                    + changes
                )
        else:
            choices = [*list_models(), *(t for t in list_tokenizers() if t != "pixels")]
            raise ValueError(f"unknown model or tokenizer {name!r}; choose from: {', '.join(choices)}")

    width = max(22, *(len(row[0]) for row in rows))
    header = (
        f"{'name':<{width}} {'resolution':>10} {'latent':>7} {'params (M)':>11} {'GFLOPs':>9}"
        f" {'adaLN share':>12} {'GFLOPs vs registered':>21} {'params vs registered':>21}"
    )
    print(
        "FLOPs count one multiply-add as one FLOP (the DiT paper's convention); one image, one forward pass."
    )
    if args.tread_ratio:
        print(
            "Rows with tread count a training forward pass (TREAD routes in training only; sampling runs "
            "the plain\nnetwork). The backward pass scales the same way: the change is the "
            "training-FLOP change."
        )
    print(header)
    print("-" * len(header))
    for name, resolution, latent, params, flops, adaln, flops_change, change in rows:
        params_text = f"{params / 1e6:.1f}" if params is not None else ""
        adaln_text = f"{adaln:.1%}" if adaln is not None else ""
        change_text = f"{change:+.1%}" if change is not None else ""
        flops_change_text = f"{flops_change:+.1%}" if flops_change is not None else ""
        gflops = flops / 1e9
        line = (
            f"{name:<{width}} {resolution:>10} {latent!s:>7} {params_text:>11} {gflops:>9.2f}"
            f" {adaln_text:>12} {flops_change_text:>21} {change_text:>21}"
        )
        print(line.rstrip())
    return 0
