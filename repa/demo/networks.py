"""The demo's two small auxiliary networks, trained on the CPU in about a minute each.

- A "pretrained" representation encoder (REPA's teacher): pretrained weights cannot be downloaded
  offline, so the demo trains a small hybrid ViT (timm ConvStem + transformer blocks) to classify
  the training images, saves it as a local encoder file and from then on loads it through the
  ordinary encoder registry, as a user loads their own encoder.
- An evaluator (the Frechet distance's feature space): a separate VGG-style CNN trained on a
  disjoint image set. Never the teacher: scoring in the teacher's feature space would favour the
  run that was aligned to it.

A plain small ViT stays at chance on these images for minutes on this CPU; the conv stem fixes
that (docs/cpu.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_ARCH = "vit_tiny_patch16_224"
ENCODER_MEAN = (0.5, 0.5, 0.5)
ENCODER_STD = (0.5, 0.5, 0.5)


@dataclass
class TrainedNetwork:
    model: nn.Module
    test_accuracy: float
    steps: int
    seconds: float


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips of a float batch (B, 3, H, W)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _fit_classifier(
    model: nn.Module,
    forward,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[int, float]:
    """Train `forward(float images) -> logits` with AdamW for a fixed number of steps (a time
    budget would make the demo depend on the machine's speed); returns (steps, seconds)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    model.train()
    start, step = time.perf_counter(), 0
    while step < steps:
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        batch = _augment(images[index], generator)
        loss = F.cross_entropy(forward(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    return step, time.perf_counter() - start


@torch.no_grad()
def _accuracy(forward, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([forward(chunk).argmax(-1) for chunk in images.split(256)])
    return float((predictions == labels).float().mean())


def _to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # (x/255 - 0.5) / 0.5, the encoder's normalisation


def train_demo_encoder(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    resolution: int,
    num_classes: int,
    embed_dim: int = 128,
    steps: int = 300,
    seed: int = 0,
) -> tuple[TrainedNetwork, dict]:
    """A hybrid ViT classifier whose final patch tokens become REPA's targets.

    One token per 4x4 pixels (conv stem of stride 4, then patch size 1): at 32px, 8x8 tokens,
    which a SiT with patch 4 on 32x32 pixels matches. Returns the network and the keyword
    arguments `repa.encoders.save_local_encoder` needs to rebuild it.
    """
    from repa.encoders.local import build_local_vit

    torch.manual_seed(seed)
    arch_kwargs = {
        "img_size": resolution,
        "patch_size": 1,
        "embed_dim": embed_dim,
        "depth": 2,
        "num_heads": 4,
        "num_classes": num_classes,
    }
    conv_stem = {"channels": [32, 64], "stride": [2, 2], "kernel_size": 3, "padding": 1}
    model = build_local_vit(ENCODER_ARCH, arch_kwargs, conv_stem=conv_stem)
    steps, seconds_used = _fit_classifier(
        model, model, _to_unit_range(train_images), train_labels,
        steps=steps, batch_size=64, learning_rate=1e-3, seed=seed,
    )  # fmt: skip
    accuracy = _accuracy(model, _to_unit_range(test_images), test_labels)
    save_kwargs = dict(
        arch=ENCODER_ARCH,
        arch_kwargs=arch_kwargs,
        conv_stem=conv_stem,
        mean=ENCODER_MEAN,
        std=ENCODER_STD,
        input_size=resolution,
        patch_size=4,
        resolution=resolution,
        name="demo-encoder",
    )
    return TrainedNetwork(model, accuracy, steps, seconds_used), save_kwargs


class EvaluatorCNN(nn.Module):
    """VGG-style classifier; `features` (global-average-pooled last conv block) is the Frechet
    distance's feature space."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, feature_dim),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float images in [-1, 1] (B, 3, H, W) -> (B, feature_dim)."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_evaluator(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    steps: int = 300,
    seed: int = 1,
) -> TrainedNetwork:
    torch.manual_seed(seed)
    model = EvaluatorCNN(num_classes)
    steps, seconds_used = _fit_classifier(
        model, model, _to_unit_range(train_images), train_labels,
        steps=steps, batch_size=64, learning_rate=2e-3, seed=seed,
    )  # fmt: skip
    accuracy = _accuracy(model, _to_unit_range(test_images), test_labels)
    return TrainedNetwork(model, accuracy, steps, seconds_used)


def evaluator_feature_fn(evaluator: EvaluatorCNN):
    """uint8 images (B, 3, H, W) -> float64 features (B, F), the callable eval's Frechet code takes."""

    @torch.no_grad()
    def features(images_uint8: torch.Tensor) -> torch.Tensor:
        evaluator.eval()
        return torch.cat(
            [evaluator.features(_to_unit_range(chunk)) for chunk in images_uint8.split(256)]
        ).double()

    return features


# A small LDM-layout KL autoencoder (f2, 4 latent channels) for the optional REPA-E run: 32px
# images -> 16x16x4 latents, where a SiT with patch 2 has the teacher's 8x8 tokens.
DEMO_VAE = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (), "z_channels": 4}


def pretrain_demo_vae(images: torch.Tensor, *, resolution: int, steps: int = 200, seed: int = 2):
    """Build the small VAE and train it briefly on reconstruction (L1 + 1e-6 KL), the usual
    starting point REPA-E fine-tunes from. Returns the tokenizer (frozen, eval)."""
    from repa.tokenizers import create_tokenizer
    from repa.tokenizers.losses import kl_loss, l1_loss

    torch.manual_seed(seed)
    vae = create_tokenizer(
        "f8d4",
        resolution=resolution,
        pretrained=False,
        arch_overrides=DEMO_VAE,
        require_stats=False,
        trainable=True,
    )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = _to_unit_range(images[torch.randint(0, images.shape[0], (32,), generator=generator)])
        mean, logvar = vae.posterior(batch)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        loss = l1_loss(batch, vae.decode_float(z)) + 1e-6 * kl_loss(mean, logvar)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vae.freeze()
