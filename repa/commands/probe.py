"""`repa probe RUN_OR_CHECKPOINT --encoder NAME --data SHARDS [--output DIR]`: REPA's alignment
analysis for any checkpoint (baselines included): per SiT layer and noise level, CKNNA between
the SiT's hidden tokens and the encoder's, and linear-probe accuracy of the pooled hidden states,
plotted with the layer on the x axis (repa.eval.probe).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="run directory, checkpoint or weights"
    )
    parser.add_argument(
        "--encoder",
        required=True,
        help="the yardstick: a registered encoder (dinov2-b, needs its weights), a local encoder "
        "file, or NAME:random",
    )
    parser.add_argument(
        "--data", required=True, help="labelled images: shards (folder, pattern) or an image folder"
    )
    parser.add_argument("--output", default="probe", help="folder for probe.json/csv/png (default probe)")
    parser.add_argument("--num-images", type=int, default=1024, help="images probed (default 1024)")
    parser.add_argument(
        "--noise-levels",
        default="0,0.25,0.5,0.75",
        help="comma-separated t (t=0 data, t=1 noise; default 0,0.25,0.5,0.75)",
    )
    parser.add_argument("--knn", type=int, default=10, help="CKNNA's nearest neighbours (default 10, REPA's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="noise draws and the probe's train/test split")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    from repa.eval.probe import probe_checkpoint

    try:
        levels = [float(t) for t in args.noise_levels.split(",") if t.strip()]
    except ValueError as error:
        raise ValueError(f"--noise-levels {args.noise_levels!r}: expected numbers like 0,0.5") from error
    if not levels or any(not 0.0 <= t <= 1.0 for t in levels):
        raise ValueError(f"--noise-levels {args.noise_levels!r}: each t must be in [0, 1]")
    result = probe_checkpoint(
        args.checkpoint,
        encoder=args.encoder,
        data=args.data,
        output=args.output,
        num_images=args.num_images,
        noise_levels=levels,
        topk=args.knn,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    print(f"probe of {result.num_images} images against {result.encoder}:")
    print(f"{'t':>6} {'best CKNNA (layer)':>20} {'best probe acc (layer)':>24}")
    for t in dict.fromkeys(r["t"] for r in result.rows):
        at_t = [r for r in result.rows if r["t"] == t]
        best_align = max(at_t, key=lambda r: r["cknna"])
        best_probe = max(at_t, key=lambda r: r["linear_probe"])
        print(
            f"{t:>6g} {best_align['cknna']:>13.3f} ({best_align['layer']:>2}) "
            f"{best_probe['linear_probe']:>17.1%} ({best_probe['layer']:>2})"
        )
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0
