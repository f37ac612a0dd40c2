"""Diffusion backbones: pure nn.Modules with a name registry (`create_model("SiT-XL/2")`)."""

from repa.models import sit as _sit
from repa.models.sit import (
    MODELS,
    SiT,
    SiTConfig,
    convert_legacy_state_dict,
    load_state_dict_strict,
    register_model,
    unwrap_checkpoint,
)


def _is_mmdit(name: str) -> bool:
    from repa.models.mmdit import MMDIT_MODELS

    return name in MMDIT_MODELS


def config_for(name: str, **overrides):
    """The validated configuration of a registered model (SiT-family or REPA's MMDiT-N), without
    building its weights; overrides are SiTConfig fields (for an MMDiT, see mmdit_config_for)."""
    if _is_mmdit(name):
        from repa.models.mmdit import mmdit_config_for

        return mmdit_config_for(name, **overrides)
    return _sit.config_for(name, **overrides)


def create_model(name: str, **overrides):
    """Build a registered model by name: the SiT family (repa.models.sit) or REPA's MMDiT-N
    (repa.models.mmdit), from the same keyword overrides (repa.config's model_overrides)."""
    if _is_mmdit(name):
        from repa.models.mmdit import MMDiT

        return MMDiT(config_for(name, **overrides))
    return _sit.create_model(name, **overrides)


def list_models() -> list[str]:
    from repa.models.mmdit import MMDIT_MODELS

    return _sit.list_models() + list(MMDIT_MODELS)


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
