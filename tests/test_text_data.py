"""Captioned data: `repa data build` from a COCO-style JSON and from captioned tars, cached text
embeddings through the real `transformers` path (a tiny random-weight BERT saved to disk), the
training stream's caption draw, and the missing-weights message."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from repa.cli import main
from repa.data import shards as fmt
from repa.data.build import build_shards
from repa.data.stream import caption_index, iter_eval_batches, make_train_stream
from tests.tiny_text import write_clip_tokenizer, write_tiny_bert

MAX_LENGTH = 12
WORDS = "a an the red green blue circle square cross top bottom left right of at in with stripes dots picture"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A transformers folder (config, tokenizer, random weights) that `from_pretrained` reads."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), [*WORDS.split(), *"0123456789"])


@pytest.fixture(scope="module")
def text_encoder(tiny_bert):
    from repa.text import create_text_encoder

    return create_text_encoder("minilm", weights=str(tiny_bert), max_length=MAX_LENGTH)


def reference_encoding(folder, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """The caption through transformers directly: last hidden state (L, D) and mask (L,)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    tokens = tokenizer(
        caption, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
    return hidden[0].numpy(), tokens["attention_mask"][0].numpy().astype(bool)


def _png(colour: tuple[int, int, int], fmt_name: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format=fmt_name)
    return buffer.getvalue()


@pytest.fixture
def coco_source(tmp_path):
    """Five images, 1-3 captions each, listed out of order in a COCO captions JSON."""
    folder = tmp_path / "images"
    folder.mkdir()
    images, annotations = [], []
    for i in range(5):
        (folder / f"im{i}.png").write_bytes(_png((40 * i, 10, 200)))
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": 12, "height": 10})
        for k in range(1 + i % 3):
            annotations.append(
                {"id": 1000 + 10 * i + k, "image_id": 100 + i, "caption": f" a red circle {i} {k} "}
            )
    annotations.reverse()  # captions are kept in annotation-id order, not file order
    captions_file = tmp_path / "captions.json"
    captions_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    expected = {f"im{i}.png": [f"a red circle {i} {k}" for k in range(1 + i % 3)] for i in range(5)}
    return folder, captions_file, expected


def _samples(folder) -> list[dict]:
    samples = []
    for url in fmt.expand_shard_urls(str(folder)):
        samples.extend(fmt.iter_tar_samples(url))
    return samples


def test_build_from_coco_json_caches_each_captions_embedding_and_mask(
    coco_source, tiny_bert, text_encoder, tmp_path
):
    folder, captions_file, expected = coco_source
    out = tmp_path / "shards"

    def build():
        return build_shards(str(folder), out, resolution=8, shard_size=2, workers=0,
                            captions_file=str(captions_file), text_encoder=text_encoder)  # fmt: skip

    result = build()
    assert result.num_samples == 5 and len(result.shards_written) == 3
    manifest = fmt.read_manifest(str(out / fmt.MANIFEST_NAME))
    assert manifest["num_samples"] == 5 and manifest["num_captions"] == 1 + 2 + 3 + 1 + 2
    assert manifest["fields"]["captions"] == fmt.CAPTIONS and manifest["fields"]["text"] == fmt.TEXT
    assert manifest["text_shape"] == [MAX_LENGTH, 16] and manifest["options"]["cache_text"] == "minilm"

    seen = {}
    for sample in _samples(out):
        key = sample[fmt.SOURCE_KEY].decode()
        captions = json.loads(sample[fmt.CAPTIONS])
        embeddings, masks = fmt.load_npy(sample[fmt.TEXT]), fmt.load_npy(sample[fmt.TEXT_MASK])
        assert embeddings.dtype == np.float16 and masks.dtype == bool
        assert embeddings.shape == (len(captions), MAX_LENGTH, 16)
        for caption, embedding, mask in zip(captions, embeddings, masks):
            reference, reference_mask = reference_encoding(tiny_bert, caption)
            np.testing.assert_allclose(embedding.astype(np.float32), reference, rtol=2e-3, atol=2e-3)
            # the mask covers exactly the caption's tokens ([CLS] words [SEP]), a prefix
            count = len(transformers.AutoTokenizer.from_pretrained(tiny_bert)(caption)["input_ids"])
            assert mask.tolist() == [True] * count + [False] * (MAX_LENGTH - count)
            assert (mask == reference_mask).all()
        seen[key] = captions
    assert seen == expected

    null_embedding, null_mask = fmt.read_null_text(str(out))
    reference, reference_mask = reference_encoding(tiny_bert, "")
    assert (
        null_mask.tolist() == [True, True] + [False] * (MAX_LENGTH - 2)
        and (null_mask == reference_mask).all()
    )
    np.testing.assert_allclose(null_embedding.astype(np.float32), reference, rtol=2e-3, atol=2e-3)

    # rebuilding finds every shard complete; a changed caption rebuilds (the fingerprint holds captions)
    again = build()
    assert len(again.shards_skipped) == 3
    table = json.loads(captions_file.read_text())
    table["annotations"][0]["caption"] = "a blue square"
    captions_file.write_text(json.dumps(table))
    changed = build()
    assert len(changed.shards_written) == 1


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_size_estimate_counts_captions_and_cached_text_exactly(coco_source, text_encoder, tmp_path):
    """The build's size estimate holds the captions and their cached embeddings and masks, to the
    byte of the tar members the build writes (images are estimated, these are exact)."""
    from repa.data.build import list_source
    from repa.data.estimate import estimate_build_size, tar_member_size

    folder, captions_file, _ = coco_source
    items, _ = list_source(str(folder), captions_file=str(captions_file))
    estimate = estimate_build_size(items, resolution=8, shard_size=2, text_encoder=text_encoder)
    text_key = next(key for key in estimate.components if key.startswith("text "))
    assert f"{MAX_LENGTH}x16 per caption" in text_key
    out = tmp_path / "shards"
    build_shards(str(folder), out, resolution=8, shard_size=2, workers=0, captions_file=str(captions_file),
                 text_encoder=text_encoder)  # fmt: skip
    written = {"captions": 0, "text": 0}
    for sample in _samples(out):
        written["captions"] += tar_member_size(len(sample[fmt.CAPTIONS]))
        for member in (fmt.TEXT, fmt.TEXT_MASK):
            written["text"] += tar_member_size(len(sample[member]))
    assert estimate.components["captions (JSON)"] == written["captions"]
    assert estimate.components[text_key] == written["text"]


def test_build_from_captioned_tars_keeps_every_caption(tmp_path, text_encoder):
    """img2dataset style: jpg + txt (one caption per line) or json "caption"/"captions"; no classes."""
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "part-00000.tar", "w") as archive:
        _add(archive, "00000.jpg", _png((200, 0, 0), "JPEG"))
        _add(archive, "00000.txt", b"a red square\nthe red square at the top\n")
        _add(archive, "00000.json", json.dumps({"caption": "a red square", "key": "00000"}).encode())
        _add(archive, "00001.png", _png((0, 200, 0)))
        _add(archive, "00001.json", json.dumps({"caption": "a green circle"}).encode())
    with tarfile.open(tmp_path / "in" / "part-00001.tar", "w") as archive:
        _add(archive, "00002.webp", _png((0, 0, 200), "WEBP"))
        _add(
            archive, "00002.json", json.dumps({"captions": ["blue dots", "a blue picture", "blue"]}).encode()
        )
    out = tmp_path / "out"
    result = build_shards(
        str(tmp_path / "in"), out, resolution=8, shard_size=2, workers=0, text_encoder=text_encoder
    )
    assert result.num_samples == 3
    manifest = fmt.read_manifest(str(out / fmt.MANIFEST_NAME))
    assert manifest["num_captions"] == 2 + 1 + 3 and manifest["class_names"] == ["0"]
    captions = {s[fmt.SOURCE_KEY].decode(): json.loads(s[fmt.CAPTIONS]) for s in _samples(out)}
    assert captions == {
        "part-00000.tar/00000": ["a red square", "the red square at the top"],  # txt before json's one
        "part-00000.tar/00001": ["a green circle"],
        "part-00001.tar/00002": ["blue dots", "a blue picture", "blue"],
    }
    # our own shards are a captioned source too, through the CLI, without re-encoding
    assert (
        main(["data", "build", str(out), str(tmp_path / "again"), "--resolution", "4", "--workers", "0"]) == 0
    )
    again = fmt.read_manifest(str(tmp_path / "again" / fmt.MANIFEST_NAME))
    assert again["num_captions"] == 6 and "text" not in again["fields"]


def test_stream_draws_one_caption_per_sample_seeded(coco_source, text_encoder, tmp_path):
    folder, captions_file, expected = coco_source
    out = tmp_path / "shards"
    build_shards(
        str(folder),
        out,
        resolution=8,
        shard_size=1,
        workers=0,
        captions_file=str(captions_file),
        text_encoder=text_encoder,
    )
    cached = {s[fmt.SOURCE_KEY].decode(): fmt.load_npy(s[fmt.TEXT]) for s in _samples(out)}

    def draw(seed: int, workers: int = 0) -> list[tuple[str, str]]:
        stream = make_train_stream(
            str(out), batch_size_per_rank=5, num_workers=workers, seed=seed, shuffle_buffer=2, num_batches=4,
            fields={"text", "captions"},
        )  # fmt: skip
        drawn = []
        for batch in stream:
            assert batch.images is None and batch.text.shape == (5, MAX_LENGTH, 16)
            assert batch.text.dtype == torch.float16 and batch.text_mask.dtype == torch.bool
            for key, caption, row, mask in zip(batch.keys, batch.captions, batch.text, batch.text_mask):
                index = expected[key].index(caption)  # the embedding belongs to the drawn caption
                assert torch.equal(row, torch.from_numpy(np.array(cached[key][index])))
                assert int(mask.sum()) == 2 + len(caption.split())
                drawn.append((key, caption))
        return drawn

    first = draw(seed=3)
    assert first == draw(seed=3)  # seeded
    # through data-loader workers (shared-memory batch slots): the same fields, each caption's own row
    with_workers = draw(seed=3, workers=2)
    assert sorted(with_workers) != [] and {key for key, _ in with_workers} == set(expected)
    three = [caption for key, caption in first if key == "im2.png"]
    assert len(three) == 4 and len(set(three)) > 1  # a new draw in each pass, over the captions
    # the draw depends on (seed, key, epoch), not on where the sample is read
    assert caption_index(3, "im2.png", (3, 0, 1)) == caption_index(3, "im2.png", (3, 0, 1))
    counts = np.bincount([caption_index(3, "im2.png", (0, 0, e)) for e in range(300)], minlength=3)
    assert counts.min() > 70  # about uniform

    batch = next(
        iter_eval_batches(str(out), batch_size=5, with_images=False, with_captions=True, with_text=True)
    )
    assert batch.captions == [expected[key][0] for key in batch.keys]  # evaluation: the first caption


def test_stream_refuses_text_fields_the_shards_lack(tmp_path):
    (tmp_path / "img" / "a").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "img" / "a" / f"{i}.png").write_bytes(_png((i, 0, 0)))
    build_shards(str(tmp_path / "img"), tmp_path / "out", resolution=8, workers=0)
    from repa.data.stream import StreamError

    for field, flag in (("text", "--cache-text"), ("captions", "--captions")):
        with pytest.raises(StreamError, match=flag):
            make_train_stream(str(tmp_path / "out"), batch_size_per_rank=1, num_workers=0, fields={field})
    with pytest.raises(ValueError, match="--cache-text needs captions"):
        build_shards(str(tmp_path / "img"), tmp_path / "out2", resolution=8, workers=0, text_encoder=Fake())


class Fake:
    max_length = 4

    def encode(self, captions):
        raise AssertionError("never called")


def test_missing_text_weights_name_the_file_and_the_flag(tmp_path, monkeypatch):
    from repa.encoders import EncoderWeightsError
    from repa.text import create_text_encoder, encoders

    with pytest.raises(EncoderWeightsError, match=r"--text-encoder-weights DIR") as error:
        create_text_encoder("clip-l", weights=str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(error.value)
    monkeypatch.setattr(encoders, "_hub_offline", lambda: True)
    with pytest.raises(EncoderWeightsError, match=r"openai/clip-vit-large-patch14") as error:
        create_text_encoder("clip-l", cache_dir=str(tmp_path / "empty-cache"))
    assert "--text-encoder-weights" in str(error.value) and "HF_HOME" in str(error.value)
    with pytest.raises(ValueError, match="unknown text encoder"):
        create_text_encoder("bert-xxl")
    # the CLI says it without a traceback
    flags = ["--cache-text", "t5-xxl", "--text-encoder-weights", str(tmp_path / "absent")]
    assert main(["data", "build", str(tmp_path), str(tmp_path / "o"), "--resolution", "8", *flags]) == 2


def test_packaged_minilm_is_a_real_pretrained_encoder():
    """The package index's MiniLM (a dev dependency) loads offline and its embeddings mean something."""
    from repa.text import create_text_encoder

    encoder = create_text_encoder("minilm")
    captions = ["a photo of a dog", "a picture of a puppy", "quarterly stock market report"]
    embeddings, mask = encoder.encode(captions)
    assert embeddings.shape == (3, 32, 384) and mask[0].sum() == 2 + 5
    pooled = (embeddings * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # its mean pooling
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.3


def test_clip_text_features_are_u_vits_run_without_the_mask(tmp_path):
    """clip-l through the real transformers path on a tiny random CLIP text tower: the last hidden
    state of the model run on the padded ids alone (U-ViT's features, REPA's COCO setting), with
    the tokenizer's mask covering start, caption and end tokens."""
    from repa.text import create_text_encoder

    words = ["a", "red", "circle", "blue", "square"]
    tokenizer, vocab = write_clip_tokenizer(tmp_path, words)
    tokenizer.save_pretrained(tmp_path)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path)

    encoder = create_text_encoder("clip-l", weights=str(tmp_path), max_length=8)
    embeddings, mask = encoder.encode(["a red circle", "blue square"])
    assert mask.tolist() == [[True] * 5 + [False] * 3, [True] * 4 + [False] * 4]
    ids = tokenizer(["a red circle", "blue square"], padding="max_length", max_length=8, return_tensors="pt")
    words_ids = [vocab[f"{word}</w>"] for word in ("a", "red", "circle")]
    assert ids["input_ids"][0, :5].tolist() == [vocab["<|startoftext|>"], *words_ids, vocab["<|endoftext|>"]]
    model = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        unmasked = model(input_ids=ids["input_ids"]).last_hidden_state
        masked = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(embeddings, unmasked)
    assert not torch.allclose(embeddings[1, 4:], masked[1, 4:])  # padding rows differ under a mask


def test_captioned_synthetic_set_names_what_it_draws(tmp_path):
    """`repa data synthetic --captioned`: captions name the drawn attributes (read back by
    prompt_attributes), the shape's colour is in the named quadrant, and the set builds."""
    from repa.text.synthetic import (
        COLOURS,
        POSITIONS,
        captions_for,
        prompt_attributes,
        render_captioned_image,
    )

    out = tmp_path / "syn"
    assert (
        main(["data", "synthetic", str(out), "--num-images", "6", "--resolution", "32", "--captioned"]) == 0
    )
    first = {path.name: path.read_bytes() for path in (out / "images").iterdir()}
    assert (
        main(["data", "synthetic", str(out), "--num-images", "6", "--resolution", "32", "--captioned"]) == 0
    )
    assert first == {path.name: path.read_bytes() for path in (out / "images").iterdir()}  # deterministic
    truth = json.loads((out / "attributes.json").read_text())
    table = json.loads((out / "captions.json").read_text())
    by_image = {}
    for note in table["annotations"]:
        by_image.setdefault(table["images"][note["image_id"]]["file_name"], []).append(note["caption"])
    for name, attributes in truth.items():
        assert by_image[name] == captions_for(attributes)
        assert all(prompt_attributes(caption) == attributes for caption in by_image[name])
        pixels, again = render_captioned_image(int(name[:-4]), resolution=64)
        assert again == attributes
        column, row = (int(c * 2) for c in POSITIONS[attributes["position"]])  # the quadrant
        quadrant = pixels[row * 32 : row * 32 + 32, column * 32 : column * 32 + 32].astype(float)
        saturation = quadrant.max(-1) - quadrant.min(-1)
        assert saturation.max() > 100  # the shape is in the named quadrant
        vivid = quadrant.reshape(-1, 3)[saturation.reshape(-1) > 0.8 * saturation.max()].mean(0)
        nearest = max(COLOURS, key=lambda c: vivid @ np.asarray(COLOURS[c]) / np.linalg.norm(COLOURS[c]))
        assert nearest == attributes["colour"]
    assert prompt_attributes("a red or blue disk") == {
        "shape": "disk",
        "colour": None,
        "texture": None,
        "position": None,
    }
    flags = ["--resolution", "16", "--captions", str(out / "captions.json"), "--workers", "0"]
    assert main(["data", "build", str(out / "images"), str(tmp_path / "shards"), *flags]) == 0
    manifest = fmt.read_manifest(str(tmp_path / "shards" / fmt.MANIFEST_NAME))
    assert (manifest["num_samples"], manifest["num_captions"]) == (6, 18)
