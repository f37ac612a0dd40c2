"""VAE tokenizers: images <-> latents for latent diffusion, one interface for all.

tokenizer = create_tokenizer("sd-vae-ft-mse")          # or "pixels", "f8d4", "f16d32", "va-vae", a path
moments = tokenizer.encode_moments(uint8_images)        # (B, 2C, h, w) = cat(mean, std), cacheable
latents = tokenizer.normalize(tokenizer.sample(moments))  # what the diffusion model sees
images = tokenizer.decode(latents)                      # uint8 (B, 3, H, W)
"""

from repa.tokenizers.base import LatentNorm, Tokenizer
from repa.tokenizers.registry import TOKENIZERS, create_tokenizer, list_tokenizers
from repa.tokenizers.stats import compute_latent_stats, load_latent_stats, save_latent_stats

__all__ = [
    "TOKENIZERS",
    "LatentNorm",
    "Tokenizer",
    "compute_latent_stats",
    "create_tokenizer",
    "list_tokenizers",
    "load_latent_stats",
    "save_latent_stats",
]
