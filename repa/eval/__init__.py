"""Evaluation: sample checkpoints (distributed, into ADM's .npz), score them, draw FID curves.

sample       per-sample seeds and class-balanced labels, chunked resumable sampling, the .npz
metrics      FID / sFID / IS / precision-recall / FD-DINOv2 (torch-fidelity's extractors)
frechet      the one Fréchet distance (float64) and streaming feature moments
features     feature spaces: Inception, DINOv2, or any callable (the CPU demo's network)
references   image sets (npz, folders, shards), precomputed statistics and their cache
checkpoints  rebuild a SiT + tokenizer from a run, a checkpoint folder or a published file
curves       metric vs training step for several runs, the speed-up over a baseline
Eval reads checkpoints; it never imports the training loop.
"""

from repa.eval.checkpoints import Generator, load_generator, resolve_checkpoint
from repa.eval.curves import (
    build_curves,
    evaluate_checkpoint,
    evaluate_generator,
    evaluate_model,
    speedup_table,
)
from repa.eval.features import CallableFeatures, DinoV2Features, InceptionFeatures, create_feature_space
from repa.eval.frechet import FeatureMoments, Gaussian, frechet_distance, gaussian_of
from repa.eval.metrics import METRICS, Evaluator, evaluate_npz, parse_metrics
from repa.eval.references import ReferenceStats, iter_image_batches
from repa.eval.sample import (
    SamplerSettings,
    class_labels,
    generate_images,
    merge_chunks,
    sample_chunks,
    sample_seed,
    sample_to_npz,
)

__all__ = [
    "METRICS",
    "CallableFeatures",
    "DinoV2Features",
    "Evaluator",
    "FeatureMoments",
    "Gaussian",
    "Generator",
    "InceptionFeatures",
    "ReferenceStats",
    "SamplerSettings",
    "build_curves",
    "class_labels",
    "create_feature_space",
    "evaluate_checkpoint",
    "evaluate_generator",
    "evaluate_model",
    "evaluate_npz",
    "frechet_distance",
    "gaussian_of",
    "generate_images",
    "iter_image_batches",
    "load_generator",
    "merge_chunks",
    "parse_metrics",
    "resolve_checkpoint",
    "sample_chunks",
    "sample_seed",
    "sample_to_npz",
    "speedup_table",
]
