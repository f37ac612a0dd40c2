"""Alignment loss, EMA and FLOP counting."""

import pytest
import torch

from repa.align import alignment_loss, resample_tokens
from repa.analysis.flops import count_flops, model_cost
from repa.models import create_model
from repa.train.ema import EMA


def _slow_reference_loss(projected, targets):
    """The published code's per-sample Python loop, written out as the definition."""
    total = 0.0
    for h_k, z_k in zip(projected, targets):
        for h, z in zip(h_k, z_k):
            h = torch.nn.functional.normalize(h, dim=-1)
            z = torch.nn.functional.normalize(z, dim=-1)
            total += -(h * z).sum(dim=-1).mean()
    return total / (len(projected) * projected[0].shape[0])


def test_alignment_loss_is_minus_one_for_identical_features():
    features = torch.randn(3, 16, 8)
    assert alignment_loss([features], [features.clone()]).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss([features], [-features]).item() == pytest.approx(1.0, abs=1e-6)


def test_alignment_loss_matches_per_sample_reference_for_two_encoders():
    projected = [torch.randn(4, 16, 8), torch.randn(4, 16, 12)]
    targets = [torch.randn(4, 16, 8), torch.randn(4, 16, 12)]
    torch.testing.assert_close(alignment_loss(projected, targets), _slow_reference_loss(projected, targets))


def test_alignment_loss_mismatches_are_errors():
    with pytest.raises(ValueError, match="256 tokens"):
        alignment_loss([torch.randn(2, 64, 8)], [torch.randn(2, 256, 8)])
    with pytest.raises(ValueError, match="batch size"):
        alignment_loss([torch.randn(2, 16, 8)], [torch.randn(3, 16, 8)])
    with pytest.raises(ValueError, match="projector outputs 8 features"):
        alignment_loss([torch.randn(2, 16, 8)], [torch.randn(2, 16, 6)])
    with pytest.raises(ValueError, match="one target per projector"):
        alignment_loss([torch.randn(2, 16, 8)], [])


def test_opt_in_resampling_of_target_tokens():
    target = torch.randn(2, 64, 8)
    resampled = resample_tokens(target, 16)
    assert resampled.shape == (2, 16, 8)
    # A constant grid stays constant under interpolation.
    constant = torch.ones(1, 64, 3)
    torch.testing.assert_close(resample_tokens(constant, 256), torch.ones(1, 256, 3))
    loss = alignment_loss([resampled.clone()], [target], resample=True)
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)


def test_projector_gradients_come_only_from_alignment():
    model = create_model(
        "SiT-S/2",
        input_size=8,
        hidden_size=32,
        num_heads=2,
        depth=3,
        align_depth=2,
        num_classes=5,
        projector_out_dims=[16],
    )
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 5, (2,))
    velocity, projections = model(x, t, y)
    velocity.pow(2).mean().backward(retain_graph=True)
    assert all(p.grad is None for p in model.projectors.parameters())
    alignment_loss(projections, [torch.randn(2, 16, 16)]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projectors.parameters())
    # The alignment loss does not reach blocks after the tap or the final layer.
    model.zero_grad(set_to_none=True)
    _, projections = model(x, t, y)
    alignment_loss(projections, [torch.randn(2, 16, 16)]).backward()
    assert model.blocks[2].attn.qkv.weight.grad is None and model.final_layer.linear.weight.grad is None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_ema_matches_per_tensor_formula_including_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(8, 4))  # moves BatchNorm's running stats and its integer counter
    ema.update(model)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[key], 0.9 * before[key] + 0.1 * value)
        else:
            assert torch.equal(ema.state_dict()[key], value)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_ema_copy_from_and_bad_decay():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.mul_(2)
    ema.copy_from(model)
    assert torch.equal(ema.model.weight, model.weight)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


# DiT paper, Table 4 (GFLOPs at 256x256; 32x32x4 latents) and its parameter counts.
DIT_PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}  # fmt: skip
DIT_PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("name", list(DIT_PAPER_GFLOPS))
def test_flops_reproduce_the_dit_paper(name):
    cost = model_cost(name, resolution=256)
    assert cost.flops / 1e9 == pytest.approx(DIT_PAPER_GFLOPS[name], rel=0.01)
    size = name.split("-")[1].split("/")[0]
    assert cost.parameters / 1e6 == pytest.approx(DIT_PAPER_PARAMS_M[size], rel=0.01)
    assert 0.30 < cost.adaln_share < 0.36  # the seed's "about 30%" of parameters in adaLN


def test_count_flops_sees_attention_on_real_tensors():
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 10, 8)
    flops = count_flops(lambda: attention(x, x, x, need_weights=False))
    # in-proj 3*10*8*8 + scores 10*10*8 + weighted sum 10*10*8 + out-proj 10*8*8
    assert flops == 3 * 640 + 800 + 800 + 640


def test_repa_flops_cli_prints_dit_xl2_and_sd_vae(capsys):
    from repa.cli import main

    assert main(["flops", "DiT-XL/2", "sd-vae-ft-mse"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = [line for line in lines if line.startswith("DiT-XL/2")][0]
    assert "675.1" in row and "118.62" in row
    total = [line for line in lines if line.startswith("sd-vae-ft-mse total")][0]
    assert float(total.split()[-1]) == pytest.approx(445.87, rel=0.01)  # the seed's figure
    assert any(line.startswith("sd-vae-ft-mse encoder") for line in lines)


def test_repa_flops_cli_prints_adaln_single_beside_the_standard_block(capsys):
    """`repa flops SiT-XL/2 --adaln single`: about 675M -> 460M (-31.8%), within 0.5% of 460M."""
    from repa.cli import main

    assert main(["flops", "SiT-XL/2", "--adaln", "single"]) == 0
    lines = capsys.readouterr().out.splitlines()
    standard = [line for line in lines if line.startswith("SiT-XL/2 ")][0].split()
    single = [line for line in lines if line.startswith("SiT-XL/2 adaln=single")][0].split()
    assert standard[3] == "675.1" and len(standard) == 6  # no change column on the registered row
    assert float(single[4]) == pytest.approx(460, rel=0.005)
    assert single[-1] == "-31.8%"
    assert float(single[5]) < float(standard[4])  # GFLOPs: adaLN once per sample, not per block


def test_repa_flops_cli_rejects_unknown_names(capsys):
    from repa.cli import main

    assert main(["flops", "SiT-XXL/2"]) == 2
    assert "unknown model or tokenizer 'SiT-XXL/2'" in capsys.readouterr().err
