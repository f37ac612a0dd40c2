"""`repa <verb> ...`: the command line.

Each verb lives in `repa/commands/<verb>.py` with two functions:
  add_arguments(parser)  declares its flags;
  run(args) -> int       translates them into typed configs and calls the library.
Verb modules are imported lazily so that `repa --help` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# verb -> (module under repa.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the whole research loop at toy scale on a CPU, offline"),
    "data": ("data", "build, verify and inspect webdataset shards; synthetic demo images"),
    "train": ("train", "train SiT / REPA / LDM models (accelerate or torchrun for many processes)"),
    "sample": ("sample", "sample a run or checkpoint into the ADM evaluator's .npz (resumable, multi-GPU)"),
    "eval": ("eval", "FID, sFID, IS, precision/recall, FD-DINOv2 of samples against a reference"),
    "curves": ("curves", "metric-vs-step curves of runs and the speed-up over a baseline run"),
    "flops": ("flops", "parameters and forward GFLOPs of models and tokenizers"),
    "probe": ("probe", "alignment diagnostics: CKNNA to an encoder and linear probes, per SiT layer"),
    "tokenizer": ("tokenizer", "tokenizer utilities: latent statistics in REPA-E's stats-file format"),
    "bench": ("bench", "training, sampling and data throughput side by side, written as JSON"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repa", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(f"repa.commands.{module_name}")
        # No prefix matching: a REPA flag such as --vae must never be read as another flag.
        verb_parser = subparsers.add_parser(verb, help=help_text, description=help_text, allow_abbrev=False)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Exception as error:
        # Bad flags, files or weights: say what is wrong without a traceback (REPA_DEBUG=1 shows
        # it). Only errors that repa raises on purpose (ValueError, FileNotFoundError and repa's
        # own error classes) are shortened; anything else is a bug and keeps its traceback.
        ours = type(error).__module__.startswith("repa.")
        deliberate = isinstance(error, (ValueError, FileNotFoundError)) or ours
        if os.environ.get("REPA_DEBUG") or not deliberate:
            raise
        print(f"repa {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
