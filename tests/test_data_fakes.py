"""Tiny stand-ins for a tokenizer and an encoder with the duck-typed methods repa.data calls
(imported by the other tests/test_data_*.py files as tests.test_data_fakes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FakeTokenizer:
    """encode_moments: uint8 (B,3,H,W) -> (B,6,H/4,W/4) = cat(4x4 mean of x, 4x4 mean of |x|/10 + 0.01).

    Not mirror-symmetric pixel-wise, so moments of an image and of its mirror image differ.
    """

    name = "fake-tokenizer"

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("simulated crash in the middle of a build")
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        pixels = images.float() / 127.5 - 1.0
        mean = F.avg_pool2d(pixels, 4)
        std = F.avg_pool2d(pixels.abs(), 4) / 10 + 0.01
        return torch.cat([mean, std], dim=1)


class FakeEncoder:
    """encoder(uint8 (B,3,H,W)) -> (B, T, 3): mean colour of each 8x8 patch, row-major tokens."""

    name = "fake-encoder"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images.float() / 255.0, 8)  # (B, 3, H/8, W/8)
        return pooled.flatten(2).transpose(1, 2)  # (B, T, 3)


def test_fake_tokenizer_shapes_and_mirror_sensitivity():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    moments = FakeTokenizer().encode_moments(images)
    assert moments.shape == (2, 6, 4, 4)
    assert not torch.allclose(moments, FakeTokenizer().encode_moments(images.flip(-1)))
    assert FakeEncoder()(images).shape == (2, 4, 3)
