"""Training methods by name. A method owns its step maths and its state; the loop
(repa/train/loop.py, repa/train/step.py) applies one policy to every update.

  sit    denoising loss only (plain SiT baseline)                      denoising.py
  repa   denoising + proj_coeff * alignment to frozen encoder tokens   denoising.py
  ldm    repa on a frozen VAE with fixed latent statistics             denoising.py
         (e.g. an exported E2E-VAE and its latents-stats file)
  repa-e REPA-E: the VAE trained end to end through the alignment loss repae.py
  dispersive  sit (or repa, with --encoder) + the dispersive loss      denoising.py
  sra    SRA: self-alignment to the EMA model at a lower noise level    sra.py
  reg    REG: repa + the encoder's noised class token as token 0        reg.py
         (objective options of any of these: docs/objectives.md)

Adding a method is a class (repa.train.methods.base.TrainingMethod) and one `register_method`
call; no file of the loop changes. This module imports no torch, so that `--method` can be
checked (and listed in --help) without it: built-in methods are named here by import path and
loaded on first use.
"""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, object] = {
    "sit": "repa.train.methods.denoising:DenoisingMethod",
    "repa": "repa.train.methods.denoising:DenoisingMethod",
    "ldm": "repa.train.methods.denoising:DenoisingMethod",
    "repa-e": "repa.train.methods.repae:REPAEMethod",
    "dispersive": "repa.train.methods.denoising:DenoisingMethod",
    "sra": "repa.train.methods.sra:SRAMethod",
    "reg": "repa.train.methods.reg:REGMethod",
}


def register_method(name: str, method_class: type) -> type:
    """Make `--method name` train with `method_class` (a TrainingMethod subclass)."""
    if name in _REGISTRY and _REGISTRY[name] is not method_class:
        raise ValueError(f"a training method named {name!r} is already registered")
    _REGISTRY[name] = method_class
    return method_class


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> type:
    """The class behind `--method name`."""
    if name not in _REGISTRY:
        raise ValueError(f"--method {name!r} is not one of: {', '.join(_REGISTRY)}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, attribute = target.split(":")
        target = _REGISTRY[name] = getattr(importlib.import_module(module), attribute)
    return target
