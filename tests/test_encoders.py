"""repa.encoders: registry, preprocessing numerics, token geometry, frozen-ness, weight loading.

No pretrained weights exist offline, so encoders are built with random weights through the
real code path. `TINY` shrinks width/depth (arch_overrides) while keeping the architecture
family, patch size, token logic and preprocessing; full-size architectures are checked on the
meta device (shapes only, no memory).
"""

import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from repa.encoders import (
    EncoderWeightsError,
    ViTEncoder,
    build_local_vit,
    canonical_encoder_name,
    check_token_grid,
    create_encoder,
    create_encoders,
    get_encoder_spec,
    list_encoders,
    save_local_encoder,
)
from repa.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from repa.encoders.registry import build_timm_vit

# 96 = 2 heads x 48; keeps DINOv2-g's SwiGLU hidden size (ratio 5.33) even.
TINY = dict(depth=1, embed_dim=96, num_heads=2)
ALL = list_encoders()


def _images(batch=2, resolution=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, generator=generator)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline hub, empty caches, and any socket connect fails at once (nothing can hang)."""
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


# ---- registry --------------------------------------------------------------------------------


def test_registry_names_and_aliases():
    for name in ("dinov2-s", "dinov2-b", "dinov2-l", "dinov2-g", "dinov2-b-reg", "dinov2-g-reg", "dinov1-b"):
        assert name in ALL
    for name in ("clip-l", "siglip-b", "mocov3-s", "mocov3-b", "mocov3-l", "mae-l", "jepa-h"):
        assert name in ALL
    aliases = {
        "dinov2-vit-b": "dinov2-b",
        "dinov2-vit-g": "dinov2-g",
        "dinov2reg-vit-l": "dinov2-l-reg",
        "dinov2-vit-s-reg": "dinov2-s-reg",
        "clip-vit-L": "clip-l",
        "mocov3-vit-b": "mocov3-b",
        "mae-vit-l": "mae-l",
        "jepa-vit-h": "jepa-h",
        "dinov1-vit-b": "dinov1-b",
        "DINOv2-B": "dinov2-b",
    }
    for alias, name in aliases.items():
        assert canonical_encoder_name(alias) == name
    with pytest.raises(ValueError, match="unknown encoder 'dinov3-b'.*dinov2-b"):
        canonical_encoder_name("dinov3-b")


@pytest.mark.parametrize("name", [n for n in ALL if get_encoder_spec(n).hub_tag])
def test_hub_names_exist_in_timm_with_our_normalisation(name):
    import timm

    spec = get_encoder_spec(name)
    assert spec.timm_name in timm.list_models(spec.timm_name, pretrained=True)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std


def test_create_encoders_lists_and_none():
    assert create_encoders("none") == [] and create_encoders("") == [] and create_encoders(" NONE ") == []
    encoders = create_encoders("dinov2-vit-b, clip-l", pretrained=False, arch_overrides=TINY)
    assert [e.name for e in encoders] == ["dinov2-b", "clip-l"]
    with pytest.raises(ValueError, match="cannot be combined"):
        create_encoders("none,dinov2-b", pretrained=False)
    with pytest.raises(ValueError, match="listed twice"):
        create_encoders("dinov2-b,dinov2-vit-b", pretrained=False)


# ---- every encoder: real architecture on meta, tiny one on CPU -----------------------------------


@pytest.mark.parametrize("name", ALL)
def test_full_size_architecture_shapes_on_meta(name):
    """Real depth and width, no memory: dim and token count from a forward at 256 (512 runs on
    the tiny models below; here only its count)."""
    spec = get_encoder_spec(name)
    vit = build_timm_vit(spec.timm_arch, img_size=spec.reference_input, on_meta=True, **spec.arch_kwargs)
    encoder = ViTEncoder(
        vit,
        name=name,
        resolution=256,
        reference_resolution=256,
        reference_input=spec.reference_input,
        patch_size=spec.patch_size,
        mean=spec.mean,
        std=spec.std,
        final_norm=spec.final_norm,
    ).to("meta")
    assert encoder.dim == spec.dim and encoder.num_tokens(256) == 256 and encoder.num_tokens(512) == 1024
    out = encoder(torch.empty(1, 3, 256, 256, dtype=torch.uint8, device="meta"))
    assert out.shape == (1, 256, spec.dim)


@pytest.mark.parametrize("name", ALL)
def test_every_encoder_random_weights_tiny(name):
    encoder = create_encoder(name, pretrained=False, arch_overrides=TINY)
    assert encoder.dim == 96 and encoder.token_grid(256) == (16, 16) and encoder.token_grid(512) == (32, 32)
    out = encoder(_images())
    assert out.shape == (2, 256, 96) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # frozen: eval, no grads, no graph, even after .train() and under enable_grad
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        assert encoder(_images()).grad_fn is None
    assert all(not k.endswith(("mean", "std")) for k in encoder.state_dict())  # constants not saved


def test_resolution_512_forward_and_grid_errors():
    encoder = create_encoder("dinov2-b", resolution=512, pretrained=False, arch_overrides=TINY)
    assert encoder.input_size == 448 and encoder(_images(1, 512)).shape == (1, 1024, 96)
    assert encoder.token_grid(384) == (24, 24)
    with pytest.raises(ValueError, match="Nearest resolutions that work: 192 or 208"):
        create_encoder("dinov2-b", resolution=200, pretrained=False, arch_overrides=TINY)
    with pytest.raises(ValueError, match="create it with resolution=256"):
        encoder(_images(1, 256))
    with pytest.raises(TypeError, match="uint8"):
        encoder(_images(1, 512).float())


def test_check_token_grid_names_matching_patch_size():
    encoder = create_encoder("dinov2-b", pretrained=False, arch_overrides=TINY)
    check_token_grid(encoder, 256, (16, 16))
    with pytest.raises(ValueError, match="gives 16x16 tokens but the model gives 32x32.*patch size of 2"):
        check_token_grid(encoder, 256, (32, 32), model_patch_size=1)


def test_runs_under_callers_autocast():
    """Matmuls run in the caller's autocast dtype: bf16 tokens differ from fp32 ones, but only
    by bf16 rounding (the residual stream itself stays float32, as timm's ViT adds fp32
    position embeddings)."""
    encoder = create_encoder("mae-l", pretrained=False, arch_overrides=TINY)
    images = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encoder(images)
    full = encoder(images)
    assert not torch.equal(low.float(), full)
    torch.testing.assert_close(low.float(), full, atol=0.1, rtol=0.05)


# ---- preprocessing numerics --------------------------------------------------------------------


def test_constant_colour_gives_normalised_constant_after_resize():
    colour = torch.tensor([255, 0, 128], dtype=torch.uint8)
    images = colour.view(1, 3, 1, 1).expand(2, 3, 256, 256).contiguous()
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = ((colour.float() / 255 - mean) / std).view(1, 3, 1, 1)
    encoder = create_encoder("dinov2-b", pretrained=False, arch_overrides=TINY)
    pixels = encoder.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    torch.testing.assert_close(pixels, expected.expand_as(pixels), atol=1e-5, rtol=0)  # float32 rounding
    clip = create_encoder("clip-l", pretrained=False, arch_overrides=TINY)
    clip_expected = ((colour.float() / 255).view(1, 3, 1, 1) - clip.mean) / clip.std
    clip_pixels = clip.preprocess(images)  # resized before normalising, as CLIP's reference does
    torch.testing.assert_close(clip_pixels, clip_expected.expand_as(clip_pixels), atol=1e-5, rtol=0)
    mae = create_encoder("mae-l", pretrained=False, arch_overrides=TINY)
    assert mae.preprocess(images).shape == (2, 3, 256, 256)  # /16 encoders: no resize


def test_preprocess_matches_repa_formula():
    images = _images(resolution=512)
    encoder = create_encoder("dinov2-b", resolution=512, pretrained=False, arch_overrides=TINY)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    reference = F.interpolate((images / 255.0 - mean) / std, 224 * (512 // 256), mode="bicubic")
    torch.testing.assert_close(encoder.preprocess(images), reference, atol=1e-6, rtol=0)


# ---- weights: reference layouts, strict checks, missing weights ---------------------------------


def _fair_dinov2_checkpoint(timm_native):
    """A timm DINOv2 built at its native 518 px, written in the torch.hub (FAIR) key layout."""
    state = dict(timm_native.state_dict())
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if "reg_token" in state:  # timm folds the class position into cls_token; FAIR keeps it in pos_embed
        class_pos = torch.randn(1, 1, state["cls_token"].shape[-1])
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - class_pos
        state["pos_embed"] = torch.cat([class_pos, state["pos_embed"]], dim=1)
    return state


@pytest.mark.parametrize("name", ["dinov2-s", "dinov2-s-reg"])
def test_dinov2_torch_hub_layout_matches_repa_reference(tmp_path, name):
    """Weights saved in the original DINOv2 layout load strictly, and the tokens equal REPA's
    recipe: pos-embed resampled 37x37 -> 16x16 with timm's resample_abs_pos_embed, images
    normalised and resized to 224 bicubic, final normed patch tokens."""
    spec = get_encoder_spec(name)
    native = build_timm_vit(spec.timm_arch, img_size=518, **TINY)
    path = tmp_path / "dinov2_fair.pth"
    torch.save(_fair_dinov2_checkpoint(native), path)
    encoder = create_encoder(name, weights=str(path), arch_overrides=TINY)

    reference = build_timm_vit(spec.timm_arch, img_size=224, **TINY).eval()
    state = dict(native.state_dict())
    prefix = 0 if "reg_token" in state else 1
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16], num_prefix_tokens=prefix)
    reference.load_state_dict(state)
    images = _images()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = F.interpolate((images / 255.0 - mean) / std, 224, mode="bicubic")
    with torch.no_grad():
        expected = reference.forward_features(pixels)[:, reference.num_prefix_tokens :]
    torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-5)


def test_timm_layout_safetensors_roundtrip_and_mae_has_no_final_norm(tmp_path):
    source = create_encoder("mae-l", pretrained=False, arch_overrides=TINY)
    with torch.no_grad():
        source.vit.norm.weight.mul_(3.0)  # a final norm that would change the tokens if applied
    path = tmp_path / "mae.safetensors"
    save_file(source.vit.state_dict(), str(path))
    loaded = create_encoder("mae-l", weights=str(path), arch_overrides=TINY)
    images = _images()
    torch.testing.assert_close(loaded(images), source(images))
    with torch.no_grad():
        blocks = loaded.vit.blocks(loaded.vit._pos_embed(loaded.vit.patch_embed(loaded.preprocess(images))))
    torch.testing.assert_close(loaded(images), blocks[:, 1:])  # last block output, CLS dropped, no norm


def test_mocov3_checkpoint_layout(tmp_path):
    """MoCo v3 training checkpoints: base encoder under 'module.base_encoder.', 14x14 pos-embed."""
    vit224 = build_timm_vit("vit_small_patch16_224", img_size=224, **TINY)
    state = {f"module.base_encoder.{k}": v for k, v in vit224.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v for k, v in vit224.state_dict().items()})
    state["module.base_encoder.head.0.weight"] = torch.zeros(4, 96)
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "state_dict": state}, path)
    encoder = create_encoder("mocov3-vit-s", weights=str(path), arch_overrides=TINY)
    torch.testing.assert_close(
        encoder.vit.pos_embed,
        resample_abs_pos_embed(vit224.pos_embed.detach(), [16, 16], num_prefix_tokens=1),
    )
    assert encoder(_images()).shape == (2, 256, 96)


def _openai_clip_layout(timm_state):
    """timm CLIP image tower keys -> OpenAI CLIP keys ('visual.*'), the inverse of timm's converter."""
    swaps = [
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        ("norm1", "ln_1"),
        ("norm2", "ln_2"),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    out = {"visual.proj": torch.zeros(96, 8), "token_embedding.weight": torch.zeros(5, 8)}  # unused parts
    for key, value in timm_state.items():
        if key == "cls_token":
            out["visual.class_embedding"] = value.flatten()
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key.startswith("norm."):
            out["visual.ln_post." + key[len("norm.") :]] = value
        else:
            for theirs, ours in swaps:
                key = key.replace(theirs, ours)
            out["visual." + key] = value
    return out


def _as_torchscript(state, path):
    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_openai_clip_layouts_pth_and_torchscript(tmp_path):
    source = create_encoder("clip-l", pretrained=False, arch_overrides=TINY)
    openai = _openai_clip_layout(source.vit.state_dict())
    torch.save(openai, tmp_path / "clip.pth")
    _as_torchscript(openai, tmp_path / "ViT-L-14.pt")
    images = _images()
    for path in (tmp_path / "clip.pth", tmp_path / "ViT-L-14.pt"):
        loaded = create_encoder("clip-vit-L", weights=str(path), arch_overrides=TINY)
        torch.testing.assert_close(loaded(images), source(images))


@pytest.mark.parametrize("name", ["jepa-h", "mae-l", "dinov1-b"])
def test_published_checkpoint_nesting(tmp_path, name):
    """I-JEPA: {'encoder': {'module.*'}, 'predictor': ...}; MAE: {'model': ...}; DINO: flat."""
    source = create_encoder(name, pretrained=False, arch_overrides=TINY)
    state = source.vit.state_dict()
    if name == "jepa-h":
        checkpoint = {"encoder": {f"module.{k}": v for k, v in state.items()}, "epoch": 300}
        checkpoint["predictor"] = {"module.mask_token": torch.zeros(1, 1, 96)}
    else:
        checkpoint = {"model": state} if name == "mae-l" else state
    torch.save(checkpoint, tmp_path / "published.pth")
    loaded = create_encoder(name, weights=str(tmp_path / "published.pth"), arch_overrides=TINY)
    images = _images()
    torch.testing.assert_close(loaded(images), source(images))


def test_wrong_or_truncated_weights_fail_clearly(tmp_path):
    good = create_encoder("dinov2-b", pretrained=False, arch_overrides=TINY).vit.state_dict()
    wrong = tmp_path / "wrong.pth"
    torch.save({k: v for k, v in good.items() if not k.startswith("blocks.0.mlp")}, wrong)
    with pytest.raises(EncoderWeightsError, match=r"strict key check.*missing 4 \(blocks.0.mlp.fc1.bias"):
        create_encoder("dinov2-b", weights=str(wrong), arch_overrides=TINY)
    torch.save({**good, "blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(EncoderWeightsError, match="shape mismatches 1 .*blocks.0.attn.qkv.weight"):
        create_encoder("dinov2-b", weights=str(wrong), arch_overrides=TINY)
    torch.save(good, tmp_path / "p14.pth")
    with pytest.raises(EncoderWeightsError, match="patch size"):  # a /14 checkpoint for a /16 model
        create_encoder("dinov1-b", weights=str(tmp_path / "p14.pth"), arch_overrides=TINY)
    for suffix, save in (
        (".safetensors", lambda p: save_file(good, p)),
        (".pth", lambda p: torch.save(good, p)),
    ):
        path = str(tmp_path / f"full{suffix}")
        save(path)
        with open(path, "rb+") as f:
            f.truncate(len(f.read()) // 2)
        with pytest.raises(EncoderWeightsError, match="truncated or not a state dict"):
            create_encoder("dinov2-b", weights=path, arch_overrides=TINY)
    with pytest.raises(EncoderWeightsError, match="not found"):
        create_encoder("dinov2-b", weights=str(tmp_path / "absent.pth"), arch_overrides=TINY)


@pytest.mark.parametrize("layout", ["timm", "dinov2-torch-hub", "local-file"])
def test_an_unexpected_key_alone_is_refused_by_name(tmp_path, layout):
    """Every expected key present with its shape, plus one the model lacks: the strict check must
    refuse the file and name the key. (A check that looked only at missing keys and shapes, or a
    layout adapter that kept only the keys it knows, would load it.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, kwargs = tmp_path / "weights.pth", dict(arch_overrides=TINY)
    if layout == "timm":
        name, extra = "dinov2-b", "blocks.0.attn.extra_scale"
        state = dict(create_encoder(name, pretrained=False, arch_overrides=TINY).vit.state_dict())
        torch.save({**state, extra: torch.zeros(1)}, path)
        kwargs["weights"] = str(path)
    elif layout == "dinov2-torch-hub":
        name, extra = "dinov2-s", "blocks.0.ls1.extra"
        native = build_timm_vit(get_encoder_spec(name).timm_arch, img_size=518, **TINY)
        state = _fair_dinov2_checkpoint(native)  # converted on load (FAIR key names, class position)
        torch.save({**state, extra: torch.zeros(1)}, path)
        kwargs["weights"] = str(path)
    else:
        arch_kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, num_classes=0)
        path = tmp_path / "local.safetensors"
        save_local_encoder(
            str(path), build_local_vit("vit_tiny_patch16_224", arch_kwargs), arch="vit_tiny_patch16_224",
            arch_kwargs=arch_kwargs, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32, patch_size=8,
        )  # fmt: skip
        create_encoder(str(path))  # the file as written loads
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        name, extra, kwargs = str(path), "extra_token", {}  # a local file holds its architecture
        save_file({**load_file(str(path)), extra: torch.zeros(1, 1, 48)}, str(path), metadata)
    with pytest.raises(
        EncoderWeightsError, match=rf"missing 0 \(\); unexpected 1 \({extra}\); shape mismatches 0"
    ):
        create_encoder(name, **kwargs)


@pytest.mark.parametrize(
    "name, needed",
    [
        ("dinov2-b", "timm/vit_base_patch14_dinov2.lvd142m"),
        ("clip-vit-L", "timm/vit_large_patch14_clip_224.openai"),
        ("jepa-h", "IN1K-vit.h.14-300e.pth.tar"),
        ("mocov3-b", "vit-b-300ep.pth.tar"),
    ],
)
def test_missing_weights_offline_message(no_network, name, needed):
    with pytest.raises(EncoderWeightsError) as info:
        create_encoder(name, cache_dir=str(no_network / "empty-cache"))
    message = str(info.value)
    assert f"encoder '{canonical_encoder_name(name)}'" in message and needed in message
    assert "--encoder-weights PATH" in message and "pretrained=False" in message
    if name != "mocov3-b":
        assert "--encoder-cache-dir DIR" in message


def test_hub_cache_dir_is_used_offline(no_network):
    """pretrained=True reads a Hugging Face cache laid out as the hub client writes it (full-size
    DINOv2-S with random values standing in for the published file)."""
    spec = get_encoder_spec("dinov2-s")
    repo = no_network / "hub" / f"models--timm--{spec.timm_name}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    native = build_timm_vit(spec.timm_arch, img_size=518)  # as published: 37x37 position grid
    save_file(native.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    encoder = create_encoder("dinov2-s", cache_dir=str(no_network / "hub"))
    torch.testing.assert_close(encoder.vit.blocks[11].mlp.fc2.weight, native.blocks[11].mlp.fc2.weight)
    torch.testing.assert_close(
        encoder.vit.pos_embed,
        resample_abs_pos_embed(native.pos_embed.detach(), [16, 16], num_prefix_tokens=1),
    )
    assert encoder(_images(1)).shape == (1, 256, 384)


# ---- local encoders ------------------------------------------------------------------------------

CONV_STEM = {"channels": [16, 32], "stride": [2, 2], "kernel_size": 3, "padding": 1}
LOCAL_ARCH = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 10}


def test_local_hybrid_encoder_roundtrip(tmp_path):
    model = build_local_vit("vit_tiny_patch16_224", LOCAL_ARCH, conv_stem=CONV_STEM)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # update batch-norm statistics as training would
    path = str(tmp_path / "demo-encoder.safetensors")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    save_local_encoder(
        path,
        model,
        arch="vit_tiny_patch16_224",
        arch_kwargs=LOCAL_ARCH,
        conv_stem=CONV_STEM,
        mean=mean,
        std=std,
        input_size=32,
        patch_size=4,
    )
    encoder = create_encoder(path, resolution=32)
    assert encoder.name == "demo-encoder" and encoder.dim == 48 and encoder.token_grid(32) == (8, 8)
    images = _images(3, 32)
    model.eval()
    with torch.no_grad():
        expected = model.forward_features((images / 255.0 - 0.5) / 0.25)[:, 1:]
    torch.testing.assert_close(encoder(images), expected)
    assert [e.name for e in create_encoders(path, resolution=32)] == ["demo-encoder"]
    assert create_encoder(path, resolution=64)(_images(1, 64)).shape == (1, 256, 48)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training
    with pytest.raises(ValueError, match="token grid"):
        save_local_encoder(
            path,
            model,
            arch="vit_tiny_patch16_224",
            arch_kwargs=LOCAL_ARCH,
            conv_stem=CONV_STEM,
            mean=mean,
            std=std,
            input_size=32,
            patch_size=8,
        )
    plain = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(plain))
    with pytest.raises(EncoderWeightsError, match="not a local encoder file"):
        create_encoder(str(plain))
