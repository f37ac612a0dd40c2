"""CLIP score: how well images match their captions, 100 x max(cos(image, text), 0) averaged over
the pairs (the torchmetrics convention; Hessel et al.'s CLIPScore is 2.5 x the same cosine), with
the image and text embeddings of a CLIP model (default CLIP ViT-L/14) through `transformers`.

    model, processor = load_clip()                          # or load_clip("path/to/clip")
    captions = read_captions("samples.prompts.txt")
    score = clip_score(iter_npz_rows("samples.npz", 64), captions, model, processor)

`repa eval SAMPLES.npz --ref REF --clip-score` reads the captions `repa sample --prompts` /
`--captions-from` writes beside the samples. Missing weights stop with a message naming the flag;
random weights are never substituted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

CLIP_SOURCE = "openai/clip-vit-large-patch14"


def load_clip(weights: str | None = None, device: torch.device | str = "cpu"):
    """(CLIPModel in eval mode, CLIPProcessor) from a local transformers folder (`weights`,
    --clip-weights) or the Hugging Face cache / hub (CLIP ViT-L/14)."""
    import transformers

    from repa.text.encoders import _hub_offline

    if weights is not None and not os.path.isdir(weights):
        raise FileNotFoundError(f"--clip-weights {weights}: not a folder (a transformers CLIPModel folder)")
    source = weights or CLIP_SOURCE
    local_only = weights is not None or _hub_offline()
    try:
        processor = transformers.CLIPProcessor.from_pretrained(source, local_files_only=local_only)
        model = transformers.CLIPModel.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise FileNotFoundError(
            f"the CLIP score needs CLIP weights; tried {source} ({reason}). Pass --clip-weights DIR (a "
            f"transformers folder with a CLIPModel, its tokenizer and image processor) or put {CLIP_SOURCE} "
            "in the Hugging Face cache (huggingface-cli download, with the hub reachable)"
        ) from err
    return model.eval().requires_grad_(False).to(device), processor


def read_captions(path: str | os.PathLike) -> list[str]:
    """One caption per line (the samples' OUTPUT.prompts.txt), blank lines kept as captions."""
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()


@torch.no_grad()
def clip_score(
    images: Iterable[np.ndarray], captions: list[str], model, processor, device: torch.device | str = "cpu"
) -> float:
    """Mean of 100 x max(cos, 0) over (image, caption) pairs; `images`: batches of uint8
    (b, H, W, 3) in the captions' order (e.g. iter_npz_rows)."""
    scores, offset = [], 0
    for batch in images:
        texts = captions[offset : offset + len(batch)]
        if len(texts) != len(batch):
            raise ValueError(f"more images than captions ({len(captions)})")
        offset += len(batch)
        inputs = processor(
            text=texts,
            images=[np.array(image) for image in batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
        ).to(device)
        image_features = _projected(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text_features = _projected(
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )  # (b, E) each
        scores.append(100 * F.cosine_similarity(image_features, text_features).clamp(min=0))
    if offset != len(captions):
        raise ValueError(f"{offset} images but {len(captions)} captions")
    return float(torch.cat(scores).mean())


def _projected(output) -> torch.Tensor:
    """The projected embeddings (b, E): transformers 4 returns them, 5 as the output's pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
