"""Text-to-image through the ordinary paths: a cross-attention SiT trained by `repa train` on
captioned shards (cached text of a tiny random-weight BERT through the real transformers path),
resumed bitwise, sampled by `repa sample --prompts`; caption dropout; the presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from repa.cli import main
from repa.config import ExperimentConfig
from repa.train.logging import read_metrics
from repa.train.loop import train
from tests.test_train import assert_states_equal, final_state
from tests.tiny_text import write_clip_tokenizer, write_tiny_bert

RESOLUTION = 16
MAX_LENGTH = 12
WORDS = (
    "a an the at in with of no picture pattern corner top bottom left right disk square triangle cross "
    "red green blue yellow plain striped stripes checkered"
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A transformers folder (config, tokenizer, random weights) with the synthetic captions' words."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS.split())


@pytest.fixture(scope="module")
def text_shards(tiny_bert, tmp_path_factory):
    from repa.data.build import build_shards
    from repa.text import create_text_encoder
    from repa.text.synthetic import write_captioned_dataset

    root = tmp_path_factory.mktemp("t2i")
    write_captioned_dataset(root / "set", num_images=32, resolution=RESOLUTION, seed=0)
    encoder = create_text_encoder("minilm", weights=str(tiny_bert), max_length=MAX_LENGTH)
    build_shards(
        str(root / "set" / "images"), root / "shards", resolution=RESOLUTION, shard_size=8, workers=0,
        captions_file=str(root / "set" / "captions.json"), text_encoder=encoder,
    )  # fmt: skip
    return str(root / "shards")


def text_config(shards, output_dir, **run) -> ExperimentConfig:
    values = {
        "model": {"name": "SiT-S/4", "hidden_size": 32, "depth": 2, "num_heads": 2, "align_depth": 1,
                  "projector_dim": 32},
        "data": {"data": shards, "resolution": RESOLUTION, "batch_size": 8, "num_workers": 0,
                 "shuffle_buffer": 8},
        "tokenizer": {"tokenizer": "pixels"},
        "encoder": {"encoder": "none"},
        "optim": {"learning_rate": 2e-3, "ema_decay": 0.9},
        "run": {"output_dir": str(output_dir), "exp_name": "run", "max_train_steps": 12,
                "checkpointing_steps": 4, "mixed_precision": "no", "log_every": 1, "sample_every": 0, **run},
    }  # fmt: skip
    return ExperimentConfig.from_dict(values)


@pytest.fixture(scope="module")
def trained(text_shards, tmp_path_factory):
    """A tiny text SiT trained 40 steps (its width read from the shards), and its run dir."""
    root = tmp_path_factory.mktemp("runs")  # (the preview grid samples the shards' first captions)
    config = text_config(text_shards, root, max_train_steps=40, checkpointing_steps=40, sample_every=40)
    config.run.sample_steps = 2
    return train(config)


def test_tiny_text_model_trains_with_the_cached_captions(trained, text_shards):
    from repa.data.shards import read_null_text
    from repa.eval.checkpoints import load_generator

    losses = [record["loss"] for record in read_metrics(trained.run_dir)]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:4]) / 4
    assert (trained.run_dir / "samples" / "step-00000040.png").is_file()
    generator = load_generator(trained.run_dir)  # the checkpoint rebuilds: width and null caption
    config = generator.model.config
    assert (config.context_dim, config.context_length, config.num_classes) == (16, MAX_LENGTH, 0)
    assert config.null_context == "empty" and generator.model.y_embedder is None
    # REPA's null caption: the text encoder's embedding of "" from the shards, kept in the weights
    null, mask = read_null_text(text_shards)
    embedder = generator.model.context_embedder
    assert torch.equal(embedder.null_context, torch.from_numpy(null).float())
    assert torch.equal(embedder.null_context_mask, torch.from_numpy(mask))


def test_text_model_resumes_bitwise(text_shards, tmp_path):
    straight = train(text_config(text_shards, tmp_path / "straight"))
    train(text_config(text_shards, tmp_path / "resumed", max_train_steps=8))
    resumed = train(text_config(text_shards, tmp_path / "resumed"))
    assert resumed.step == 12
    assert_states_equal(final_state(straight.run_dir), final_state(resumed.run_dir))


def test_sample_prompts_gives_one_image_per_prompt_whatever_the_batch(trained, tiny_bert, tmp_path):
    prompts = ["a red disk at the top left", "a blue cross with stripes", "bottom right: a green square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    outputs = []
    for batch in (1, 2):
        out = tmp_path / f"b{batch}.npz"
        main([
            "sample", str(trained.run_dir), "--prompts", str(tmp_path / "prompts.txt"), "--output", str(out),
            "--text-encoder-weights", str(tiny_bert), "--batch-size", str(batch), "--num-steps", "3",
            "--mode", "ode", "--cfg-scale", "2.0", "--chunk-size", "2",
        ])  # fmt: skip
        outputs.append(np.load(out)["arr_0"])
        assert out.with_suffix(".prompts.txt").read_text().splitlines() == prompts
    assert outputs[0].shape == (3, RESOLUTION, RESOLUTION, 3)
    assert np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0][0], outputs[0][1])


def test_sample_captions_from_shards(trained, text_shards, tmp_path):
    out = tmp_path / "captions.npz"
    main([
        "sample", str(trained.run_dir), "--captions-from", text_shards, "--output", str(out),
        "--num-steps", "2", "--mode", "ode", "--num-samples", "5",
    ])  # fmt: skip
    assert np.load(out)["arr_0"].shape[0] == 5
    assert len(out.with_suffix(".prompts.txt").read_text().splitlines()) == 5


def test_a_text_model_without_captions_is_refused(trained, tmp_path, capsys):
    assert main(["sample", str(trained.run_dir), "--output", str(tmp_path / "x.npz"), "--num-samples", "2"])
    assert "--prompts FILE.txt" in capsys.readouterr().err


def test_eval_every_scores_a_text_model_on_its_reference_captions(text_shards, tmp_path, monkeypatch):
    """--eval-every on a text model samples one image per caption of --eval-ref (captioned shards,
    as REPA scores COCO val2014) and scores them against those shards' images."""
    from repa.eval import captions as eval_captions
    from repa.eval import metrics as eval_metrics
    from repa.eval.frechet import gaussian_of
    from repa.eval.metrics import Evaluator

    features = torch.nn.Linear(3, 4)

    def feature_fn(images):  # a demo-style feature space: no Inception weights offline
        return features(images.float().mean(dim=(2, 3))).double().detach()

    original_init, read = eval_metrics.Evaluator.__init__, eval_captions.captions_from_shards
    sources = []

    def with_features(self, metrics, **kwargs):
        original_init(self, metrics, feature_fn=feature_fn, **kwargs)

    def recording(shards, limit=None, model=None):
        sources.append((shards, limit))
        return read(shards, limit, model)

    monkeypatch.setattr(eval_metrics.Evaluator, "__init__", with_features)
    monkeypatch.setattr(eval_captions, "captions_from_shards", recording)
    config = text_config(text_shards, tmp_path, max_train_steps=4, checkpointing_steps=4)
    config.run.eval_every, config.run.eval_ref, config.run.eval_num_samples = 2, text_shards, 8
    config.run.eval_metrics, config.run.eval_num_steps = "fd", 2
    result = train(config)
    evals = [record for record in read_metrics(result.run_dir) if "eval/fd" in record]
    assert [record["step"] for record in evals] == [2, 4] and all(record["eval/fd"] > 0 for record in evals)
    assert sources == [(text_shards, 8)]  # read once, at start-up

    # the reference is the caption set's images, all 32 of them
    from repa.data.stream import iter_eval_batches

    images = torch.cat(
        [batch.images for batch in iter_eval_batches(text_shards, batch_size=8, with_images=True)]
    )
    reference = Evaluator(["fd"], cache_dir=False, device="cpu").reference(text_shards)
    expected = gaussian_of(feature_fn(images))
    (gaussian,) = reference.gaussians.values()
    assert (
        images.shape[0] == 32
        and np.allclose(gaussian.mu, expected.mu)
        and np.allclose(gaussian.sigma, expected.sigma)
    )

    # with statistics as --eval-ref the training shards' captions are drawn; too few is an error
    config.run.eval_ref, config.run.eval_num_samples = str(tmp_path / "ref_stats.npz"), 33
    with pytest.raises(ValueError, match="--eval-num-samples 33: a text model samples one image per caption"):
        from repa.train.loop import _eval_captions

        _eval_captions(config)
    assert sources[-1] == (text_shards, 33)


def test_caption_dropout_one_makes_the_model_ignore_the_text():
    """With every caption dropped (probability 1) the step sees only the null caption: two
    different captions give the same prediction, and the loss is that of the null caption."""
    from repa.models import create_model

    torch.manual_seed(0)
    model = create_model(
        "SiT-S/4", input_size=16, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=0,
        context_dim=8, context_length=6, null_context="empty", class_dropout_prob=1.0,
    ).train()  # fmt: skip
    model.set_null_context(torch.randn(6, 8), torch.tensor([True, True, False, False, False, False]))
    with torch.no_grad():  # a model that reads its text (adaLN-Zero and the cross-attention start at 0)
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    first, second = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    torch.manual_seed(1)
    out_first, _ = model(x, t, None, context=first, context_mask=mask)
    torch.manual_seed(1)
    out_second, _ = model(x, t, None, context=second, context_mask=mask)
    assert torch.equal(out_first, out_second)
    model.eval()  # no dropout in eval: the captions matter
    kept_first, _ = model(x, t, None, context=first, context_mask=mask)
    kept_second, _ = model(x, t, None, context=second, context_mask=mask)
    assert not torch.allclose(kept_first, kept_second)
    dropped, _ = model(
        x, t, None, context=first, context_mask=mask, force_drop_ids=torch.ones(2, dtype=torch.bool)
    )
    assert torch.allclose(dropped, out_first)


@pytest.mark.parametrize(
    "preset, text_shape, expected",
    [
        ("coco_mmdit_repa.yaml", (77, 768), {"depth": 24, "hidden_size": 768, "num_heads": 24,
                                             "caption_dropout_prob": 0.1, "null_context": "empty"}),
        ("pixart_sit_repa.yaml", (120, 4096), {"depth": 28, "adaln": "single", "num_classes": 0,
                                               "class_dropout_prob": 0.1, "null_context": "fixed"}),
    ],
)  # fmt: skip
def test_text_presets_validate(preset, text_shape, expected):
    from repa.config import load_preset
    from repa.models import config_for

    root = Path(__file__).resolve().parent.parent
    config = ExperimentConfig.from_dict(load_preset(root / "configs" / preset)).validate()
    assert config.encoder.encoder == "dinov2-b" and config.data.batch_size == 256
    overrides = config.model_overrides(input_size=32, projector_dims=[768], text_shape=text_shape)
    model_config = config_for(config.model.name, **overrides)
    assert model_config.align_depth == 8 and model_config.context_dim == text_shape[1]
    assert model_config.context_length == text_shape[0]
    assert {key: getattr(model_config, key) for key in expected} == expected
    if preset.startswith("coco"):  # REPA's COCO recipe
        assert (config.optim.learning_rate, config.run.max_train_steps) == (1e-4, 400_000)


def test_mmdit_trains_with_repa_and_samples_prompts(text_shards, tiny_bert, tmp_path):
    """`--model MMDiT-N` through the same loop: REPA's tap on the image tokens (a tiny random
    teacher, tokens resampled to the MMDiT's grid), the empty caption from the shards; the
    checkpoint rebuilds in eval and samples prompts."""
    from repa.encoders.local import build_local_vit, save_local_encoder

    arch = {
        "img_size": RESOLUTION,
        "patch_size": 4,
        "embed_dim": 24,
        "depth": 1,
        "num_heads": 2,
        "num_classes": 0,
    }
    torch.manual_seed(0)
    encoder_path = tmp_path / "teacher.safetensors"
    save_local_encoder(
        str(encoder_path), build_local_vit("vit_tiny_patch16_224", arch), arch="vit_tiny_patch16_224",
        arch_kwargs=arch, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=RESOLUTION, patch_size=4,
    )  # fmt: skip
    config = text_config(text_shards, tmp_path, max_train_steps=4, checkpointing_steps=4)
    config.model.name, config.model.align_resample = "MMDiT-8", True
    config.model.depth, config.model.hidden_size, config.model.num_heads = 2, 32, 2
    config.encoder.encoder = str(encoder_path)
    result = train(config.validate())
    assert "loss_align" in read_metrics(result.run_dir)[-1]
    (tmp_path / "p.txt").write_text("a red disk at the top left\n")
    out = tmp_path / "m.npz"
    main([
        "sample", str(result.run_dir), "--prompts", str(tmp_path / "p.txt"), "--output", str(out),
        "--text-encoder-weights", str(tiny_bert), "--num-steps", "2", "--mode", "ode",
    ])  # fmt: skip
    assert np.load(out)["arr_0"].shape == (1, RESOLUTION, RESOLUTION, 3)


def test_text_demo_quick_reports_prompt_accuracy(tmp_path):
    """`repa demo --text --quick`: the packaged MiniLM encodes the captions, both arms train and
    every checkpoint is scored with FD and prompt accuracy (about 30 s here)."""
    import json

    assert main(["demo", "--text", "--quick", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["text_encoder"] == "minilm" and summary["arms"] == ["sit", "repa"]
    assert {(row["arm"], row["step"]) for row in summary["rows"]} == {
        (arm, step) for arm in ("sit", "repa") for step in (10, 20)
    }
    for row in summary["rows"]:
        assert 0.0 <= row["prompt_accuracy"] <= min(row[f"{name}_accuracy"] for name in ("shape", "colour"))
        assert row["prompt_accuracy_low"] <= row["prompt_accuracy"] <= row["prompt_accuracy_high"]
        assert row["fd"] > 0
    last = {row["arm"]: row for row in summary["rows"] if row["step"] == 20}
    assert summary["above_chance"] == {
        arm: row["prompt_accuracy_low"] > summary["chance_prompt_accuracy"] for arm, row in last.items()
    }
    report = (tmp_path / "report.md").read_text()
    assert "prompt accuracy [95%]" in report and "At the last step" in report
    assert all(Path(path).is_file() for path in summary["grids"].values())


def test_prompt_accuracy_counts_all_four_attributes():
    """The measure itself: an image counts only when every attribute the evaluator reads matches
    its prompt; the prompts' targets come from prompt_attributes."""
    from repa.demo.text import ATTRIBUTE_VALUES, attribute_accuracy, prompt_targets

    # the second prompt shares only the colour with the first
    targets = prompt_targets(
        ["a striped red cross at the bottom right", "top left: a red disk with no pattern"]
    )
    assert [ATTRIBUTE_VALUES[name][int(targets[name][0])] for name in ATTRIBUTE_VALUES] == [
        "cross", "red", "striped", "bottom right"
    ]  # fmt: skip

    class Fixed:  # predicts the first prompt's attributes for every image
        def predict(self, images):
            return {name: torch.full((len(images),), int(targets[name][0])) for name in targets}

    scores = attribute_accuracy(Fixed(), torch.zeros(2, 3, 4, 4, dtype=torch.uint8), targets)
    assert scores == {"shape": 0.5, "colour": 1.0, "texture": 0.5, "position": 0.5, "all": 0.5}
    with pytest.raises(ValueError, match="names no single colour"):
        prompt_targets(["a red and blue disk, plain, at the top left"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A transformers CLIPModel folder (BPE tokenizer, image processor, random weights) at 16 px."""

    folder = tmp_path_factory.mktemp("tiny_clip")
    words = ["a", "red", "disk", "blue", "cross"]
    tokenizer, vocab = write_clip_tokenizer(folder, words)
    images = transformers.CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}  # fmt: skip
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                     **special},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_score_is_the_mean_clipped_cosine_of_each_pair(tiny_clip, tmp_path):
    """repa eval --clip-score's value, from the samples and the captions beside them, equals
    100 x max(cos, 0) of each (image, caption) pair computed alone through transformers, averaged."""
    import argparse

    from repa.commands.eval import clip_score_of
    from repa.eval.clip_score import load_clip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    captions = ["a red disk", "blue cross", "a blue disk"]
    np.savez(tmp_path / "s.npz", arr_0=images)
    (tmp_path / "s.prompts.txt").write_text("\n".join(captions) + "\n")
    args = argparse.Namespace(
        samples=str(tmp_path / "s.npz"), clip_weights=str(tiny_clip), device="cpu", feature_batch_size=2
    )
    score = clip_score_of(args)
    model = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    processor = transformers.CLIPProcessor.from_pretrained(tiny_clip)
    expected = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            inputs = processor(text=[caption], images=[image], return_tensors="pt")
            output = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
            cos = (output.image_embeds * output.text_embeds).sum()  # both unit vectors
            expected.append(100 * max(float(cos), 0.0))
    assert score == pytest.approx(sum(expected) / 3, abs=1e-4)
    assert 0 < score < 100
    with pytest.raises(FileNotFoundError, match="--clip-weights"):
        load_clip(str(tmp_path / "no-clip"))


def test_clip_score_clips_negative_cosines_at_zero():
    """Stand-in embeddings with cosines 1, -1 and 1/sqrt(2): the -1 pair counts as 0."""
    from repa.eval.clip_score import clip_score

    class Inputs(dict):
        def to(self, device):
            return self

    def processor(text, images, **kwargs):  # an image is its embedding; a caption names its own
        vectors = {"x": [1.0, 0.0], "-x": [-1.0, 0.0], "y": [0.0, 1.0]}
        return Inputs(
            pixel_values=torch.tensor(np.stack(images), dtype=torch.float32),
            input_ids=torch.tensor([vectors[caption] for caption in text]),
            attention_mask=torch.ones(len(text), 2),
        )

    class Model:
        def get_image_features(self, pixel_values):
            return pixel_values

        def get_text_features(self, input_ids, attention_mask):
            return input_ids

    images = [np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 1.0]])]  # batches of 2 and 1
    score = clip_score(images, ["x", "-x", "y"], Model(), processor)
    assert score == pytest.approx((100 + 0 + 100 / 2**0.5) / 3)


def test_methods_with_their_own_forward_refuse_text_models(text_shards, tmp_path):
    with pytest.raises(ValueError, match="--method sra does not train text models"):
        config = text_config(text_shards, tmp_path, method="sra")
        config.objective.sra_student_depth, config.objective.sra_teacher_depth = 1, 2
        train(config)


def test_the_step_gives_each_image_its_own_caption():
    """The denoising step passes the batch's caption embeddings and masks row for row (image i
    with caption i) and no labels; the model reading them sees exactly the cached values."""
    from repa.data.stream import Batch
    from repa.models import create_model
    from repa.tokenizers import create_tokenizer
    from repa.train.methods.base import ParamGroup
    from repa.train.methods.denoising import DenoisingMethod
    from repa.train.randomness import StepNoise
    from repa.transport import create_time_sampler

    torch.manual_seed(0)
    model = create_model(
        "SiT-S/4", input_size=16, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0,
        context_dim=8, context_length=5, null_context="learned",
    )  # fmt: skip
    seen = {}

    def record(module, args, kwargs):
        seen.update(labels=args[2], context=kwargs["context"], context_mask=kwargs["context_mask"])

    model.register_forward_pre_hook(record, with_kwargs=True)
    group = ParamGroup("sit", model, torch.optim.SGD(model.parameters(), lr=0.0))
    tokenizer = create_tokenizer("pixels", resolution=16)
    method = DenoisingMethod(
        tokenizer, [], "linear", create_time_sampler("uniform"), 0.0, group, text_conditioned=True
    )
    assert method.batch_fields(frozenset()) == {"images", "text"}
    text = torch.randn(4, 5, 8).half()
    mask = torch.tensor([[True] * (k + 1) + [False] * (4 - k) for k in range(4)])
    batch = Batch(
        images=torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8),
        labels=torch.zeros(4, dtype=torch.long), moments=None, features=None, keys=list("abcd"),
        flipped=torch.zeros(4, dtype=torch.bool), text=text, text_mask=mask,
    )  # fmt: skip
    loss = next(method.losses(model, batch, StepNoise(0, 4, "cpu")))
    assert torch.isfinite(loss.loss) and seen["labels"] is None
    assert torch.equal(seen["context"], text.float()) and torch.equal(seen["context_mask"], mask)
