"""`repa eval SAMPLES.npz --ref REF [--metrics fid,is,prc,fd-dinov2]`: sample-quality metrics."""

from __future__ import annotations

import argparse


def add_evaluator_arguments(parser: argparse.ArgumentParser, default_metrics: str = "fid") -> None:
    """Metric and feature-extractor flags shared by `repa eval` and `repa curves`."""
    parser.add_argument(
        "--ref",
        required=True,
        help="reference images (.npz arr_0, folder, shards) or statistics (ADM's mu/sigma .npz, cache file)",
    )
    parser.add_argument(
        "--metrics",
        default=default_metrics,
        help=f"comma list of fid,sfid,is,prc,fd-dinov2 (default {default_metrics})",
    )
    parser.add_argument("--inception-weights", default=None, help="Inception weights file or folder")
    parser.add_argument(
        "--inception-sha256",
        default=None,
        help="expected SHA-256 (or prefix) of the Inception weights; 'none' skips the check "
        "(default: the published file's)",
    )
    parser.add_argument("--dinov2-weights", default=None, help="DINOv2 ViT-L/14 weights file (FD-DINOv2)")
    parser.add_argument(
        "--cache-dir", default=None, help="reference statistics cache (default ~/.cache/repa/eval)"
    )
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument(
        "--feature-batch-size", type=int, default=64, help="images per feature-extractor batch"
    )


def evaluator_from_args(args: argparse.Namespace):
    from repa.eval.features import INCEPTION_SHA256_PREFIX
    from repa.eval.metrics import Evaluator

    sha256 = args.inception_sha256 or INCEPTION_SHA256_PREFIX
    return Evaluator(
        args.metrics,
        inception_weights=args.inception_weights,
        inception_sha256=None if sha256.lower() == "none" else sha256,
        dinov2_weights=args.dinov2_weights,
        batch_size=args.feature_batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "samples", metavar="SAMPLES", help="samples: .npz (arr_0 uint8 NHWC), folder or shards"
    )
    add_evaluator_arguments(parser)
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--clip-score",
        action="store_true",
        help="text models: also the CLIP score of each sample and its caption (SAMPLES.prompts.txt, "
        "written by repa sample --prompts / --captions-from); needs CLIP weights",
    )
    parser.add_argument(
        "--clip-weights",
        default=None,
        metavar="DIR",
        help="--clip-score: a transformers CLIPModel folder (default: openai/clip-vit-large-patch14 from "
        "the Hugging Face cache)",
    )


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    results = evaluator_from_args(args).evaluate(args.samples, args.ref)
    if args.clip_score:
        results["clip_score"] = clip_score_of(args)
    for name, value in results.items():
        print(f"{name:>12}: {value:.6g}" if isinstance(value, float) else f"{name:>12}: {value}")
    if args.output:
        record = {"samples": args.samples, "ref": args.ref, "metrics": results}
        Path(args.output).write_text(json.dumps(record, indent=1))
    return 0


def clip_score_of(args: argparse.Namespace) -> float:
    """The CLIP score of SAMPLES.npz against the captions beside it (SAMPLES.prompts.txt)."""
    from repa.eval.clip_score import clip_score, load_clip, read_captions
    from repa.eval.npz import iter_npz_rows
    from repa.eval.sample import prompts_path_for

    captions_path = prompts_path_for(args.samples)
    if not args.samples.endswith(".npz") or not captions_path.is_file():
        raise ValueError(
            f"--clip-score needs a text model's samples: a .npz with its captions beside it "
            f"({captions_path}), as repa sample --prompts / --captions-from writes them"
        )
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_clip(args.clip_weights, device)
    batches = iter_npz_rows(args.samples, args.feature_batch_size)
    return clip_score(batches, read_captions(captions_path), model, processor, device)
