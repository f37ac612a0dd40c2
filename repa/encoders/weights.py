"""Getting encoder weights: from the hub (timm's loaders and cache), or from a local file.

Every path ends in the same strict load: the checkpoint is converted to timm's layout
(timm's own `checkpoint_filter_fn` reads the original DINOv2, OpenAI-CLIP and I-JEPA layouts and
resamples the position embedding to the model's grid, bicubic with antialias, exactly the call
REPA makes), unused classifier/pooling heads are dropped, and then every remaining key must
match the network by name and shape. Nothing here ever falls back to random weights.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from urllib.parse import urlparse

import torch
import torch.nn as nn

StateDict = dict[str, torch.Tensor]

# Parameters of pooling / classifier heads that the encoders never use (we keep patch tokens).
UNUSED_HEAD_PREFIXES = ("head.", "attn_pool.", "fc_norm.")


class EncoderWeightsError(RuntimeError):
    """Weights for an encoder are missing, unreadable or do not match its architecture."""


def read_state_dict_file(path: str, *, encoder_name: str) -> StateDict:
    """Read a .safetensors, torch.save'd (.pth/.pt/.tar) or TorchScript (OpenAI CLIP) checkpoint
    into a dict of tensors (possibly nested under 'model', 'state_dict', 'encoder', ... as published)."""
    if not os.path.isfile(path):
        raise EncoderWeightsError(f"weights file for encoder '{encoder_name}' not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(path, device="cpu")
        elif _is_torchscript_archive(path):
            # OpenAI ships CLIP as TorchScript (ViT-L-14.pt); its state dict holds 'visual.*' keys.
            with warnings.catch_warnings():  # torch.jit.load is deprecated; the file format is not
                warnings.simplefilter("ignore", FutureWarning)
                checkpoint = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, wrong format, pickled code objects, ...
        raise EncoderWeightsError(
            f"could not read weights file {path} for encoder '{encoder_name}' "
            f"({type(err).__name__}: {str(err)[:300]}). The file may be truncated or not a state dict: "
            f"expected .safetensors or a .pth/.pt written by torch.save(state_dict)."
        ) from err
    if not isinstance(checkpoint, dict):
        raise EncoderWeightsError(
            f"weights file {path} for encoder '{encoder_name}' holds a {type(checkpoint).__name__}, "
            "not a state dict"
        )
    return checkpoint


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def missing_weights_message(
    encoder_name: str, timm_name: str | None, source: str, weights_help: str, reason: str = ""
) -> str:
    """The message for 'no weights available', naming what is needed and how to supply it."""
    head = f"no pretrained weights for encoder '{encoder_name}'{f' ({reason})' if reason else ''}."
    tail = " Random weights are only built on explicit request (pretrained=False)."
    if timm_name is None:
        return (
            f"{head} Needed: {weights_help}; no hub hosts it. Pass the file with `--encoder-weights PATH` "
            f"(create_encoder(..., weights=PATH)).{tail}"
        )
    return (
        f"{head} Needed: {source}. Either pass a local file with `--encoder-weights PATH` "
        f"(create_encoder(..., weights=PATH)): {weights_help}; or fill a cache on a connected machine and "
        f"point to it with `--encoder-cache-dir DIR` (create_encoder(..., cache_dir=DIR); default caches: "
        f'HF_HOME for hub weights, TORCH_HOME for URL weights): python -c "import timm; '
        f"timm.create_model('{timm_name}', pretrained=True, cache_dir='DIR')\".{tail}"
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def download_state_dict(
    timm_name: str, *, encoder_name: str, cache_dir: str | None, weights_help: str
) -> StateDict:
    """Fetch (or read from the cache) the checkpoint timm names for `timm_name`
    ('architecture.tag'): a Hugging Face hub repository or a URL cached by torch.hub."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise EncoderWeightsError(
            f"timm has no pretrained weights named '{timm_name}' (encoder '{encoder_name}')"
        )
    if cfg.hf_hub_id:
        source = f"Hugging Face hub repository '{cfg.hf_hub_id}' (timm '{timm_name}')"
        try:
            filename = getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"  # timm's default name
            return timm.models.load_state_dict_from_hf(
                cfg.hf_hub_id, filename=filename, weights_only=True, cache_dir=cache_dir
            )
        except Exception as err:  # offline, not cached, network failure, auth
            reason = f"{type(err).__name__}: {str(err).split('. ')[0][:200]}"
            raise EncoderWeightsError(
                missing_weights_message(encoder_name, timm_name, source, weights_help, reason)
            ) from err
    if cfg.url:
        source = f"{cfg.url} (timm '{timm_name}')"
        model_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
        cached = os.path.join(model_dir, os.path.basename(urlparse(cfg.url).path))
        if _hub_offline() and not os.path.isfile(cached):
            # Do not even try the network: HF_HUB_OFFLINE=1 says there is none.
            raise EncoderWeightsError(
                missing_weights_message(
                    encoder_name, timm_name, source, weights_help, f"offline and {cached} absent"
                )
            )
        try:
            return torch.hub.load_state_dict_from_url(
                cfg.url, model_dir=model_dir, map_location="cpu", weights_only=True
            )
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err)[:200]}"
            raise EncoderWeightsError(
                missing_weights_message(encoder_name, timm_name, source, weights_help, reason)
            ) from err
    raise EncoderWeightsError(
        missing_weights_message(encoder_name, timm_name, f"timm '{timm_name}' lists no source", weights_help)
    )


def adapt_to_timm(
    checkpoint: StateDict, vit: nn.Module, *, pre_filter: Callable[[StateDict], StateDict] | None = None
) -> StateDict:
    """Convert a checkpoint to the timm VisionTransformer `vit`'s key layout and token grid."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if pre_filter is not None:
        checkpoint = pre_filter(checkpoint)
    # unwrap the nesting timm's filter also unwraps, and copy: the filter pops keys
    checkpoint = checkpoint.get("model", checkpoint)
    checkpoint = dict(checkpoint.get("state_dict", checkpoint))
    # timm's filter silently resamples a patch embedding of another patch size; that is a
    # different network, so refuse it instead.
    proj = getattr(vit.patch_embed, "proj", None)
    for key in ("patch_embed.proj.weight", "visual.conv1.weight"):
        if isinstance(proj, nn.Conv2d) and key in checkpoint and checkpoint[key].ndim == 4:
            theirs, ours = tuple(checkpoint[key].shape[-2:]), tuple(proj.weight.shape[-2:])
            if theirs != ours:
                raise EncoderWeightsError(f"checkpoint patch size {theirs} does not match the model's {ours}")
    state = checkpoint_filter_fn(checkpoint, vit)
    model_keys = set(vit.state_dict())
    return {k: v for k, v in state.items() if k in model_keys or not k.startswith(UNUSED_HEAD_PREFIXES)}


def load_strict(
    module: nn.Module, state: StateDict, *, encoder_name: str, origin: str, hint: str = ""
) -> None:
    """`module.load_state_dict(state, strict=True)` with a message that lists what differs."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:

        def summary(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"

        raise EncoderWeightsError(
            f"weights from {origin} do not match encoder '{encoder_name}' (strict key check): "
            f"missing {summary(missing)}; unexpected {summary(unexpected)}; "
            f"shape mismatches {summary(mismatched)}."
            f"{' ' + hint if hint else ''}"
        )
    if any(t.is_meta for t in expected.values()):
        # Built on the meta device (no random init): take the checkpoint's tensors, in float32.
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if leftover:
            raise EncoderWeightsError(f"encoder '{encoder_name}': tensors left uninitialised: {leftover[:4]}")
    else:
        module.load_state_dict(state, strict=True)


# ---- adapters for original checkpoints that timm's filter does not read ------------------------


def mocov3_to_timm(checkpoint: StateDict) -> StateDict:
    """MoCo v3 training checkpoint ({'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
    ...}}) -> the base encoder's ViT in timm layout. The projection head is dropped; REPA also renames
    two layers that some released files misname (blocks.13.norm13, blocks.13.mlp.fc13,
    blocks.14.norm14, blocks.14.mlp.fc14)."""
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "module.base_encoder."
    if not any(k.startswith(prefix) for k in state):
        return state  # already a plain ViT state dict
    misnamed = {
        "blocks.13.norm13.": "blocks.13.norm1.",
        "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
        "blocks.14.norm14.": "blocks.14.norm2.",
        "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2.",
    }
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # momentum encoder and predictor
        key = key[len(prefix) :]
        if key.startswith("head."):
            continue
        for wrong, right in misnamed.items():
            key = key.replace(wrong, right)
        out[key] = value
    return out
