"""Alignment diagnostics (REPA's analysis figure): per SiT block and noise level, how close the
SiT's hidden tokens are to a frozen encoder's, and how linearly decodable the class is.

    result = probe_checkpoint("runs/repa", encoder="dinov2-b", data="shards/", output="probe/")
    result.rows  # [{"layer": 1, "t": 0.0, "cknna": 0.41, "linear_probe": 0.62}, ...]

For N images x from the data: the encoder's tokens of x (B, T, D_enc), mean-pooled; for each
noise level t, x_t = alpha(t) x + sigma(t) eps on the model's path (REPA's convention: t=0 data,
t=1 noise) and the SiT's hidden tokens after every block (B, T, D), mean-pooled. Then
  cknna         CKNNA (Huh et al., "The Platonic Representation Hypothesis", 2024; REPA's
                alignment measure, k = 10) between pooled SiT and pooled encoder features: HSIC of
                the two linear kernels restricted to mutual k-nearest neighbours, normalised.
                1 for identical features; invariant to rotations and isotropic scaling of either.
  linear_probe  held-out accuracy of a multinomial logistic regression on the pooled hidden
                states (standardised), trained on the other images (default 1/4 held out).
Works for any checkpoint, plain-SiT baselines included: the encoder is only the yardstick.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# ---- the measures ---------------------------------------------------------------------------------


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 - the usual name
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) kernels, diagonals ignored."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)  # noqa: E741
    value = (
        (k * l.T).sum()
        + k.sum() * l.sum() / ((n - 1) * (n - 2))
        - 2 * (k @ l).sum() / (n - 2)
    )  # fmt: skip
    return value / (n * (n - 3))


def _mutual_knn_hsic(k: torch.Tensor, l: torch.Tensor, topk: int) -> torch.Tensor:  # noqa: E741
    n = k.shape[0]

    def neighbours(kernel: torch.Tensor) -> torch.Tensor:  # (n, n) 0/1: j among i's k nearest
        masked = kernel.clone().fill_diagonal_(float("-inf"))
        indices = masked.topk(topk, dim=1).indices
        return torch.zeros(n, n, dtype=kernel.dtype).scatter_(1, indices, 1.0)

    mask = neighbours(k) * neighbours(l)
    return _hsic_unbiased(mask * k, mask * l)


def cknna(features_a: torch.Tensor, features_b: torch.Tensor, topk: int = 10) -> float:
    """CKNNA of two (n, D_a) / (n, D_b) feature sets of the same n samples (n >= 4, topk < n).

    Linear kernels of the rows, computed in float64. Invariant to an orthogonal rotation or an
    isotropic scaling of either side (the kernel scales by c^2, the neighbours do not change,
    and the normalisation divides the scale out); 1 when the two sides are equal."""
    a, b = features_a.double(), features_b.double()
    n = a.shape[0]
    if b.shape[0] != n or n < 4:
        raise ValueError(
            f"cknna needs the same n >= 4 samples on both sides, got {a.shape[0]} and {b.shape[0]}"
        )
    topk = min(topk, n - 1)
    k, l = a @ a.T, b @ b.T  # noqa: E741
    across = _mutual_knn_hsic(k, l, topk)
    norm = torch.sqrt(_mutual_knn_hsic(k, k, topk) * _mutual_knn_hsic(l, l, topk))
    return float(across / norm) if norm > 0 else float("nan")


def linear_probe_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    held_out: float = 0.25,
    steps: int = 200,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a multinomial logistic regression on (n, D) features.

    A seeded split (`held_out` of the samples for testing, at least one); features standardised
    with the training split's statistics; full-batch L-BFGS on cross-entropy + weight_decay x
    |W|^2 (deterministic, no learning rate to tune)."""
    features = features.double()
    n = features.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * held_out)))
    test, train = order[:n_test], order[n_test:]
    mean = features[train].mean(0)
    std = features[train].std(0).clamp_min(1e-6)
    x = (features - mean) / std  # (n, D)
    num_classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x[train] @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, labels[train]) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (x[test] @ weight + bias).argmax(1)
    return float((predicted == labels[test]).double().mean())


# ---- hidden states of a SiT -----------------------------------------------------------------------


def block_outputs(
    model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """Mean-pooled hidden tokens after every block: a list of depth tensors (B, D). Read with
    forward hooks on `model.blocks`, so any SiT variant that keeps its blocks there works.
    A REG model (class_token_dim > 0) gets a zero class token, pooled with the patches: the probe
    measures what the model makes of the image, with no encoder's class token to lean on."""
    pooled: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: pooled.append(out.float().mean(dim=1)))
        for block in model.blocks
    ]
    try:
        width = getattr(getattr(model, "config", None), "class_token_dim", 0)
        extra = {"class_token": x_t.new_zeros(x_t.shape[0], width)} if width else {}
        model.velocity(x_t, t, y, **extra)
    finally:
        for hook in hooks:
            hook.remove()
    return pooled


# ---- the probe ------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    rows: list[dict]  # {"layer", "t", "cknna", "linear_probe"}
    encoder: str
    num_images: int
    files: dict[str, Path] = field(default_factory=dict)


def read_images(
    data: str | os.PathLike, num_images: int, resolution: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_images` uint8 images (N, 3, H, W) and labels, in order, from shards (a
    folder with a manifest, a manifest, a .tar or a brace pattern) or an ImageNet-layout image
    folder (ADM-cropped to `resolution`)."""
    path = Path(data)
    if path.is_dir() and not (path / "manifest.json").exists() and not any(path.glob("*.tar")):
        from repa.data.build import list_image_folder
        from repa.data.images import load_image

        items, _ = list_image_folder(path)
        items = items[:num_images]
        images = np.stack([load_image(item.path, resolution) for item in items])
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(
            [item.label for item in items]
        )
    from repa.data.stream import iter_eval_batches

    images, labels, count = [], [], 0
    for batch in iter_eval_batches(str(data), batch_size=min(256, num_images)):
        images.append(batch.images)
        labels.append(batch.labels)
        count += len(batch.images)
        if count >= num_images:
            break
    return torch.cat(images)[:num_images], torch.cat(labels)[:num_images]


@torch.no_grad()
def probe_generator(
    generator,
    encoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_levels: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    topk: int = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict]:
    """The probe's rows for a loaded `repa.eval.checkpoints.Generator` and a frozen encoder."""
    from repa.transport import interpolate

    model, tokenizer = generator.model.eval(), generator.tokenizer
    rng = torch.Generator().manual_seed(seed)
    target, hidden = [], {t: [] for t in noise_levels}
    for start in range(0, len(images), batch_size):
        chunk, chunk_labels = images[start : start + batch_size], labels[start : start + batch_size]
        target.append(encoder(chunk).float().mean(dim=1))  # (B, D_enc)
        if model.config.latent_batchnorm:  # REPA-E: the SiT's BatchNorm on the posterior mean
            mean, _ = tokenizer.posterior(chunk.float() / 127.5 - 1.0)
            latents = model.normalize_latents(mean.float())
        else:
            latents = tokenizer.encode(chunk, generator=rng).float()
        noise = torch.randn(latents.shape, generator=rng)  # one draw per image, shared by every t
        class_ids = chunk_labels.clamp_max(model.config.num_classes - 1)
        for t in noise_levels:
            times = torch.full((len(chunk),), float(t))
            x_t, _ = interpolate(generator.path_type, latents, noise, times)
            hidden[t].append(torch.stack(block_outputs(model, x_t, times, class_ids)))  # (L, B, D)
    target_features = torch.cat(target)
    rows = []
    for t in noise_levels:
        layers = torch.cat(hidden[t], dim=1)  # (L, N, D)
        for layer, features in enumerate(layers, start=1):
            rows.append(
                {
                    "layer": layer,
                    "t": float(t),
                    "cknna": cknna(features, target_features, topk),
                    "linear_probe": linear_probe_accuracy(features, labels, seed=seed),
                }
            )
    return rows


def plot_probe(rows: list[dict], output_dir: Path, title: str = "") -> list[Path]:
    """Two panels, layer on the x axis (as REPA's figure): CKNNA and linear-probe accuracy, one
    line per noise level (and per run, when rows carry a "run": one colour per run, one line
    style per noise level); PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    runs = list(dict.fromkeys(r.get("run") for r in rows))
    levels = list(dict.fromkeys(r["t"] for r in rows))
    styles = ["-", "--", ":", "-."]
    for run_index, run in enumerate(runs):
        for level_index, t in enumerate(levels):
            points = sorted(
                (r["layer"], r["cknna"], r["linear_probe"])
                for r in rows
                if r.get("run") == run and r["t"] == t
            )
            if not points:
                continue
            layers, alignment, accuracy = zip(*points)
            label = f"t = {t:g}" if run is None else f"{run}, t = {t:g}"
            style = dict(
                marker="o",
                label=label,
                linestyle=styles[level_index % len(styles)] if run is not None else "-",
                color=f"C{run_index}" if run is not None else f"C{level_index}",
            )
            axes[0].plot(layers, alignment, **style)
            axes[1].plot(layers, accuracy, **style)
    for ax, label in zip(axes, ("CKNNA with the encoder", "linear-probe accuracy")):
        ax.set_xlabel("SiT layer (block)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    paths = []
    for suffix in ("png", "svg"):
        path = output_dir / f"probe.{suffix}"
        figure.savefig(path, dpi=150)
        paths.append(path)
    plt.close(figure)
    return paths


def probe_checkpoint(
    run_or_checkpoint: str | os.PathLike,
    *,
    encoder: str,
    data: str | os.PathLike,
    output: str | os.PathLike,
    num_images: int = 1024,
    noise_levels: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    topk: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> ProbeResult:
    """Load the EMA SiT of a run / checkpoint, probe it on `data` against `encoder` (a registry
    name, a local encoder file, or NAME:random), write probe.json / probe.csv / probe.png."""
    from repa.encoders import create_encoder
    from repa.eval.checkpoints import load_generator

    generator = load_generator(run_or_checkpoint, device=device)
    images, labels = read_images(data, num_images, generator.resolution)
    if len(images) < 8:
        raise ValueError(f"{data}: {len(images)} images; the probe needs at least 8")
    frozen = create_encoder(encoder, resolution=generator.resolution).to(device)
    rows = probe_generator(
        generator,
        frozen,
        images.to(device),
        labels,
        noise_levels=noise_levels,
        topk=topk,
        batch_size=batch_size,
        seed=seed,
    )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(generator.weights_path or run_or_checkpoint),
        "step": generator.step,
        "encoder": frozen.name,
        "data": str(data),
        "num_images": len(images),
        "topk": topk,
        "rows": rows,
    }
    (output / "probe.json").write_text(json.dumps(record, indent=1))
    with open(output / "probe.csv", "w") as handle:
        handle.write("layer,t,cknna,linear_probe\n")
        handle.writelines(f"{r['layer']},{r['t']},{r['cknna']:.6f},{r['linear_probe']:.6f}\n" for r in rows)
    result = ProbeResult(
        rows, frozen.name, len(images), {"json": output / "probe.json", "csv": output / "probe.csv"}
    )
    title = f"{Path(run_or_checkpoint).name} vs {frozen.name}"
    for path in plot_probe(rows, output, title):
        result.files[path.suffix.lstrip(".")] = path
    return result
