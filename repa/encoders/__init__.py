"""Frozen representation encoders: name -> loaded, preprocessed, frozen.

    encoder = create_encoder("dinov2-b", resolution=256)        # hub weights (cache or download)
    tokens = encoder(images_uint8)                               # (B, 256, 768)
    encoders = create_encoders("dinov2-b,clip-l")                # one projector each; "none" -> []

Encoders are never trained and never saved with a run: they are rebuilt from their weights.
"""

from .base import ClassTokenFirst, FrozenEncoder, ViTEncoder, check_token_grid, encoder_input_size
from .local import build_local_vit, load_local_encoder, save_local_encoder
from .registry import (
    ENCODERS,
    NO_ENCODER,
    EncoderSpec,
    canonical_encoder_name,
    create_encoder,
    create_encoders,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)
from .weights import EncoderWeightsError

__all__ = [
    "ENCODERS",
    "ClassTokenFirst",
    "NO_ENCODER",
    "EncoderSpec",
    "EncoderWeightsError",
    "FrozenEncoder",
    "ViTEncoder",
    "build_local_vit",
    "canonical_encoder_name",
    "check_token_grid",
    "create_encoder",
    "create_encoders",
    "encoder_input_size",
    "get_encoder_spec",
    "list_encoders",
    "load_local_encoder",
    "register_encoder",
    "save_local_encoder",
]
