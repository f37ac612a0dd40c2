"""Diffusion backbones: pure nn.Modules with a name registry (`create_model("SiT-XL/2")`)."""

from repa.models.sit import (
    MODELS,
    SiT,
    SiTConfig,
    config_for,
    convert_legacy_state_dict,
    create_model,
    list_models,
    load_state_dict_strict,
    register_model,
    unwrap_checkpoint,
)

__all__ = [
    "MODELS",
    "SiT",
    "SiTConfig",
    "config_for",
    "convert_legacy_state_dict",
    "create_model",
    "list_models",
    "load_state_dict_strict",
    "register_model",
    "unwrap_checkpoint",
]
