"""repa.eval metrics: the Fréchet distance, streaming moments, image sets and their cache,
agreement with torch-fidelity's own numbers, weights checks, FD-DINOv2 wiring.

No pretrained weights exist offline. The Inception tests build torch-fidelity's Inception with
random (variance-preserving) weights, save them to a file and hand that file to both our code
and torch_fidelity.calculate_metrics. Inception at 299 px costs ~0.3 s per image on this CPU,
so those tests use a dozen 32x32 images per set and are marked slow.
"""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from repa.eval.features import (
    INCEPTION_FILENAME,
    CallableFeatures,
    DinoV2Features,
    InceptionFeatures,
    resolve_inception_weights,
)
from repa.eval.frechet import FeatureMoments, frechet_distance, gaussian_of
from repa.eval.metrics import Evaluator, parse_metrics
from repa.eval.npz import write_npz_streaming
from repa.eval.references import ReferenceStats, iter_image_batches
from repa.utils.files import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(count: int, size: int = 32, seed: int = 0, shift: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3): smooth random blobs (not white noise), optionally brightened."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 200, (count, size // 8, size // 8, 3)).astype(np.float64)
    images = coarse.repeat(8, axis=1).repeat(8, axis=2) + shift + rng.normal(0, 10, (count, size, size, 3))
    return np.clip(images, 0, 255).round().astype(np.uint8)


def _save_npz(path, images: np.ndarray):
    return write_npz_streaming(path, images.shape, [images])


def _pool_features(images: torch.Tensor) -> torch.Tensor:
    """A cheap deterministic feature map for tests: 4x4 average-pooled pixels, (B, 48)."""
    pooled = torch.nn.functional.avg_pool2d(images.float() / 255, images.shape[-1] // 4)
    return pooled.flatten(1)


# ---- the Fréchet distance ------------------------------------------------------------------------


def test_frechet_distance_closed_form_and_self_distance():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    # Rank-deficient covariance (fewer samples than dimensions): self-distance stays ~0, not NaN.
    # (The square roots of the ~44 zero eigenvalues turn 1e-16 rounding into ~1e-7 each.)
    features = rng.normal(size=(20, 64))
    gaussian = gaussian_of(features)
    assert abs(gaussian.distance(gaussian)) < 1e-7 * np.trace(gaussian.sigma)
    full_rank = gaussian_of(rng.normal(size=(500, 64)))
    assert abs(full_rank.distance(full_rank)) < 1e-10 * np.trace(full_rank.sigma)
    # Against an independent implementation (scipy's sqrtm), on full-rank covariances.
    from scipy import linalg

    a, b = gaussian_of(rng.normal(size=(200, 16))), gaussian_of(rng.normal(1, 2, size=(300, 16)))
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    scipy_value = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert a.distance(b) == pytest.approx(scipy_value, rel=1e-9)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(mu1, np.diag(var1), mu2[:3], np.diag(var2))


def test_streaming_moments_equal_numpy_cov():
    features = torch.randn(37, 6, dtype=torch.float64) * 3 + 1
    moments = FeatureMoments()
    for chunk in features.split(5):
        moments.update(chunk)
    gaussian = moments.gaussian()
    assert gaussian.count == 37
    np.testing.assert_allclose(gaussian.mu, features.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(gaussian.sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_parse_metrics_validates_names():
    assert parse_metrics("fid, IS,fid") == ["fid", "is"]
    with pytest.raises(ValueError, match="choose from"):
        parse_metrics("fid,kid")


# ---- image sets, references, cache (cheap custom feature space) ---------------------------------


def test_fd_of_a_set_against_itself_is_zero_and_reference_is_cached(tmp_path):
    images = _images(24, size=16)
    path = _save_npz(tmp_path / "set.npz", images)
    calls = []

    def counting_features(batch):
        calls.append(batch.shape[0])
        return _pool_features(batch)

    evaluator = Evaluator(
        ["fd"], feature_fn=counting_features, feature_name="pool4", cache_dir=tmp_path / "c"
    )
    result = evaluator.evaluate(path, ref=path)
    assert abs(result["fd"]) < 1e-6 and result["num_samples"] == 24
    shifted = evaluator.evaluate(_images(24, size=16, shift=40), ref=path)
    assert shifted["fd"] > 0.01
    cache_files = list((tmp_path / "c").glob("*.npz"))
    assert len(cache_files) == 1 and "pool4" in cache_files[0].name

    # A fresh evaluator reads the reference from the cache: only the samples go through the network.
    calls.clear()
    fresh = Evaluator(["fd"], feature_fn=counting_features, feature_name="pool4", cache_dir=tmp_path / "c")
    assert fresh.evaluate(path, ref=path)["fd"] == pytest.approx(result["fd"], abs=1e-12)
    assert sum(calls) == 24
    # Touching the reference set (new mtime/size) invalidates the cache entry.
    _save_npz(tmp_path / "set.npz", images[:20])
    calls.clear()
    fresh.reference(tmp_path / "set.npz")
    assert sum(calls) == 20 and len(list((tmp_path / "c").glob("*.npz"))) == 2
    # The cache file is itself a valid --ref (precomputed statistics).
    stats = ReferenceStats.load(cache_files[0])
    assert stats.count == 24
    evaluator2 = Evaluator(["fd"], feature_fn=_pool_features, feature_name="pool4", cache_dir=False)
    assert abs(evaluator2.evaluate(images, ref=cache_files[0])["fd"]) < 1e-6


def test_image_folder_and_shards_give_the_same_statistics_as_npz(tmp_path):
    images = _images(10, size=16, seed=3)
    npz = _save_npz(tmp_path / "set.npz", images)
    folder = tmp_path / "folder" / "class0"
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    evaluator = Evaluator(["fd"], feature_fn=_pool_features, feature_name="pool4", cache_dir=False)
    from_npz = evaluator.reference(npz).gaussians["pool4/features"]
    from_folder = evaluator.reference(tmp_path / "folder").gaussians["pool4/features"]
    np.testing.assert_array_equal(from_npz.mu, from_folder.mu)
    # shards built by repa data build from the same PNGs (sorted order may differ: compare sets)
    from repa.data.build import build_shards

    build_shards(str(tmp_path / "folder"), tmp_path / "shards", resolution=16, shard_size=4, workers=0)
    shard_images = torch.cat(list(iter_image_batches(tmp_path / "shards", batch_size=3)))
    assert shard_images.shape == (10, 3, 16, 16)
    from_shards = evaluator.reference(tmp_path / "shards").gaussians["pool4/features"]
    np.testing.assert_allclose(from_shards.mu, from_npz.mu, rtol=1e-12)
    np.testing.assert_allclose(from_shards.sigma, from_npz.sigma, rtol=1e-9, atol=1e-15)
    # mixed sizes in a folder are refused with a message saying what to do
    Image.fromarray(_images(1, size=32)[0]).save(folder / "999.png")
    with pytest.raises(ValueError, match="one size"):
        list(iter_image_batches(tmp_path / "folder", batch_size=64))


def test_feature_function_shape_is_checked():
    space = CallableFeatures(lambda images: images.float().mean(dim=(1, 2, 3)), "bad")
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        space(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        CallableFeatures(_pool_features, "ok")(torch.zeros(2, 3, 8, 8))


# ---- Inception: weights, agreement with torch-fidelity -------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception with random variance-preserving weights, saved to a file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # Build the architecture without its download: the loaders are bypassed, weights drawn below.
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):  # He init keeps activations O(1) through 90 ReLU layers
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
        elif isinstance(module, torch.nn.Linear):
            module.weight.data = (
                torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5
            )
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_weights_are_checked_and_missing_weights_explained(
    tmp_path, inception_weights, monkeypatch
):
    with pytest.raises(ValueError, match="SHA-256"):  # random weights are not the published file
        resolve_inception_weights(inception_weights)
    digest = file_sha256(inception_weights)
    assert resolve_inception_weights(inception_weights, expected_sha256=digest[:10]) == inception_weights
    assert resolve_inception_weights(inception_weights, expected_sha256=None) == inception_weights
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILENAME):  # a folder without the file
        resolve_inception_weights(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError) as error:  # offline: names the file, the URL and the place
        resolve_inception_weights(None, download=False)
    message = str(error.value)
    assert INCEPTION_FILENAME in message and "torch-home" in message and "--inception-weights" in message


@pytest.mark.slow
def test_inception_metrics_agree_with_torch_fidelity(tmp_path, inception_weights):
    import torch_fidelity

    generated, real = _images(6, seed=1), _images(6, seed=2, shift=30)
    real_path = _save_npz(tmp_path / "real.npz", real)
    evaluator = Evaluator(
        ["fid", "is", "prc", "sfid"],
        inception_weights=inception_weights,
        inception_sha256=None,
        batch_size=6,
        device="cpu",
        cache_dir=tmp_path / "cache",
        isc_splits=2,
    )
    reference = evaluator.reference(real_path)  # one Inception pass over the real set
    samples = evaluator.features(torch.from_numpy(generated).permute(0, 3, 1, 2).split(6))  # and one here
    ours = evaluator.score(samples, reference)

    class Uint8Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return self.images[index]

    theirs = torch_fidelity.calculate_metrics(
        input1=Uint8Images(generated),
        input2=Uint8Images(real),
        fid=True,
        isc=True,
        isc_splits=2,
        prc=True,
        # precision/recall on Inception pool3 as the ADM evaluator does (torch-fidelity's default is VGG16)
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights),
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,  # no DataLoader worker processes (and the memory-light P/R, as ours)
        batch_size=6,
    )
    assert ours["fid"] > 1e-3  # the two sets differ, and the random network sees it
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)  # 1.3e-7 seen
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]
    assert np.isfinite(ours["sfid"]) and ours["sfid"] > 0

    # FID of a set against itself is ~0: measured -7e-7 here, against 1.31 between the two sets
    # (6 images leave 2042 zero eigenvalues whose square roots amplify rounding).
    key = f"{evaluator.spaces['inception'].name}/pool"
    own = samples.stats.gaussians[key]
    assert abs(own.distance(own)) < 1e-5 and np.trace(own.sigma) > 0.1

    # ADM-style reference batch: its precomputed mu/sigma are used as they are
    adm = tmp_path / "adm_ref.npz"
    np.savez(adm, arr_0=real, mu=reference.gaussians[key].mu, sigma=reference.gaussians[key].sigma)
    fid_only = Evaluator(["fid"], spaces=evaluator.spaces, cache_dir=False)
    assert fid_only.score(samples, fid_only.reference(adm))["fid"] == pytest.approx(ours["fid"], rel=1e-9)


@pytest.mark.slow
def test_cli_eval_with_local_inception_weights(tmp_path, inception_weights):
    from repa.cli import main

    path = _save_npz(tmp_path / "s.npz", _images(4, seed=4))
    output = tmp_path / "result.json"
    argv = ["eval", str(path), "--ref", str(path), "--inception-weights", str(inception_weights)]
    argv += ["--inception-sha256", "none", "--cache-dir", str(tmp_path / "c"), "--output", str(output)]
    assert main(argv) == 0
    # ~0: 4 images leave 2045 zero eigenvalues whose square roots amplify rounding (see above)
    assert abs(json.loads(output.read_text())["metrics"]["fid"]) < 1e-5
    # without --inception-sha256 none, the random file is refused (exit code 2, message printed)
    assert main(argv[:6] + ["--cache-dir", str(tmp_path / "c")]) == 2


# ---- DINOv2 --------------------------------------------------------------------------------------


def test_fd_dinov2_through_a_weights_file(tmp_path):
    from safetensors.torch import save_file

    from repa.encoders import create_encoder

    tiny = dict(depth=1, embed_dim=96, num_heads=2)
    source = create_encoder("dinov2-l", pretrained=False, arch_overrides=tiny)
    weights = tmp_path / "dinov2-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, weights)
    space = DinoV2Features("l", weights, arch_overrides=tiny)
    features = space(torch.from_numpy(_images(3, size=16)).permute(0, 3, 1, 2))["cls"]
    assert features.shape == (3, 96) and space.name.startswith("dinov2-vit-l-14-")
    evaluator = Evaluator(["fd-dinov2"], spaces={"dinov2": space}, cache_dir=False)
    images = _images(6, size=16)
    assert abs(evaluator.evaluate(images, ref=_save_npz(tmp_path / "r.npz", images))["fd-dinov2"]) < 1e-6
    assert isinstance(InceptionFeatures.provides, tuple)
