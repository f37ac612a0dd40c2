"""Frozen text encoders for text-to-image training: captions -> token embeddings + mask.

    encoder = create_text_encoder("minilm")                      # or "clip-l", "t5-xxl"
    embeddings, mask = encoder.encode(["a red circle"])          # (1, L, D) float32, (1, L) bool

`repa data build --cache-text NAME` stores these per caption, so training never runs them.
"""

from .encoders import (
    TEXT_ENCODERS,
    WEIGHTS_FLAG,
    TextEncoder,
    TextEncoderSpec,
    create_text_encoder,
    get_text_encoder_spec,
    list_text_encoders,
    register_text_encoder,
)

__all__ = [
    "TEXT_ENCODERS",
    "WEIGHTS_FLAG",
    "TextEncoder",
    "TextEncoderSpec",
    "create_text_encoder",
    "get_text_encoder_spec",
    "list_text_encoders",
    "register_text_encoder",
]
