"""Rebuild a sampler-ready model from a run directory, a checkpoint folder or a published file.

    generator = load_generator("runs/repa-sit-xl2")                 # newest complete checkpoint
    generator = load_generator("runs/x", checkpoint_step=400_000)   # that step
    generator = load_generator("last.pt", tokenizer="sd-vae-ft-ema") # published REPA checkpoint
    images = generator.decode(latents)                               # uint8 (B, 3, H, W)

Sources, in order of preference for each fact:
  weights   RUN/checkpoints/step-N/ema.safetensors (only folders with COMPLETE.json count), or a
            .safetensors / .pt file (REPA's {"ema", "model", ...}; bare state dicts too).
  config    the safetensors metadata "config", a "config" entry of a .pt, or RUN/config.yaml.
            Without one (published checkpoints) the architecture is read off the state dict:
            patch size and channels from x_embedder.proj.weight, the latent size from pos_embed,
            num_classes = rows of y_embedder.embedding_table.weight - 1, depth from block keys,
            projector widths from projectors.k.{0,4}.weight, qk-norm and REPA-E's latent
            BatchNorm from their keys, LightningDiT's options from theirs (SwiGLU mlp.w12, RMSNorm
            norm1.weight, RoPE feat_rope.*, wo_shift from the adaLN width, adaLN-single t_block);
            the size name (heads) from --model or, when unique, from the registry entry with that
            depth, width and patch size (LightningDiT-* for LightningDiT's block, else SiT-*).
            --tokenizer is then required. A LightningDiT training file's own "config" (its YAML)
            is not ours: it only names the model (model_type) and says whether RoPE was on.
  time      weights without our config in LightningDiT's layout were trained with t=1 data
            (SiT's convention): the model is wrapped (SiTConfig.reverse_time) unless
            reverse_time=False is passed.
Integrity: a weights file inside a complete checkpoint whose COMPLETE.json records checksums
(ema.safetensors, and a tokenizer file such as REPA-E's e2e-vae.pt passed by path) is verified
before it is loaded; a mismatch is an error naming the file and the checkpoint, never a silent
fall-back to another checkpoint (repa.runs.verify_checkpoint_file).
Eval reads checkpoints through repa.runs (the layout); it never imports repa.train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from repa.runs import (
    COMPLETE,
    decode_tokenizer,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    parse_checkpoint_name,
    verify_checkpoint_file,
)

EMA_FILE = "ema.safetensors"


@dataclass
class Generator:
    """A SiT and the tokenizer that decodes its samples."""

    model: torch.nn.Module  # repa.models.SiT, eval mode
    tokenizer: torch.nn.Module  # repa.tokenizers.Tokenizer, frozen
    resolution: int  # image side in pixels
    path_type: str  # interpolant the model was trained with ("linear" | "cosine")
    weights_path: Path | None = None  # None for a model handed over in memory (periodic eval)
    step: int | None = None  # training step, when known
    run_dir: Path | None = None
    config: object | None = None  # repa.config.ExperimentConfig, when the checkpoint has one
    # a text model's captions to sample (with_captions): embeddings (N, L, D), mask (N, L) bool,
    # and their text; the sampler's labels are then rows of this table
    captions: tuple[torch.Tensor, torch.Tensor | None] | None = None
    caption_texts: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """The range of the sampler's labels: the classes, or the caption rows of a text model."""
        if self.captions is not None:
            return int(self.captions[0].shape[0])
        return self.model.config.num_classes

    @property
    def text_conditioned(self) -> bool:
        return bool(getattr(self.model.config, "context_dim", 0))

    def with_captions(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None, texts: list[str]
    ) -> Generator:
        """This generator sampling the given captions (a text model): label i = caption i."""
        if not self.text_conditioned:
            raise ValueError(
                "prompts and captions condition text models only; this model is class-conditional"
            )
        if embeddings.ndim != 3 or len(texts) != embeddings.shape[0]:
            raise ValueError(
                f"captions must be (N, L, D) with N texts, got {tuple(embeddings.shape)}, {len(texts)}"
            )
        return dataclasses.replace(self, captions=(embeddings, mask), caption_texts=list(texts))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.input_size, c.input_size)

    @property
    def identity(self) -> dict:
        """What identifies these weights in caches: path, size and modification time."""
        if self.weights_path is None:
            return {"weights": None, "step": self.step}
        stat = self.weights_path.stat()
        return {
            "weights": str(self.weights_path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }

    def to(self, device: torch.device | str) -> Generator:
        self.model.to(device)
        self.tokenizer.to(device)
        return self

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents (B, C, h, w) in the model's space -> uint8 images (B, 3, H, W), rounded."""
        from repa.tokenizers.base import float_to_images

        latents = latents.float()
        if getattr(self.model.config, "latent_batchnorm", False):
            # REPA-E: the SiT works on BatchNorm-normalised VAE latents; undo it with the EMA
            # running statistics, then decode the raw latents (the tokenizer's own scale is unused).
            images = float_to_images(self.tokenizer.decode_float(self.model.denormalize_latents(latents)))
        else:
            images = self.tokenizer.decode(latents)
        assert images.dtype == torch.uint8, "decoders must return rounded uint8 images"
        return images


# ---- locating the weights ------------------------------------------------------------------------


def resolve_checkpoint(
    path: str | os.PathLike, checkpoint_step: int | None = None
) -> tuple[Path, int | None]:
    """(weights file, training step or None) for a run dir, checkpoint folder or weights file."""
    path = Path(path)
    if path.is_file():
        return path, checkpoint_step
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory, checkpoint folder or weights file")
    if is_complete(path):
        return path / EMA_FILE, json.loads((path / COMPLETE).read_text())["step"]
    checkpoints_dir = path / "checkpoints"
    if not checkpoints_dir.is_dir():
        if parse_checkpoint_name(path.name) is not None:
            raise FileNotFoundError(
                f"{path} is an incomplete checkpoint (no {COMPLETE}): it was never committed"
            )
        raise FileNotFoundError(
            f"{path} is neither a run directory (no checkpoints/) nor a checkpoint folder"
        )
    found = list_checkpoints(checkpoints_dir)
    if checkpoint_step is None:
        latest = latest_checkpoint(checkpoints_dir)
        if latest is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint in {checkpoints_dir}")
        return latest / EMA_FILE, json.loads((latest / COMPLETE).read_text())["step"]
    for step, folder in found:
        if step == checkpoint_step:
            return folder / EMA_FILE, step
    available = ", ".join(str(step) for step, _ in found) or "none"
    raise FileNotFoundError(
        f"{path}: no complete checkpoint at step {checkpoint_step}; complete steps: {available}"
    )


def _run_dir_of(weights: Path) -> Path | None:
    folder = weights.parent
    if folder.parent.name == "checkpoints" and (folder.parent.parent / "config.yaml").is_file():
        return folder.parent.parent
    return None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(SiT state dict, config dict or None) from a .safetensors or .pt/.pth file, verified
    against its checkpoint's checksums when it is a file of one."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    verify_checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        config = json.loads(metadata["config"]) if "config" in metadata else None
        return load_file(str(path)), config
    # REPA pickles its argparse Namespace next to the weights; allow exactly that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    from repa.models import unwrap_checkpoint
    from repa.models.ddt import from_lightning_layout

    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    # DDT's Lightning files hold denoiser.*, ema_denoiser.* and the REPA projector side by side
    return from_lightning_layout(unwrap_checkpoint(checkpoint, prefer="ema")), config


def is_our_config(config: dict) -> bool:
    """Whether a checkpoint's config dict is an ExperimentConfig (not another code base's)."""
    from repa.config import SECTIONS

    return set(config) <= set(SECTIONS) and isinstance(config.get("model", {}), dict)


def foreign_model_hints(config: dict) -> dict:
    """What a LightningDiT training file's config (its YAML, saved as "config") says about the
    model: {"name": model_type when registered, "rope": use_rope}; {} for anything else."""
    from repa.models import MODELS

    model = config.get("model")
    if not isinstance(model, dict) or "model_type" not in model:
        return {}
    hints = {}
    if model["model_type"] in MODELS:
        hints["name"] = model["model_type"]
    if isinstance(model.get("use_rope"), bool):
        hints["rope"] = model["use_rope"]
    return hints


# ---- architecture from a state dict --------------------------------------------------------------


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> dict:
    """SiTConfig fields that the weights' shapes and key names determine."""
    from repa.models import convert_legacy_state_dict

    if "s_embedder.proj.weight" in state_dict:  # DDT's condition-encoder embedding
        from repa.models.ddt import infer_ddt_architecture

        return infer_ddt_architecture(state_dict)
    if "joint_blocks.0.x_block.attn.qkv.weight" in state_dict:  # REPA's MMDiT (repa.models.mmdit)
        return _infer_mmdit_architecture(state_dict)
    legacy_encoder_blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    if any(k.startswith("decoder_blocks.") for k in state_dict):
        state_dict = convert_legacy_state_dict(state_dict, align_depth=len(legacy_encoder_blocks))
    try:
        hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        class_token_dim = (
            int(state_dict["cls_projectors2.weight"].shape[1])
            if "cls_projectors2.weight" in state_dict
            else 0
        )
        num_tokens = state_dict["pos_embed"].shape[1] - (1 if class_token_dim else 0)  # REG: row 0
        null_context = state_dict.get("context_embedder.null_context")  # text models: (L, D)
        if null_context is None or "y_embedder.embedding_table.weight" in state_dict:
            table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        else:
            table_rows = 1  # a text model without labels (num_classes=0)
    except KeyError as error:
        raise ValueError(f"not a SiT state dict: missing {error}") from None
    grid = round(num_tokens**0.5)
    depth = len({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    projectors = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("projectors.")})
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    single = "t_block.1.weight" in state_dict
    modulation_key = "t_block.1.weight" if single else "blocks.0.adaLN_modulation.1.weight"
    if modulation_key not in state_dict:
        raise ValueError(f"not a SiT state dict: missing '{modulation_key}'")
    modulation = state_dict[modulation_key]
    architecture = dict(
        hidden_size=int(hidden),
        depth=depth,
        patch_size=int(patch),
        in_channels=int(in_channels),
        input_size=grid * int(patch),
        num_classes=int(table_rows) - 1,
        qk_norm=any(".attn.q_norm." in k for k in state_dict),
        latent_batchnorm="bn.running_mean" in state_dict,
        learn_sigma=out_features == 2 * patch * patch * in_channels,
        projector_out_dims=[int(state_dict[f"projectors.{k}.4.weight"].shape[0]) for k in projectors],
        swiglu=any(".mlp.w12." in k for k in state_dict),
        rmsnorm="blocks.0.norm1.weight" in state_dict,
        wo_shift=modulation.shape[0] == 4 * hidden,
        adaln="single" if single else "block",
        class_token_dim=class_token_dim,  # REG
    )
    if null_context is not None:  # cross-attention to text: width, caption length, null caption
        architecture.update(
            context_dim=int(null_context.shape[1]),
            context_length=int(null_context.shape[0]),
            # "fixed" and "learned" tables load alike; "empty" keeps the empty caption's mask too
            null_context="empty" if "context_embedder.null_context_mask" in state_dict else "learned",
        )
    if any(k.startswith("feat_rope.") for k in state_dict):
        architecture["rope"] = True  # without the tables the registered model decides
    if projectors:
        architecture["projector_dim"] = int(state_dict["projectors.0.0.weight"].shape[0])
        # The tap depth does not change the velocity; legacy files tell it, otherwise REPA's 8.
        architecture["align_depth"] = len(legacy_encoder_blocks) if legacy_encoder_blocks else min(8, depth)
    return architecture


def _infer_mmdit_architecture(state_dict: dict[str, torch.Tensor]) -> dict:
    """MMDiTConfig fields of an MMDiT state dict (heads and the tap depth come from the config)."""
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    projectors = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("projectors.")})
    architecture = dict(
        hidden_size=int(hidden),
        depth=len({int(k.split(".")[1]) for k in state_dict if k.startswith("joint_blocks.")}),
        patch_size=int(patch),
        in_channels=int(in_channels),
        input_size=round(state_dict["pos_embed"].shape[1] ** 0.5) * int(patch),
        num_classes=0,
        latent_batchnorm=False,
        context_dim=int(state_dict["context_embedder.weight"].shape[1]),
        projector_out_dims=[int(state_dict[f"projectors.{k}.4.weight"].shape[0]) for k in projectors],
    )
    if "null_context" in state_dict:  # learned; else the empty caption, from the shards
        architecture.update(context_length=int(state_dict["null_context"].shape[0]), null_context="learned")
    else:
        architecture["null_context"] = "empty"
    if projectors:
        architecture["projector_dim"] = int(state_dict["projectors.0.0.weight"].shape[0])
    return architecture


def infer_model_name(architecture: dict) -> str:
    """The registered name with this depth, width and patch size (heads come from it): a
    LightningDiT-* entry for weights with LightningDiT's block (SwiGLU or RMSNorm), else SiT-*."""
    from repa.models import MODELS

    family = "LightningDiT-" if architecture.get("swiglu") or architecture.get("rmsnorm") else "SiT-"
    if "ddt_encoder_depth" in architecture:  # DDT's keys (repa/models/ddt.py)
        if architecture["ddt_encoder_depth"] is None:
            raise ValueError(
                f"no registered DDT has depth {architecture['depth']}, width "
                f"{architecture['hidden_size']}: pass --model (the weights do not tell the split)"
            )
        family = "DDT-"
    matches = [
        name
        for name, defaults in MODELS.items()
        if name.startswith(family)
        and defaults.get("depth") == architecture["depth"]
        and defaults.get("hidden_size") == architecture["hidden_size"]
        and defaults.get("patch_size") == architecture["patch_size"]
        and defaults.get("ddt_encoder_depth", 0) == architecture.get("ddt_encoder_depth", 0)
    ]
    if len(matches) != 1:
        raise ValueError(
            f"cannot tell the model size of a checkpoint with depth {architecture['depth']}, width "
            f"{architecture['hidden_size']}, patch {architecture['patch_size']}: pass --model "
            f"(e.g. {family}XL/2)"
        )
    return matches[0]


# ---- the generator -------------------------------------------------------------------------------


def load_generator(
    path: str | os.PathLike,
    *,
    checkpoint_step: int | None = None,
    model: str | None = None,
    tokenizer: str | None = None,
    tokenizer_weights: str | None = None,
    tokenizer_stats: str | None = None,
    path_type: str | None = None,
    num_heads: int | None = None,
    reverse_time: bool | None = None,
    device: torch.device | str = "cpu",
) -> Generator:
    """Load the EMA SiT of a run / checkpoint / weights file and the tokenizer that decodes it.

    model, tokenizer, tokenizer_weights, tokenizer_stats: override the checkpoint's config; needed
    (tokenizer at least) for published checkpoints, which carry no config. A run's
    `decode_tokenizer` (REPA decodes with sd-vae-ft-ema) is used when set.
    path_type: the interpolant ("linear" | "cosine"); default from the config, else linear.
    num_heads: attention heads of a config-less checkpoint whose size is not registered (the
        weights do not tell the head count; registered sizes give it).
    reverse_time: whether the weights were trained with t=1 data (SiT/LightningDiT convention);
        default: yes for a checkpoint without our config that is a LightningDiT-* model (as
        named by its own config, --model or the registry), no otherwise.
    """
    from repa.models import create_model, load_state_dict_strict
    from repa.tokenizers import create_tokenizer

    weights_path, step = resolve_checkpoint(path, checkpoint_step)
    run_dir = _run_dir_of(weights_path)
    state_dict, config_dict = read_weights(weights_path)
    hints = {}
    if config_dict is not None and not is_our_config(config_dict):
        hints, config_dict = foreign_model_hints(config_dict), None
    if config_dict is None and run_dir is not None:
        import yaml

        config_dict = yaml.safe_load((run_dir / "config.yaml").read_text())
    architecture = infer_architecture(state_dict)

    config = None
    if config_dict is not None:
        from repa.config import ExperimentConfig

        config = ExperimentConfig.from_dict(config_dict)
        # the tokenizer the training latents came from (a REPA-E checkpoint's own VAE), unless told
        decoder = decode_tokenizer(config.to_dict(), weights_path.parent)
        if decoder["in_checkpoint"]:
            decoder["tokenizer"] = str(weights_path.parent / decoder["tokenizer"])
            decoder["stats"] = str(weights_path.parent / decoder["stats"])
        tokenizer_name = tokenizer or decoder["tokenizer"]
        tokenizer_weights = tokenizer_weights or (None if tokenizer else decoder["weights"])
        tokenizer_stats = tokenizer_stats or (None if tokenizer else decoder["stats"])
        resolution = config.data.resolution
        path_type = path_type or config.transport.path_type
    else:
        if tokenizer is None:
            raise ValueError(
                f"{weights_path} carries no config: pass --tokenizer (REPA decodes with sd-vae-ft-ema, "
                "REPA-E with its E2E-VAE file) and, if its size is ambiguous, --model"
            )
        tokenizer_name, resolution = tokenizer, None

    # e.g. a checkpoint's e2e-vae.pt (REPA-E), which decodes its samples: checked before use
    for file in (tokenizer_name, tokenizer_weights, tokenizer_stats):
        if file and Path(file).is_file():
            verify_checkpoint_file(Path(file))
    tokenizer_module = create_tokenizer(
        tokenizer_name, resolution=resolution or 256, weights=tokenizer_weights, stats=tokenizer_stats
    )
    if resolution is None:
        # a DDT's weights carry no grid (RoPE only): 256 px, the size DDT-XL/2 was released at
        grid_size = architecture.get("input_size", 256 // tokenizer_module.downsample)
        resolution = grid_size * tokenizer_module.downsample
    latent_size = tokenizer_module.latent_size(resolution)
    if (
        latent_size != architecture.get("input_size", latent_size)
        or tokenizer_module.latent_channels != architecture["in_channels"]
    ):
        expected = "x".join(
            str(architecture.get(k, latent_size)) for k in ("in_channels", "input_size", "input_size")
        )
        raise ValueError(
            f"tokenizer '{tokenizer_name}' makes {tokenizer_module.latent_channels}x{latent_size}x"
            f"{latent_size} latents at {resolution}px, but the checkpoint expects {expected}: "
            "pass the tokenizer it was trained with"
        )

    if config is not None:
        overrides = config.model_overrides(
            input_size=latent_size,
            in_channels=architecture["in_channels"],
            projector_dims=architecture["projector_out_dims"],
        )
        overrides["latent_batchnorm"] = architecture["latent_batchnorm"]
        overrides["class_token_dim"] = architecture.get("class_token_dim", 0)  # REG: from the weights
        for key in ("context_dim", "context_length", "null_context", "num_classes"):
            if architecture.get("context_dim") and key in architecture:  # a text model, from the weights
                overrides[key] = architecture[key]
        name = model or config.model.name
    else:
        name = model or hints.get("name") or infer_model_name(architecture)
        # (a DDT's split is None when no registered size has its depth and width: --model tells it)
        overrides = {"input_size": latent_size, **{k: v for k, v in architecture.items() if v is not None}}
        if "rope" in hints:
            overrides.setdefault("rope", hints["rope"])
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        foreign = name.startswith(("LightningDiT-", "DDT-"))  # both trained with t=1 data
        overrides["reverse_time"] = foreign if reverse_time is None else reverse_time
    if config is not None and reverse_time is not None:
        overrides["reverse_time"] = reverse_time
    sit = create_model(name, **overrides)
    load_state_dict_strict(sit, state_dict)
    if getattr(sit, "null_context", True) is None:  # an MMDiT's empty caption is not in its weights
        if config is None:
            raise ValueError(f"{weights_path}: an MMDiT with the empty null caption needs its run's config")
        from repa.data.shards import read_null_text

        sit.set_null_context(*(torch.tensor(array) for array in read_null_text(config.data.data)))
    sit.eval().requires_grad_(False)
    tokenizer_module.eval().requires_grad_(False)
    generator = Generator(
        model=sit,
        tokenizer=tokenizer_module,
        resolution=resolution,
        path_type=path_type or "linear",
        weights_path=weights_path,
        step=step,
        run_dir=run_dir,
        config=config,
    )
    return generator.to(device)
