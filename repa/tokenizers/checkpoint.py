"""Reading VAE checkpoint files: wrappers, strict key checking, clear errors, where weights live.

Accepted file contents: a raw state dict, or one nested under a wrapper key ("vae" as in REPA-E training
checkpoints, "state_dict" as in LDM / VA-VAE releases, "model", "ema", "module", "autoencoder"), in
.pt/.pth/.ckpt (torch.load with weights_only=True; the argparse Namespace that REPA / REPA-E training
checkpoints store under "args" is allowed, so such a checkpoint is a VAE source too) or .safetensors.
Keys under "loss." (the LPIPS, discriminator and VF-loss modules that LDM-style training checkpoints
carry along) are dropped; every other key must match the architecture exactly.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

WRAPPER_KEYS = ("vae", "state_dict", "model", "ema", "module", "autoencoder")
DROPPED_PREFIXES = ("loss.",)


def default_cache_dir() -> Path:
    """Where tokenizer files are looked for by default: $REPA_TOKENIZER_CACHE or ~/.cache/repa/tokenizers."""
    return Path(os.environ.get("REPA_TOKENIZER_CACHE", Path.home() / ".cache" / "repa" / "tokenizers"))


def hub_offline() -> bool:
    """True when the user asked for no network (read at call time, unlike huggingface_hub's constant)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a .safetensors or torch checkpoint file into a dict, with a clear error if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):  # REPA-E's checkpoints keep "args"
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, wrong format, pickled objects...
        raise ValueError(
            f"could not read checkpoint {path} ({type(error).__name__}: {error}). The file may be "
            "truncated (an interrupted download?) or not a PyTorch/safetensors checkpoint; files holding "
            "pickled Python objects must be re-saved as a plain state dict."
        ) from error
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _strip_uniform_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def unwrap_state_dict(
    obj: Mapping, looks_right: Callable[[Mapping], bool], source: str = "checkpoint"
) -> dict:
    """Find the state dict for which `looks_right` holds: the object itself or one under a wrapper key
    (searched in WRAPPER_KEYS order, recursively). A uniform "module." prefix (DDP) is removed."""
    candidates: list[Mapping] = [obj]
    seen_wrappers = []
    while candidates:
        current = candidates.pop(0)
        if _is_tensor_dict(current):
            state_dict = _strip_uniform_prefix(dict(current), "module.")
            if looks_right(state_dict):
                return state_dict
        for key in WRAPPER_KEYS:
            if isinstance(current, Mapping) and isinstance(current.get(key), Mapping):
                seen_wrappers.append(key)
                candidates.append(current[key])
    top = list(obj.keys())[:8]
    raise ValueError(
        f"{source}: no autoencoder state dict found (top-level keys {top}, wrappers searched "
        f"{list(WRAPPER_KEYS)}, found {seen_wrappers}). Expected keys such as 'encoder.conv_in.weight'."
    )


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load with exact key and shape matching; the error names what is missing, unexpected or misshaped."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(DROPPED_PREFIXES)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:

        def show(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        if misshaped:
            problems.append(f"shape mismatches: {show(misshaped)}")
        raise ValueError(
            f"{source} does not match the {type(module).__name__} architecture; " + "; ".join(problems)
        )
    module.load_state_dict(state_dict, strict=True)


def stats_sibling(weights_path: str | os.PathLike) -> Path:
    """REPA-E's convention: `NAME.pt` -> `NAME-latents-stats.pt` in the same folder."""
    path = Path(weights_path)
    return path.with_name(f"{path.stem}-latents-stats.pt")
