"""`repa data synthetic | build | verify | inspect`: make, check and look at webdataset shards."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    actions.required = True

    synthetic = actions.add_parser("synthetic", help="write a class-conditional synthetic image folder")
    synthetic.add_argument("output", metavar="OUT", help="folder to write (ImageNet layout)")
    synthetic.add_argument("--num-images", type=int, required=True)
    synthetic.add_argument("--resolution", type=int, required=True)
    synthetic.add_argument("--num-classes", type=int, default=10)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument(
        "--captioned",
        action="store_true",
        help="images with captions naming shape, colour, texture, position (COCO-style captions.json)",
    )

    build = actions.add_parser("build", help="centre-crop images into tar shards (+ optional caches)")
    build.add_argument("source", metavar="SRC", help="ImageNet-layout folder, image folder, or tar shards")
    build.add_argument("output", metavar="OUT", help="output folder for shards and manifest.json")
    build.add_argument("--resolution", type=int, required=True)
    build.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    build.add_argument("--workers", type=int, default=4, help="image-processing worker processes")
    build.add_argument("--labels", default=None, help="CSV/JSON labels file for a flat image folder")
    build.add_argument(
        "--captions", default=None, metavar="FILE.json", help="COCO-style captions JSON for the image folder"
    )
    build.add_argument("--prefix", default="train", help="shard name prefix (PREFIX-000000.tar)")
    build.add_argument("--shuffle-seed", type=int, default=0, help="fixed permutation of samples over shards")
    build.add_argument("--cache-latents", metavar="TOKENIZER", default=None, help="store VAE moments")
    build.add_argument("--latent-dtype", choices=("float32", "float16"), default="float32")
    build.add_argument("--cache-features", metavar="ENCODER", default=None, help="store encoder tokens")
    build.add_argument(
        "--cache-flipped-features", action="store_true", help="also store tokens of the flipped image"
    )
    build.add_argument(
        "--with-class-token",
        action="store_true",
        help="cached features hold the encoder's class token first, (1 + T, D), as --method reg reads them",
    )
    build.add_argument("--encode-batch-size", type=int, default=64)
    build.add_argument(
        "--ignore-disk-space",
        action="store_true",
        help="build even when the estimated output is larger than the free space of OUT's device",
    )
    build.add_argument(
        "--cache-text",
        metavar="ENCODER",
        default=None,
        help="store each caption's token embeddings and mask (fp16): clip-l, t5-xxl or minilm",
    )
    build.add_argument(
        "--text-encoder-weights",
        metavar="DIR",
        default=None,
        help="local transformers folder for --cache-text",
    )

    verify = actions.add_parser("verify", help="decode every sample; check counts and sha256")
    verify.add_argument("shards", metavar="SHARDS", help="shard folder, manifest or brace pattern")

    inspect = actions.add_parser("inspect", help="print a summary and write an image grid")
    inspect.add_argument("shards", metavar="SHARDS", help="shard folder, manifest or brace pattern")
    inspect.add_argument("--grid", default="inspect_grid.png", help="where to write the image grid")
    inspect.add_argument("--num-images", type=int, default=64)


def _device() -> str:
    import torch

    try:
        from accelerate import PartialState

        return str(PartialState().device)
    except ImportError:
        return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    if args.data_action == "synthetic" and args.captioned:
        from repa.text.synthetic import CAPTIONS_FILE, IMAGE_FOLDER, write_captioned_dataset

        counts = write_captioned_dataset(
            args.output, num_images=args.num_images, resolution=args.resolution, seed=args.seed
        )
        print(
            f"wrote {counts['images']} images with {counts['captions']} captions to {args.output}; build "
            f"shards with: repa data build {args.output}/{IMAGE_FOLDER} SHARDS --captions "
            f"{args.output}/{CAPTIONS_FILE}"
        )
        return 0

    if args.data_action == "synthetic":
        from repa.data.synthetic import write_synthetic_dataset

        counts = write_synthetic_dataset(
            args.output,
            num_images=args.num_images,
            resolution=args.resolution,
            num_classes=args.num_classes,
            seed=args.seed,
        )
        print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.output}")
        return 0

    if args.data_action == "build":
        from repa.data.build import build_shards

        tokenizer = encoder = None
        if args.cache_latents or args.cache_features:
            device = _device()
            if args.cache_latents:
                from repa.tokenizers import create_tokenizer

                tokenizer = create_tokenizer(args.cache_latents)
                tokenizer = tokenizer.to(device) if hasattr(tokenizer, "to") else tokenizer
            if args.cache_features:
                from repa.encoders import create_encoder

                encoder = create_encoder(args.cache_features, resolution=args.resolution)
                encoder = encoder.to(device) if hasattr(encoder, "to") else encoder
                if args.with_class_token:
                    from repa.encoders import ClassTokenFirst

                    encoder = ClassTokenFirst(encoder)
        if args.with_class_token and not args.cache_features:
            raise ValueError(
                "--with-class-token stores the class token with the features: add --cache-features"
            )
        text_encoder = None
        if args.cache_text:
            from repa.text import create_text_encoder

            text_encoder = create_text_encoder(args.cache_text, weights=args.text_encoder_weights).to(
                _device()
            )
        elif args.text_encoder_weights:
            raise ValueError("--text-encoder-weights is for --cache-text ENCODER, which is not given")
        result = build_shards(
            args.source,
            args.output,
            resolution=args.resolution,
            shard_size=args.shard_size,
            workers=args.workers,
            labels_file=args.labels,
            captions_file=args.captions,
            text_encoder=text_encoder,
            prefix=args.prefix,
            shuffle_seed=args.shuffle_seed,
            tokenizer=tokenizer,
            encoder=encoder,
            latent_dtype=args.latent_dtype,
            cache_flipped_features=args.cache_flipped_features,
            encode_batch_size=args.encode_batch_size,
            on_estimate=lambda estimate, free: print(estimate.describe(free), flush=True),
            ignore_disk_space=args.ignore_disk_space,
        )
        print(
            f"{result.num_samples} samples -> {args.output}/{result.pattern} "
            f"({len(result.shards_written)} shards written, {len(result.shards_skipped)} already complete)"
        )
        if result.manifest_path:
            print(f"manifest: {result.manifest_path}")
        return 0

    if args.data_action == "verify":
        from repa.data.verify import verify_shards

        report = verify_shards(args.shards)
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        print(f"{report.num_shards} shards, {report.num_samples} good samples: {status}")
        return 0 if report.ok else 1

    if args.data_action == "inspect":
        from repa.data.verify import inspect_shards

        print(inspect_shards(args.shards, args.grid, num_images=args.num_images))
        return 0
    raise ValueError(f"unknown data action {args.data_action!r}")
