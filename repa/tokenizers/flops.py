"""Forward cost of the tokenizers' encoder and decoder halves (multiply-adds, one per FLOP).

Counted with `repa.analysis.flops.count_flops` (torch FlopCounterMode: convolutions and every matrix
product, attention's two included; normalisation and elementwise ops are not counted) on a model built
on the meta device, so no weights are needed and nothing is computed.

SD-VAE at 256x256, printed by
    python -c "from repa.tokenizers.flops import tokenizer_flops; print(tokenizer_flops('sd-vae-ft-mse'))"
is encoder 136.36 G + decoder 311.09 G = 447.45 G, +0.36% from the seed's 445.87 G (135.6 + 310.3, as
the RAE paper reports it). f8d4 is the same network (identical count); f16d32: 68.97 G + 126.09 G.
The published encoder figure matches fvcore's convention: fvcore.nn.FlopCountAnalysis (`pip install fvcore`)
on diffusers' encoder + quant_conv counts convolutions and linear layers, GroupNorm at 5 ops per element,
and skips `scaled_dot_product_attention`: 135.59 G; the same on post_quant_conv + decoder gives 310.62 G
(+0.1% from 310.3), total 446.21 G.
"""

from __future__ import annotations

import torch

from repa.analysis.flops import count_flops


def tokenizer_flops(name: str, resolution: int = 256, **arch_overrides) -> dict[str, int]:
    """{"encoder": multiply-adds of posterior(images), "decoder": of decode_float(z)} for one image."""
    from repa.tokenizers.registry import create_tokenizer

    with torch.device("meta"):
        tokenizer = create_tokenizer(
            name, resolution=resolution, pretrained=False, arch_overrides=arch_overrides or None
        )
        latent = tokenizer.latent_size(resolution)
        images = torch.zeros(1, 3, resolution, resolution)
        z = torch.zeros(1, tokenizer.latent_channels, latent, latent)
    return {
        "encoder": count_flops(tokenizer.posterior, images),
        "decoder": count_flops(tokenizer.decode_float, z),
    }
